"""Re-reading the keys an edit memory holds from the edited model.

An edit is remembered at the key its subject had when the edit was solved. Later writes below that
layer (a spread edit writes layers 3–5 under layer 6) move the keys the subjects have now, so after
many edits the memory guards directions where the subjects no longer are
(``benches/results/lifelong/1000/key_drift_default.md``). With ``memory_refresh_every = R`` every
memory is rebuilt after every R-th edit from each remembered edit's key read anew from the model.

The memory after M edits then depends only on the journal: the keys of the first ``R·⌊M/R⌋``
edits read from the weights those edits leave (the base weights plus their factors, which replay
bit for bit), followed by the keys the later edits were solved with. Resume and undo recompute the
latest refresh that way, so a resumed run holds the memory of one never stopped: bit for bit on
the same machine and thread count, where forward passes repeat exactly.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor

from fastrome.adapter import ModelAdapter
from fastrome.journal import JournalEntry
from fastrome.keys import capture_keys
from fastrome.prompts import edit_prompts
from fastrome.requests import parse_requests
from fastrome.tokens import pad_id

REFRESH_BATCH = 64  # prompts per forward pass; fixed, so the batches (hence the bits) are too

# (edit groups) → {edit_id: the rows its layer's memory keeps, read from the model as it is now}
KeyReader = Callable[[List[List[JournalEntry]]], Dict[int, List[Tensor]]]


def refresh_point(edits: int, every: int) -> int:
    """The edit count at the latest refresh after ``edits`` edits (0: none yet, or refresh off)."""
    return (edits // every) * every if every > 0 else 0


def read_memory_rows(
    adapter: ModelAdapter, tokenizer: Any, templates: Sequence[str], mode: str, dual_keys: str,
    groups: List[List[JournalEntry]],
) -> Dict[int, List[Tensor]]:
    """``{edit_id: rows}`` for every entry of ``groups`` (edits, a spread edit's parts together): the
    keys its layer's memory keeps, each (d_in,) fp32 on the CPU, read from the model's current
    weights as the edit read them when it was solved (see :func:`fastrome.update.plan`).

    An entry that stored two keys (mode "dual") gets (k̄, k_u), or k_u alone with ``dual_keys ==
    "prompt"``; one that stored one key gets k̄ in mode "consistent" and k_u otherwise. k̄ is the mean
    over the context templates; k_u is the key of the first template's prompt (the unprefixed one).
    Only the first template's prompt is read when no k̄ is needed.
    """
    def rows_of(e: JournalEntry) -> str:
        """Which rows the entry's memory keeps: "mean", "plain" or "both" (k̄ then k_u)."""
        stored = 1 if e.key is None or e.key.dim() == 1 else e.key.shape[0]
        if stored == 2:
            return "both" if dual_keys == "both" else "plain"
        return "mean" if mode == "consistent" else "plain"

    # each edit's prompts (all templates only where a k̄ is kept), then all of them in fixed batches
    jobs = []
    for group in groups:
        req = parse_requests([group[0].request])[0]
        full = any(rows_of(e) != "plain" for e in group)
        jobs.append((group, edit_prompts(tokenizer, templates if full else templates[:1], req)))
    prompts = [p for _, ps in jobs for p in ps]
    layers = sorted({e.layer for group in groups for e in group})
    pad = pad_id(tokenizer)
    read: Dict[int, List[Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(prompts), REFRESH_BATCH):
        got = capture_keys(adapter, layers, prompts[start:start + REFRESH_BATCH], pad)
        for layer in layers:
            read[layer].extend(got[layer].cpu().unbind(0))
    out: Dict[int, List[Tensor]] = {}
    at = 0
    for group, ps in jobs:
        for e in group:
            keys = read[e.layer][at:at + len(ps)]
            mean, plain = torch.stack(keys).mean(0), keys[0].contiguous()  # k̄ as the edit computed it
            out[e.edit_id] = {"both": [mean, plain], "mean": [mean], "plain": [plain]}[rows_of(e)]
        at += len(ps)
    return out
