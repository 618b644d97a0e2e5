"""How large a value change each value-optimisation setting needs: ‖δ‖/‖v_init‖ per request.

    python benches/value_size.py --cases 12 --out benches/results/lifelong/value_size.json \
        '{}' '{"mpes_shrink": true}' '{"v_optimizer": "normalized", "mpes_shrink": true}'

The write an edit makes has an energy on ordinary text of about ‖δ‖²/(kᵀC⁻¹k) (the least the
solve allows), so over a long run the damage grows with the mean of ‖δ‖² at a fixed key. This runs
only the value optimisation (no statistics, no write) of the first CounterFact dev records at the
edited layer with the model's own context templates, for each configuration (a JSON object of
:class:`fastrome.EditConfig` fields), and reports the mean, median and mean square of ‖δ‖/‖v_init‖,
the optimisation steps, how many requests stopped with the target on top, and seconds per request.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import config_sweep

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main(argv=None) -> int:
    args = config_sweep.parse_args(__doc__, argv, lambda ap: ap.add_argument("--layer", type=int, default=6))
    import torch

    import fastrome
    from fastrome.adapter import ModelAdapter
    from fastrome.config import make_config
    from fastrome.requests import parse_requests
    from fastrome.values import optimize_value

    model, tok = fastrome.load_model()
    adapter = ModelAdapter(model)
    records = json.loads((DATA / "counterfact" / "counterfact_dev.json").read_text())[: args.cases]
    requests = parse_requests(records)
    templates = fastrome.Editor(model, tok, stats="identity", progress=False).templates()
    rows = []
    for text in args.configs:
        settings = json.loads(text)
        cfg = make_config(**settings).resolve(adapter.family)
        sizes, steps, on_top = [], [], 0
        t0 = time.perf_counter()
        for req in requests:
            res = optimize_value(adapter, tok, args.layer, req, templates, cfg)
            sizes.append(float(res.delta.norm() / res.v_init.norm()))
            steps.append(res.steps)
            on_top += res.stop_reason == "top"
        row = {"config": settings, "cases": len(requests), "delta_over_v_mean": statistics.fmean(sizes),
               "delta_over_v_median": statistics.median(sizes),
               "delta_over_v_mean_square": statistics.fmean(x * x for x in sizes),
               "steps": statistics.fmean(steps), "stopped_on_top": on_top,
               "seconds": (time.perf_counter() - t0) / len(requests),
               "case_ids": [r.case_id for r in requests], "delta_over_v": sizes}
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if k not in ("case_ids", "delta_over_v")}), flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "layer": args.layer, "model": "SmolLM2-135M-Instruct fp32"}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
