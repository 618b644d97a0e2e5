#!/usr/bin/env bash
# The ablation table (stdout) and plots (benches/results/lifelong/500/plots/) over the first 500
# CounterFact records; run from the repository root. See ablation.md beside this file.
set -euo pipefail
L=benches/results/lifelong C=benches/results/collapse
labels="classic ROME (today's default),classic + gentle values,classic + gentle values + spread 4,memory,MPES,\
value norm,combination,combination + spread (the default),AlphaEdit closed form,original keys,\
original keys + gentle values"
runs=("$L/500/classic" "$C/consistent_gentle" "$C/consistent_spread4" "$L/500/memory" "$L/500/mpes"
      "$L/500/value-norm" "$L/1000/memory+mpes+dual" "$L/500/memory1+mpes+dual+spread" "$L/500/alphaedit"
      "$L/500/original" "$C/original_gentle")
"${PYTHON:-python}" benches/collapse_report.py --compare --at 500 --labels "$labels" "${runs[@]}"
"${PYTHON:-python}" -m fastrome plot "${runs[@]}" --labels "$labels" --max-edits 500 \
  --title "Ablation: CounterFact 0-499, SmolLM2-135M" --out "$L/500/plots" >/dev/null
