"""Whether a lifelong run's earlier edits still fire at their subjects, read back from its journal.

    python benches/key_drift.py benches/results/lifelong/1000/RUN [--at 250 500 750 1000] \
        [--every 25] [--stats-tokens 1000000] [--json OUT]

An edit at layer l writes ``λ uᵀ`` for the key k its subject had then. Later spread edits rewrite
the layers below l, so the subject's key at l moves, and the edit memory holds the layer's output
only at the keys it stored. For every written layer, after the first M edits of the journal (the
model rebuilt from its factors) and for every ``--every``-th earlier edit i, with k_i its stored
prompt key and k_M the key its plain prompt has now:

- ``moved``: ``‖k_M − k_i‖_C⁻¹ / ‖k_i‖_C⁻¹``, the key's change measured as the solve sees it;
- ``fires``: ``u_iᵀk_M / u_iᵀk_i``, how much of its own write edit i still makes at its subject (1:
  all of it);
- ``later at stored``: ``‖Σ_{i<j≤M} λ_j u_jᵀk_i‖ / ‖λ_i u_iᵀk_i‖``, what the later edits add at the
  stored key, relative to edit i's own write (what the memory is there to keep small);
- ``later at now``: the same at k_M, the key the subject actually has.

Medians over the sampled edits. Reads the journal, the statistics cache and the unedited model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch


def prompt_key(entry) -> torch.Tensor:
    """The stored key of the edit's plain prompt (k_u in the dual mode, k̄ otherwise), fp64."""
    return entry.key.reshape(-1, entry.key.shape[-1])[-1].double()


def drift_rows(rows, keys_now: torch.Tensor, C_chol: torch.Tensor, upto: int, sample: List[int]) -> Dict[str, float]:
    """Median figures (see the module docstring) for the edits ``sample`` (indices into ``rows``)
    after the first ``upto`` of ``rows``; ``keys_now``: (len(sample), d) their keys now."""
    U = torch.stack([e.u.double() for e in rows[:upto]])
    L = torch.stack([e.lam.double() for e in rows[:upto]])
    moved, fires, at_stored, at_now = [], [], [], []
    for k_now, i in zip(keys_now.double(), sample):
        k_i, u_i, lam_i = prompt_key(rows[i]), rows[i].u.double(), rows[i].lam.double()
        own = float(u_i @ k_i)
        own_write = float(lam_i.norm()) * abs(own)

        def c_inv_norm(x: torch.Tensor) -> float:
            return float(torch.linalg.solve_triangular(C_chol, x[:, None], upper=False).norm())

        moved.append(c_inv_norm(k_now - k_i) / c_inv_norm(k_i))
        fires.append(float(u_i @ k_now) / own)
        later_U, later_L = U[i + 1:], L[i + 1:]
        at_stored.append(float((later_L.t() @ (later_U @ k_i)).norm()) / own_write)
        at_now.append(float((later_L.t() @ (later_U @ k_now)).norm()) / own_write)
    med = statistics.median
    return {"edits": upto, "sampled": len(sample), "moved": med(moved), "fires": med(fires),
            "later_at_stored": med(at_stored), "later_at_now": med(at_now)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--at", type=int, nargs="+", default=[250, 500, 750, 1000])
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--stats-tokens", type=int, default=1_000_000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from edit_capacity import layer_rows, open_run  # beside this script

    from fastrome.keys import capture_at
    from fastrome.prompts import subject_prompt
    from fastrome.requests import parse_requests
    from fastrome.tokens import pad_id

    journal, adapter, tok, layers, stats = open_run(args.run, args.stats_tokens)
    per_layer = {layer: layer_rows(journal, layer) for layer in layers}
    n_edits = min(len(rows) for rows in per_layer.values())
    chol = {}
    for layer in layers:
        C = stats.pop(layer).matrix.double()
        ridge = 1e-6 * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=C.dtype)
        chol[layer] = torch.linalg.cholesky(C + ridge)
        del C
    base = {layer: adapter.weight(layer).detach().clone() for layer in layers}
    pad = pad_id(tok)
    result = {"run": str(args.run), "torch": torch.__version__, "layers": {str(layer): [] for layer in layers}}
    for upto in sorted(m for m in args.at if m <= n_edits):
        with torch.no_grad():  # the model after the first `upto` edits, from the journal's factors
            for layer in layers:
                rows = per_layer[layer][:upto]
                U = torch.stack([e.u for e in rows]).to(base[layer].dtype)
                L = torch.stack([e.lam for e in rows]).to(base[layer].dtype)
                adapter.weight(layer).copy_(base[layer] + L.t() @ U)
        sample = list(range(0, upto, args.every))
        for layer in layers:
            rows = per_layer[layer]
            requests = parse_requests([rows[i].request for i in sample])
            prompts = [subject_prompt(tok, r.prompt, r.subject) for r in requests]
            keys_now = capture_at(adapter, layer, prompts, pad)[0]
            result["layers"][str(layer)].append(drift_rows(rows, keys_now, chol[layer], upto, sample))
    with torch.no_grad():
        for layer in layers:
            adapter.weight(layer).copy_(base[layer])

    print(f"{args.run}: every {args.every}th earlier edit, medians")
    print("| layer | edits | sampled | moved (C⁻¹ norm) | fires | later at stored key | later at key now |")
    print("|---|---|---|---|---|---|---|")
    for layer in layers:
        for r in result["layers"][str(layer)]:
            print(f"| {layer} | {r['edits']} | {r['sampled']} | {r['moved']:.3f} | {r['fires']:.2f} | "
                  f"{r['later_at_stored']:.2f} | {r['later_at_now']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
