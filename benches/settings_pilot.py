"""Single-edit figures per edit setting: what each setting buys in efficacy and costs in interference.

    python benches/settings_pilot.py --cases 12 --out benches/results/collapse/settings_pilot.json \
        '{}' '{"early_stop_loss": 0.5}' '{"clamp_norm_factor": 1.5, "early_stop_loss": 0.5}'

Every configuration (a JSON object of :class:`fastrome.EditConfig` fields) edits the same CounterFact
dev cases one at a time, each edit scored with ROME's figures and undone (``evaluate_edits``). Per
configuration it reports the mean efficacy / paraphrase / neighbourhood scores, δ's norm relative to
the unedited value, the interference ‖Λ‖²·uᵀCu (the mean squared change of the layer's output on
ordinary keys, which is what accumulates over a sequential run), ‖ΔW‖/‖W‖, steps and seconds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import config_sweep

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def recording(edit, records: list):
    """``edit`` that also appends each report's record to ``records``."""

    def wrapped(request, **kw):
        report = edit(request, **kw)
        records.append(report.records[0])
        return report

    return wrapped


def main(argv=None) -> int:
    args = config_sweep.parse_args(
        __doc__, argv, lambda ap: ap.add_argument("--stats-tokens", type=int, default=1_000_000))
    import torch

    from fastrome import Editor
    from fastrome.evaluation.counterfact import load_counterfact
    from fastrome.evaluation.single import evaluate_edits
    from fastrome.models import load_model

    model, tok = load_model()
    cases = load_counterfact(DATA / "counterfact" / "counterfact_dev.json", limit=args.cases)
    rows = []
    for text in args.configs:
        cfg = json.loads(text)
        editor = Editor(model, tok, stats_tokens=args.stats_tokens, progress=False, policy="skip", **cfg)
        records: list = []
        editor.edit = recording(editor.edit, records)
        results = evaluate_edits(editor, cases)
        done = [r for r in records if r.edit_id is not None]  # applied, then undone by evaluate_edits

        def mean(values):
            values = [v for v in values if v == v]
            return statistics.fmean(values) if values else float("nan")

        row = {"config": cfg, "cases": len(results), "applied": len(done)}
        for key in ("efficacy_score", "efficacy_top1", "efficacy_magnitude", "paraphrase_score",
                    "neighborhood_score"):
            row[key] = mean([r.get(key, float("nan")) for r in results])
        row.update(
            delta_over_v=mean([r.delta_norm / r.v_init_norm for r in done]),
            interference=mean([r.interference for r in done]),
            update_ratio=mean([r.update_ratio for r in done]),
            steps=mean([r.steps for r in done]),
            seconds=mean([r.total_seconds for r in done]),
        )
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "stats_tokens": args.stats_tokens, "case_ids": [c.case_id for c in cases]}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
