"""Where an edit's effect goes: replays a run's journal and, for every edit, compares what its own
write and the later writes deliver at the remembered key k̄ and at the unprefixed prompt's key k_u.

    python benches/edit_transfer.py benches/results/lifelong/pilot100/memory+mpes \
        --out benches/results/lifelong/pilot100/transfer_memory+mpes.json

Per edit, as fractions of its own change ``r = ΔW_i k̄_i``: ``own_plain`` = rᵀ(ΔW_i k_u)/‖r‖² (1 when
the write reaches the unprefixed prompt in full), ``later_mean`` / ``later_plain`` = ‖Σ_{j>i} ΔW_j k‖/‖r‖
at k̄ and k_u (how much the later edits moved it), the cosine of k̄ and k_u, and whether the target is
the top continuation of the unprefixed prompt after the whole run. Grouped by kept / lost. Also the
energy uᵀCu of the write exact at both keys over that of the write exact at k̄ (the dual mode's cost).
Single-layer runs only; the statistics come from the run's cache (FASTROME_CACHE).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a collapse_study run folder (with journal/)")
    ap.add_argument("--out", default=None, help="JSON file for the per-edit rows and the summary")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from fastrome import Editor
    from fastrome.journal import Journal
    from fastrome.keys import capture_at
    from fastrome.metrics import score_targets
    from fastrome.models import load_model
    from fastrome.prompts import subject_prompt
    from fastrome.requests import parse_requests
    from fastrome.tokens import pad_id

    run = Path(args.run)
    journal = Journal.read(run / "journal")
    entries = list(journal)
    layers = {e.layer for e in entries}
    if len(layers) != 1:
        raise SystemExit(f"{run}: edits at layers {sorted(layers)}; this reads single-layer runs")
    (layer,) = layers
    model, tok = load_model()
    stats = json.loads((run / "run.json").read_text()).get("stats", "")  # "layer 6: 1,000,000 tokens of ..."
    tokens = int(stats.split(" tokens")[0].split(": ")[-1].replace(",", "")) if " tokens" in stats else None
    ed = Editor(model, tok, layer=layer, stats_tokens=tokens, progress=False)
    C = ed.solver(layer)  # the plain statistics' solver: its inverse is (C + ridge·I)⁻¹
    A_inv = C.inverse.to(torch.float64)
    reqs = [parse_requests([e.request])[0] for e in entries]
    with torch.no_grad():
        k_plain, _ = capture_at(ed.adapter, layer, [subject_prompt(tok, q.prompt, q.subject) for q in reqs],
                                pad_id(tok))
        k_plain = k_plain.double()
        weight = ed.adapter.weight(layer)
        for e in entries:
            weight.add_(torch.outer(e.lam, e.u).to(weight.dtype))
        top = [s.is_top for s in score_targets(model, tok, [q.text for q in reqs], [q.target_text() for q in reqs])]
    U = torch.stack([e.u for e in entries]).double()
    L = torch.stack([e.lam for e in entries]).double()
    K = torch.stack([e.key.reshape(-1, e.key.shape[-1])[0] for e in entries]).double()
    rows = []
    n = len(entries)
    for i in range(n):
        r = L[i] * float(U[i] @ K[i])
        later = slice(i + 1, n)
        at_mean = (L[later] * (U[later] @ K[i])[:, None]).sum(0)
        at_plain = (L[later] * (U[later] @ k_plain[i])[:, None]).sum(0)
        own = L[i] * float(U[i] @ k_plain[i])
        two = torch.stack([K[i], k_plain[i]])
        G = two @ A_inv @ two.T
        ones = torch.ones(2, dtype=torch.float64)
        rows.append({
            "edit": i, "case_id": reqs[i].case_id, "top": bool(top[i]),
            "subject_first": reqs[i].prompt.startswith("{}"),
            "own_plain": float(own @ r / (r @ r)),
            "later_mean": float(at_mean.norm() / r.norm()), "later_plain": float(at_plain.norm() / r.norm()),
            "cos": float(K[i] @ k_plain[i] / (K[i].norm() * k_plain[i].norm())),
            "dual_energy_ratio": float(ones @ torch.linalg.solve(G, ones)) * float(K[i] @ A_inv @ K[i]),
        })
    summary = {}
    for name, group in (("kept", [x for x in rows if x["top"]]), ("lost", [x for x in rows if not x["top"]])):
        if group:
            summary[name] = {"n": len(group), **{k: statistics.median(x[k] for x in group) for k in (
                "own_plain", "later_mean", "later_plain", "cos", "dual_energy_ratio")},
                "subject_first": sum(x["subject_first"] for x in group)}
    summary["dual_energy_ratio_median"] = statistics.median(x["dual_energy_ratio"] for x in rows)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "layer": layer, "summary": summary, "rows": rows},
                                             indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
