"""Edit quality per layer: single CounterFact edits at each candidate layer, restored after each.

For each layer and record: efficacy (the new target is the top continuation of the prompt),
generalisation (the same on the rephrased prompt), locality (the neighbouring prompt's greedy
answer is unchanged), the update's relative size and denominator. Statistics for all layers come
from one pass over the bundled corpus.

    python benches/layer_sweep.py --layers 2,3,4,5,6,8,11 --records 10 --out benches/results/layer_sweep_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fastrome
from fastrome import Editor
from fastrome.adapter import ModelAdapter
from fastrome.cache import cache_dir
from fastrome.metrics import score_targets
from fastrome.models import greedy_complete
from fastrome.stats import load_or_compute

DATA = Path(os.environ.get("FASTROME_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--layers", default="2,3,4,5,6,8,11")
    p.add_argument("--records", type=int, default=10)
    p.add_argument("--offset", type=int, default=0, help="first CounterFact dev record")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--mode", default="consistent")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    model, tok = fastrome.load_model(args.model)
    adapter = ModelAdapter(model)
    layers = [int(x) for x in args.layers.split(",")]
    records = json.loads((DATA / "counterfact" / "counterfact_dev.json").read_text())
    records = records[args.offset : args.offset + args.records]
    t0 = time.perf_counter()
    stats = load_or_compute(adapter, tok, layers, tokens=args.tokens, cache_root=cache_dir(), progress=True)
    stats_seconds = time.perf_counter() - t0

    prompts = [r["requested_rewrite"]["prompt"].replace("{}", r["requested_rewrite"]["subject"]) for r in records]
    targets = [r["requested_rewrite"]["target_new"]["str"] for r in records]
    loc_before = [greedy_complete(model, tok, r["locality_prompt"], 1) for r in records]
    rows = []
    summary = {}
    for layer in layers:
        editor = Editor(model, tok, stats={layer: stats[layer]}, layer=layer, mode=args.mode, policy="skip")
        original = adapter.weight(layer).detach().clone()
        per = []
        for rec, prompt, target, loc0 in zip(records, prompts, targets, loc_before):
            report = editor.edit(rec)
            r = report[0]
            eff, reph = score_targets(model, tok, [prompt, rec["rephrase_prompt"]], [target, target])
            loc = greedy_complete(model, tok, rec["locality_prompt"], 1)
            row = {
                "layer": layer, "case_id": rec["case_id"], "status": r.status,
                "efficacy": eff.is_top, "efficacy_nll": eff.mean_nll,
                "generalization": reph.is_top, "generalization_nll": reph.mean_nll,
                "locality_kept": loc == loc0, "update_ratio": r.update_ratio,
                "denominator_rel": r.denominator_rel, "steps": r.steps, "seconds": r.total_seconds,
            }
            per.append(row)
            rows.append(row)
            with torch.no_grad():
                adapter.weight(layer).copy_(original)
            print(json.dumps(row), file=sys.stderr)
        n = len(per)
        summary[layer] = {
            "efficacy": sum(r["efficacy"] for r in per) / n,
            "generalization": sum(r["generalization"] for r in per) / n,
            "locality_kept": sum(r["locality_kept"] for r in per) / n,
            "mean_generalization_nll": sum(r["generalization_nll"] for r in per) / n,
            "mean_update_ratio": sum(r["update_ratio"] for r in per) / n,
            "mean_steps": sum(r["steps"] for r in per) / n,
            "mean_seconds": sum(r["seconds"] for r in per) / n,
        }
    print("layer  efficacy  generalization  locality  gen-NLL  ‖ΔW‖/‖W‖  steps  s/edit")
    for layer, s in summary.items():
        print(f"{layer:5d}  {s['efficacy']:8.2f}  {s['generalization']:14.2f}  {s['locality_kept']:8.2f}  "
              f"{s['mean_generalization_nll']:7.2f}  {s['mean_update_ratio']:8.4f}  {s['mean_steps']:5.1f}  "
              f"{s['mean_seconds']:6.1f}")
    result = {
        "what": "single CounterFact dev edits per layer (weights restored between edits)",
        "model": args.model or fastrome.models.DEFAULT_MODEL, "mode": args.mode,
        "case_ids": [r["case_id"] for r in records], "stats_tokens": stats[layers[0]].count,
        "stats_seconds": stats_seconds, "summary": summary, "rows": rows,
        "versions": {"torch": torch.__version__, "fastrome": fastrome.__version__, "python": platform.python_version()},
        "device": "cpu", "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
