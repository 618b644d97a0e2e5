"""Edit quality of fastrome's fast value optimisation against the reference ROME, on the same records.

    python benches/quality_parity.py --records 20 --out benches/results/quality_parity_cpu.json

Each CounterFact dev record is edited on its own (the weights are restored after every edit) by
the reference (``fastrome.baselines.rome``) and by fastrome, both in ``consistent`` mode with the
same templates and statistics, then scored with ROME's CounterFact metrics. Also: fastrome in
batched mode (values of ``--batch`` records optimised together, updates applied one after another)
against strict sequential editing over the same records, scored after the whole sequence.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=20)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import fastrome
    from fastrome import Editor
    from fastrome.adapter import ModelAdapter
    from fastrome.baselines.rome import ReferenceRome
    from fastrome.evaluation.counterfact import evaluate_case, load_counterfact, summarize
    from fastrome.models import load_model
    from fastrome.stats import load_or_compute

    cases = load_counterfact(DATA / "counterfact" / "counterfact_dev.json", limit=args.records)
    model, tok = load_model()
    adapter = ModelAdapter(model)
    layer = adapter.default_layer()
    C = load_or_compute(adapter, tok, [layer], progress=False)[layer].matrix
    base = adapter.weight(layer).detach().clone()

    def reset():
        with torch.no_grad():
            adapter.weight(layer).copy_(base)

    def editor():
        ed = Editor(model, tok, stats={layer: C}, layer=layer, mode="consistent", policy="force", progress=False,
                    cache_dir=False)
        ed.use_templates(templates)
        return ed

    templates = Editor(model, tok, stats={layer: C}, layer=layer, progress=False).templates()
    rome = ReferenceRome(model, tok, layer, C, templates, mode="consistent")
    rows = {"reference": [], "fastrome": []}
    seconds = {"reference": 0.0, "fastrome": 0.0}
    for i, case in enumerate(cases):
        for name in ("reference", "fastrome"):
            reset()
            t0 = time.perf_counter()
            if name == "reference":
                rome.edit(case.request)
            else:
                editor().edit(case.request)
            seconds[name] += time.perf_counter() - t0
            rows[name].append(evaluate_case(model, tok, case))
        reset()
        print(f"{i + 1}/{len(cases)} case {case.case_id}: " + ", ".join(
            f"{n} ES {rows[n][-1]['efficacy_score']:.0f} PS {rows[n][-1]['paraphrase_score']:.2f}" for n in rows
        ), flush=True)

    # batched against strict sequential over the same records, scored after the whole sequence
    sequence = {}
    for name, batch in (("sequential", 1), (f"batched {args.batch}", args.batch)):
        reset()
        ed = editor()
        t0 = time.perf_counter()
        ed.edit([c.request for c in cases], batch_size=batch)
        took = time.perf_counter() - t0
        sequence[name] = {"seconds_per_edit": took / len(cases), **summarize([evaluate_case(model, tok, c)
                                                                                for c in cases])}
    reset()

    out = {
        "date": time.strftime("%Y-%m-%d"), "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "fastrome": fastrome.__version__,
        "model": "SmolLM2-135M-Instruct fp32", "layer": layer, "case_ids": [c.case_id for c in cases],
        "single_edits": {n: {"seconds_per_edit": seconds[n] / len(cases), **summarize(r)} for n, r in rows.items()},
        "per_case": rows, "sequence": sequence,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    for n, s in out["single_edits"].items():
        print(f"{n:10s} ES {100 * s['efficacy_score']:.1f}  PS {100 * s['paraphrase_score']:.1f}  "
              f"NS {100 * s['neighborhood_score']:.1f}  {s['seconds_per_edit']:.1f} s/edit")
    for n, s in sequence.items():
        print(f"{n:14s} after {len(cases)} edits: ES {100 * s['efficacy_score']:.1f}  "
              f"PS {100 * s['paraphrase_score']:.1f}  NS {100 * s['neighborhood_score']:.1f}  "
              f"{s['seconds_per_edit']:.1f} s/edit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
