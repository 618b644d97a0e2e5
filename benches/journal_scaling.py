"""How perplexity depends on the size of the accumulated updates: replay a run's journal scaled.

    python benches/journal_scaling.py benches/results/collapse/consistent --counts 100,193 \
        --scales 1,0.5,0.25 --out benches/results/collapse/journal_scaling.json

For each count N and scale α the edited layer is set to W₀ + α·Σᵢ₌₁..ᴺ Λᵢuᵢᵀ (the run's first N
rank-one factors, all scaled by α) and ME-PPL_50 and the WikiText-2 paragraphs of the collapse study
are measured. α = 1 reproduces the run's own checkpoints; smaller α shows what gentler edits (a
smaller residual v* − Wk, hence smaller Λ) would have cost over the same N edits.

``--drift`` measures no perplexity: it prints ‖Σᵢ₌₁..ᴺ Λᵢuᵢᵀ‖/‖W₀‖ per edited layer for each count N
of requests (a spread edit's layers count as one request), for runs at one layer or several.

``--without-interference-spikes`` leaves out the edits that the default interference-spike rule
(``CollapseRules``: more than 10× the median interference of the edits kept before) would have
undone. It approximates a run with that rule on ``undo``: the later edits' factors were computed
against a model that still had the left-out ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collapse_study import DATA, wikitext_paragraphs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a collapse-study folder (its journal/ is read)")
    ap.add_argument("--counts", default="100", help="comma-separated numbers of edits")
    ap.add_argument("--scales", default="1,0.5,0.25", help="comma-separated scales α")
    ap.add_argument("--without-interference-spikes", action="store_true",
                    help="leave out the edits the interference-spike rule flags")
    ap.add_argument("--drift", action="store_true",
                    help="only how far each edited layer has moved after each count, no perplexity")
    ap.add_argument("--wikitext", type=int, default=24)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fastrome.adapter import ModelAdapter
    from fastrome.journal import Journal
    from fastrome.metrics import mean_perplexity
    from fastrome.models import load_model

    model, tok = load_model()
    ppl_texts = [r["Text"] for r in json.loads((DATA / "me_ppl" / "ME-PPL_50.json").read_text())]
    wiki = wikitext_paragraphs(DATA / "corpus" / "wiki.test.raw", args.wikitext)
    entries = Journal(Path(args.run) / "journal").entries
    if not entries:
        raise SystemExit(f"{args.run}: the journal holds no edits")
    if args.drift:
        rows = drift_rows(entries, ModelAdapter(model), [int(c) for c in args.counts.split(",")])
        for row in rows:
            print(json.dumps(row), flush=True)
        if args.out:
            meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "run": str(args.run)}
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        return 0
    dropped = interference_spikes(entries) if args.without_interference_spikes else []
    if dropped:
        print(json.dumps({"left_out": dropped}), flush=True)
    skip = {d["position"] for d in dropped}
    layers = {e.layer for e in entries}
    if len(layers) != 1:
        raise SystemExit(f"{args.run}: edits at several layers {sorted(layers)}; expected one")
    weight = ModelAdapter(model).weight(layers.pop())
    w0 = weight.detach().clone()
    rows = []
    for n in [int(c) for c in args.counts.split(",")]:
        if not 0 < n <= len(entries):
            raise SystemExit(f"--counts: {n} is not in 1..{len(entries)} (edits in the journal)")
        kept = [e for i, e in enumerate(entries[:n]) if i not in skip]
        U = torch.stack([e.u for e in kept])
        L = torch.stack([e.lam for e in kept])
        total = L.T @ U  # Σ Λᵢuᵢᵀ, (d_out, d_in)
        for alpha in [float(s) for s in args.scales.split(",")]:
            with torch.no_grad():
                weight.copy_((w0.float() + alpha * total).to(weight.dtype))
            row = {"edits": n, "scale": alpha, "ppl": mean_perplexity(model, tok, ppl_texts),
                   "wikitext_ppl": mean_perplexity(model, tok, wiki),
                   "change_ratio": float((alpha * total).norm() / w0.float().norm())}
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    with torch.no_grad():
        weight.copy_(w0)
        base = {"ppl": mean_perplexity(model, tok, ppl_texts), "wikitext_ppl": mean_perplexity(model, tok, wiki)}
    print(json.dumps({"unedited": base}), flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "run": str(args.run)}
        Path(args.out).write_text(json.dumps({"meta": meta, "unedited": base, "left_out": dropped, "rows": rows},
                                             indent=1))
    return 0


def drift_rows(entries, adapter, counts) -> list:
    """``{"edits": N, "drift": {layer: ‖Σ Λᵢuᵢᵀ‖/‖W₀‖}}`` over the first N requests, for each N
    (one pass over the journal, summing as it goes)."""
    import torch

    starts = [i for i, e in enumerate(entries) if not e.record.get("part")]  # a request's first entry
    for n in counts:
        if not 0 < n <= len(starts):
            raise SystemExit(f"--counts: {n} is not in 1..{len(starts)} (requests in the journal)")
    ends = {(starts[n] if n < len(starts) else len(entries)): n for n in counts}
    total, norm0, rows = {}, {}, []
    for i, e in enumerate(entries, start=1):
        if e.layer not in total:
            norm0[e.layer] = adapter.weight(e.layer).detach().double().norm()
            total[e.layer] = torch.zeros(adapter.weight(e.layer).shape, dtype=torch.float64)
        total[e.layer] += torch.outer(e.lam.double().flatten(), e.u.double().flatten())
        if i in ends:
            drift = {str(layer): round(float(t.norm() / norm0[layer]), 4) for layer, t in sorted(total.items())}
            rows.append({"edits": ends[i], "drift": drift})
    return sorted(rows, key=lambda row: row["edits"])


def interference_spikes(entries) -> list:
    """The journal positions the default interference-spike rule flags, judged in order against
    the edits kept before each (as a run on ``undo`` would have)."""
    from fastrome.sequential import CollapseRules

    rules, history, flagged = CollapseRules(), [], []
    for i, e in enumerate(entries):
        value = e.record.get("interference")
        if value is None:
            raise SystemExit(f"journal edit {e.edit_id} has no interference (an older run): cannot judge it")
        mid = rules.spike(value, history, rules.interference_spike)
        if mid is None:
            history.append(value)
        else:
            flagged.append({"position": i, "edit_id": e.edit_id, "case_id": e.request.get("case_id"),
                            "interference": value, "median_before": mid})
    return flagged


if __name__ == "__main__":
    raise SystemExit(main())
