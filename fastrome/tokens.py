"""Tokenisation with subject positions, for any tokenizer.

The subject's last token is found in the tokenisation of the *full* string (never by tokenising
the pieces separately and adding lengths, which breaks on SentencePiece leading-space pieces and
on BPE merges across the boundary): with a fast tokenizer from its character offsets, otherwise
by tokenising the text up to the subject's end and checking that it is a prefix of the full
tokenisation. Every position is checked against the subject's text. Batches are right-padded, so
positions in the batch equal positions in the unpadded sequences.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import torch
from torch import Tensor

_log = logging.getLogger(__name__)

_SPECIALS: "weakref.WeakKeyDictionary[Any, Tuple[int, int]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SubjectPrompt:
    """A tokenised prompt and the positions of its subject's first and last tokens."""

    ids: Tuple[int, ...]
    first: int
    last: int


def special_counts(tokenizer: Any) -> Tuple[int, int]:
    """How many special tokens the tokenizer adds before and after a text (e.g. (1, 0) for BOS)."""
    try:
        return _SPECIALS[tokenizer]
    except (KeyError, TypeError):
        pass
    probe = "Paris"
    with_sp = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    start = next(
        (i for i in range(len(with_sp) - len(plain) + 1) if with_sp[i : i + len(plain)] == plain),
        0,
    )
    counts = (start, len(with_sp) - start - len(plain))
    try:
        _SPECIALS[tokenizer] = counts
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return counts


def encode(tokenizer: Any, text: str) -> List[int]:
    """Token ids of ``text`` with the tokenizer's leading special tokens (BOS) but without any it
    appends (EOS), as a causal LM sees a prompt."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    _, after = special_counts(tokenizer)
    return ids[: len(ids) - after] if after else ids


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _locate_with_offsets(tokenizer: Any, text: str, start: int, end: int) -> SubjectPrompt:
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    _, after = special_counts(tokenizer)
    if after:
        ids, offsets = ids[:-after], offsets[:-after]
    hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hits:
        raise ValueError(f"no token overlaps the subject span [{start}, {end}) of {text!r}")
    covered = text[offsets[hits[0]][0] : offsets[hits[-1]][1]]
    if _squash(text[start:end]) not in _squash(covered):
        raise ValueError(f"tokens {hits[0]}..{hits[-1]} of {text!r} cover {covered!r}, not the subject")
    return SubjectPrompt(tuple(ids), hits[0], hits[-1])


def _locate_by_prefix(tokenizer: Any, text: str, start: int, end: int) -> SubjectPrompt:
    ids = encode(tokenizer, text)
    upto_end = encode(tokenizer, text[:end])
    upto_start = encode(tokenizer, text[:start]) if start > 0 else encode(tokenizer, "")
    last = len(upto_end) - 1
    # All but the last piece must agree: a merge across the end can change only that one token.
    if last < 0 or ids[:last] != upto_end[:last]:
        raise ValueError(f"tokenising {text[:end]!r} alone does not give a prefix of the tokens of {text!r}")
    first = min(len(upto_start), last)
    return SubjectPrompt(tuple(ids), first, last)


def locate_subject(tokenizer: Any, text: str, start: int, end: int) -> SubjectPrompt:
    """Tokenise ``text`` and find the subject occupying characters ``[start, end)``.

    Raises ``ValueError`` if the tokens found do not cover the subject.
    """
    if getattr(tokenizer, "is_fast", False):
        return _locate_with_offsets(tokenizer, text, start, end)
    found = _locate_by_prefix(tokenizer, text, start, end)
    subject = text[start:end].strip()
    spelled = tokenizer.decode(list(found.ids[found.first : found.last + 1]))
    unk = getattr(tokenizer, "unk_token", None)
    # Without offsets the decoded tokens are the only evidence; an unknown piece cannot be compared.
    if subject and not (unk and unk in spelled) and _squash(subject) not in _squash(spelled):
        raise ValueError(
            f"tokens {found.first}..{found.last} of {text!r} spell {spelled!r}, not the subject {subject!r}"
        )
    return found


def _squash(s: str) -> str:
    # Decoders differ in how they render leading-space pieces; compare without white space.
    return "".join(s.split())


def target_ids(tokenizer: Any, prompt_text: str, target_text: str) -> List[int]:
    """Token ids of ``target_text`` as they follow ``prompt_text`` (the tokens the model must emit).

    Taken from the tokenisation of the whole string so that leading-space pieces come out as the
    model would see them.
    """
    full = encode(tokenizer, prompt_text + target_text)
    pre = encode(tokenizer, prompt_text)
    if len(full) > len(pre) and full[: len(pre)] == pre:
        return full[len(pre) :]
    _log.info("the tokens of %r are not a prefix of the tokens of %r; tokenising the target on its own",
              prompt_text, prompt_text + target_text)
    ids = list(tokenizer(target_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target_text!r} tokenises to nothing")
    return ids


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of shape (len(seqs), max_len), padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
