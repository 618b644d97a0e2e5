"""Which texts carry a lifelong run's perplexity rise: per-text perplexities after M edits.

ME-PPL_50 and the WikiText-2 figure of ``collapse_study.py`` are means over texts of each text's
perplexity, so a few texts whose perplexity explodes can move them as much as a rise of every
text. This rebuilds the model after M edits of a run from its journal (the factors replayed in
order with the write kernel, as resume does) and reports, per text set, the headline change of the
mean, the median and 90th percentile of the per-text ratios to the unedited model, the largest
ratio and the share of the mean's rise that the three texts with the largest rise carry.

    python benches/ppl_texts.py benches/results/lifelong/1000/memory1+mpes+dual+spread --at 700 750 800
    python benches/ppl_texts.py RUN --at 750 760 770 780 790 800 --json out.json   # where a jump happens
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, Sequence

import torch


def summarise(base: Sequence[float], now: Sequence[float], top: int = 3) -> Dict[str, float]:
    """Figures of per-text perplexities ``now`` against ``base`` (same texts, same order)."""
    if len(base) != len(now) or not base:
        raise ValueError(f"base, now: expected two equal, non-empty lists, got {len(base)} and {len(now)}")
    ratios = sorted(n / b for b, n in zip(base, now))
    rises = sorted((n - b for b, n in zip(base, now)), reverse=True)
    total = sum(rises)
    q90 = ratios[min(len(ratios) - 1, int(round(0.9 * (len(ratios) - 1))))]
    worst = max(range(len(base)), key=lambda i: now[i] / base[i])
    return {
        "mean_change": sum(now) / sum(base) - 1.0,
        "median_ratio": statistics.median(ratios),
        "p90_ratio": q90,
        "max_ratio": ratios[-1],
        "worst_text": worst,
        f"top{top}_share": sum(rises[:top]) / total if total > 0 else float("nan"),
        "n": len(base),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--at", type=int, nargs="+", required=True, help="edit counts")
    ap.add_argument("--wikitext", type=int, default=24, help="WikiText-2 paragraphs (as collapse_study.py)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from collapse_study import DATA, wikitext_paragraphs  # beside this script

    from fastrome.adapter import ModelAdapter
    from fastrome.journal import Journal, apply_factors, edit_groups
    from fastrome.metrics import perplexities
    from fastrome.models import load_model

    sets = {
        "ME-PPL_50": [r["Text"] for r in json.loads((DATA / "me_ppl" / "ME-PPL_50.json").read_text())],
        "WikiText-2": wikitext_paragraphs(DATA / "corpus" / "wiki.test.raw", args.wikitext),
    }
    journal = Journal.read(args.run / "journal")
    groups = edit_groups(journal.entries)
    model, tok = load_model()
    adapter = ModelAdapter(model)
    base = {name: perplexities(model, tok, texts) for name, texts in sets.items()}
    result: Dict[str, object] = {"run": str(args.run), "torch": torch.__version__, "points": []}
    done = 0
    for upto in sorted(m for m in args.at if m <= len(groups)):
        with torch.no_grad():  # fp32 weights: no master; the next groups' factors on top, in order
            for group in groups[done:upto]:
                for e in group:
                    apply_factors(adapter.weight(e.layer), e.u, e.lam, None)
        done = upto
        point: Dict[str, object] = {"edits": upto}
        for name, texts in sets.items():
            now = perplexities(model, tok, texts)
            point[name] = {**summarise(base[name], now), "per_text": now}
        result["points"].append(point)
        print(f"{upto} edits done", file=sys.stderr, flush=True)
    result["base"] = base

    print(f"{args.run}: per-text perplexity against the unedited model")
    print("| edits | texts | mean (headline) | median ratio | 90th pct ratio | largest ratio (text) "
          "| top-3 share of the rise |")
    print("|---|---|---|---|---|---|---|")
    for point in result["points"]:
        for name in sets:
            s = point[name]
            print(f"| {point['edits']} | {name} | {100 * s['mean_change']:+.0f}% | {s['median_ratio']:.2f} | "
                  f"{s['p90_ratio']:.2f} | {s['max_ratio']:.1f} (#{s['worst_text']}) | {s['top3_share']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
