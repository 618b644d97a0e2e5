"""Render a benchmark JSON (pytest-benchmark + fastrome provenance) as markdown tables.

    python benches/render.py benches/results/ops_cpu.json

Rates: FLOP/s for the second moment (counted as the full 2·n·d² product, so a kernel that skips the
lower triangle can exceed the GEMM ceiling's rate on that measure), bytes/s for the solve and the
write, each also as a fraction of the ceiling measured in the same run.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.loads(open(path, encoding="utf-8").read())
    meta = data.get("fastrome", {})
    rows = [(b["extra_info"], b["stats"]["median"]) for b in data["benchmarks"]]
    gemm = next((info["flop"] / t for info, t in rows if info["op"] == "ceiling" and "GEMM" in info["impl"]), None)
    copy = next((info["bytes"] / t for info, t in rows if info["op"] == "ceiling" and info["impl"] == "copy"), None)
    print(f"Device: {meta.get('device')} ({meta.get('threads')} threads), torch {meta.get('torch')}, "
          f"fastrome {meta.get('version')} @ {meta.get('commit', '')[:10]}, {meta.get('date')}")
    if gemm and copy:
        print(f"Ceilings measured in the same run: GEMM {gemm / 1e12:.3f} TFLOP/s, copy {copy / 1e9:.1f} GB/s\n")
    stats = [(info, t) for info, t in rows if info["op"] == "stats"]
    if stats:
        render_stats(stats)
    edits = [(info, t) for info, t in rows if info["op"] == "edit"]
    if edits:
        render_edits(edits)
    groups = defaultdict(list)
    for info, t in rows:
        if info["op"] not in ("ceiling", "stats", "edit"):
            groups[(info["op"], tuple(info["shape"]), info.get("dtype", ""))].append((info, t))
    for (op, shape, dtype), items in groups.items():
        ref = next((t for info, t in items if info["impl"] == "reference"), None)
        print(f"**{op}** shape {list(shape)} {dtype}\n")
        print("| implementation | median ms | rate | of ceiling | vs reference |")
        print("|---|---|---|---|---|")
        for info, t in sorted(items, key=lambda it: it[1]):
            if "flop" in info:
                rate, ceil = info["flop"] / t, gemm
                rate_s = f"{rate / 1e12:.3f} TFLOP/s"
            else:
                rate, ceil = info["bytes"] / t, copy
                rate_s = f"{rate / 1e9:.1f} GB/s"
            frac = f"{rate / ceil:.0%}" if ceil else "-"
            vs = f"{ref / t:.2f}×" if ref else "-"
            name = info["impl"] + (" (+fp32 master)" if info.get("master") else "")
            print(f"| {name} | {t * 1e3:.3f} | {rate_s} | {frac} | {vs} |")
        print()


def render_stats(rows) -> None:
    """Statistics passes: tokens per second (every layer's statistics over the same tokens) and the
    ratio to the published procedure measured in the same run."""
    by_layers = defaultdict(list)
    for info, t in rows:
        by_layers[tuple(info["layers"])].append((info, t))
    for layers, items in by_layers.items():
        info0 = items[0][0]
        ref = next((t for info, t in items if info["impl"].startswith("reference")), None)
        print(f"**statistics pass**, {info0['model']}, layers {list(layers)}, {info0['tokens']:,} tokens\n")
        print("| implementation | median s | tokens/s | vs reference |")
        print("|---|---|---|---|")
        for info, t in sorted(items, key=lambda it: it[1]):
            vs = f"{ref / t:.2f}×" if ref else "-"
            print(f"| {info['impl']} | {t:.2f} | {info['tokens'] / t:,.0f} | {vs} |")
            if 5 in layers and len(layers) == 1 and not info["impl"].startswith("reference"):
                print(f"|  ↳ projected for 44M tokens | {44e6 / info['tokens'] * t / 60:.1f} min | | |")
        print()


def render_edits(rows) -> None:
    """Per-edit seconds (a round edits ``edits`` records; median round / edits), the phases, steps,
    peak memory, and the ratio to the reference ROME (published, original keys) of the same run."""
    info0 = rows[0][0]
    ref = next((t for info, t in rows if info["impl"] == "reference (original)"), None)
    print(f"**per edit**, {info0['model']}, layer {info0['layer']}, {info0['edits']} edits per round\n")
    print("| implementation | s / edit | edits / s | values s | steps / edit | peak GPU GiB | vs reference |")
    print("|---|---|---|---|---|---|---|")
    for info, t in sorted(rows, key=lambda it: -it[1]):
        per = t / info["edits"]
        vs = f"{ref / t:.2f}×" if ref else "-"
        peak = f"{info['peak_gib']:.1f} ({info['peak_gib'] / info['weights_gib']:.2f}× weights)" if "peak_gib" in info \
            else "-"
        values = info.get("phases", {}).get("values")
        values_s = f"{values:.2f}" if values is not None else "-"
        print(f"| {info['impl']} | {per:.2f} | {1 / per:.2f} | {values_s} | {info.get('steps_per_edit', 0):.1f} | "
              f"{peak} | {vs} |")
    print()


if __name__ == "__main__":
    main(sys.argv[1])
