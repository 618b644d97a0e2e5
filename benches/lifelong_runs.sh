#!/usr/bin/env bash
# The lifelong-editing runs (SmolLM2-135M fp32, CPU), by name; each is resumable: run the same line
# again after an interruption and it goes on from its journal. From the repository root:
#   bash benches/lifelong_runs.sh NAME [EDITS]        # e.g. bash benches/lifelong_runs.sh memory 500
#   bash benches/lifelong_runs.sh --list
#   FORK=memory1+mpes+dual+spread FORK_AT=700 bash benches/lifelong_runs.sh memory1+mpes+dual+spread+refresh25 1000
# Results go to benches/results/lifelong/<EDITS>/<NAME>; compare them with
#   python benches/collapse_report.py --compare benches/results/lifelong/500/*
# Two runs may share the 2-core machine (THREADS=1 each); seconds per edit then compare only
# between runs that shared it the same way.
set -euo pipefail
# Every setting is spelled out from classic ROME (--classic), so a run means the same whatever the
# library's defaults are; `default` is fastrome's default configuration.
# Dual runs with a memory started before memory_dual_keys existed kept both keys; they say so, so
# that they resume whatever the library's default is now.
declare -A SETTINGS=(
  [default]=""
  [classic]="--classic"                                              # one-shot ROME, each edit alone
  [memory]="--classic --set memory_beta=0.02"
  [mpes]="--classic --set mpes_checks=2"
  [value-norm]="--classic --set value_norm=cap --set value_norm_factor=2"
  [memory+mpes]="--classic --set memory_beta=0.02 --set mpes_checks=2"
  [memory+mpes-p50]="--classic --set memory_beta=0.02 --set mpes_checks=2 --set mpes_min_prob=0.5"
  [memory+mpes-p50+spread]="--classic --set memory_beta=0.02 --set mpes_checks=2 --set mpes_min_prob=0.5 --set spread=4"
  [memory+mpes+dual]="--classic --mode dual --set memory_beta=0.02 --set mpes_checks=2 --set memory_dual_keys=both"
  [memory+mpes-p50+dual]="--classic --mode dual --set memory_beta=0.02 --set mpes_checks=2 --set mpes_min_prob=0.5 --set memory_dual_keys=both"
  [memory+mpes+spread]="--classic --set memory_beta=0.02 --set mpes_checks=2 --set spread=4"
  [memory+mpes+dual+spread]="--classic --mode dual --set memory_beta=0.02 --set mpes_checks=2 --set spread=4 --set memory_dual_keys=both"
  [memory1+mpes+dual+spread]="--classic --mode dual --set memory_beta=0.02 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=4"
  [mpes+dual+spread]="--classic --mode dual --set mpes_checks=2 --set spread=4"
  # the default with δ shrunk to the least fraction that keeps the target on top once MPES fires
  [memory1+mpes-shrink+dual+spread]="--classic --mode dual --set memory_beta=0.02 --set memory_dual_keys=prompt --set mpes_checks=2 --set mpes_shrink=true --set spread=4"
  # the default with ENCORE's norm constraint: α·I in the solve, α = 0.1 of C's mean diagonal
  [memory1+mpes+dual+spread+norm0.1]="--classic --mode dual --set memory_beta=0.02 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=4 --set norm_alpha=0.1"
  # the default with a softer memory: β·kᵀC⁻¹k ≈ 9.5 and ≈ 1 instead of ≈ 95, so earlier keys are held
  # less tightly and fill less of the key space (d = 1,536) that later edits must fit in
  [memory1-beta0.002+mpes+dual+spread]="--classic --mode dual --set memory_beta=0.002 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=4"
  [memory1-beta0.0002+mpes+dual+spread]="--classic --mode dual --set memory_beta=0.0002 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=4"
  # ngd with each edit shared among 6 layers (1-6) instead of 4
  [ngd+spread6]="--classic --mode dual --set memory_beta=0.02 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=6 --set v_optimizer=normalized --set v_lr=0.25 --set v_steps=40"
  # the default with the memory's keys re-read from the edited model every 25 edits
  [memory1+mpes+dual+spread+refresh25]="--classic --mode dual --set memory_beta=0.02 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=4 --set memory_refresh_every=25"
  # the default with an edit refused when its interference at a layer is above 10 × the median of the earlier edits' there
  [memory1+mpes+dual+spread+guard10]="--classic --mode dual --set memory_beta=0.02 --set memory_dual_keys=prompt --set mpes_checks=2 --set spread=4 --set max_interference_spike=10"
  [memory+spread]="--classic --set memory_beta=0.02 --set spread=4"
  # AlphaEdit's projection; SmolLM2 layer 6 has no eigenvalue of C below 0.18 of the mean (0.5 keeps 568 of 1536)
  [null-space+memory]="--classic --set null_space=0.5 --set memory_beta=0.02"
  # AlphaEdit's published closed form (one mean key, projector P, earlier keys, Λ = R), the ablation's
  # reference baseline; the memory only keeps the earlier keys in step with the journal (β unused)
  [alphaedit]="--classic --set null_space=0.5 --set memory_beta=0.02 --set update_form=alphaedit"
  [original]="--classic --mode original"
)
if [[ "${1:-}" == "--list" || $# -lt 1 ]]; then
  for name in "${!SETTINGS[@]}"; do echo "$name: ${SETTINGS[$name]:-(the library defaults)}"; done | sort
  exit 0
fi
name=$1 edits=${2:-500} dataset=${DATASET:-counterfact}
[[ -v "SETTINGS[$name]" ]] || { echo "unknown run '$name' (--list shows them)" >&2; exit 2; }
root=benches/results/lifelong/$edits
[[ "$dataset" == counterfact ]] || root=benches/results/lifelong/$dataset-$edits
# FORK=NAME FORK_AT=N: start from run NAME's first N records (same root) and go on with this run's
# settings, into <name>-from<N>
fork=()
out=$root/$name
if [[ -n "${FORK:-}" ]]; then
  fork=(--fork "$root/$FORK" --fork-at "${FORK_AT:?FORK_AT=N is needed with FORK}")
  out=$root/$name-from$FORK_AT
fi
# shellcheck disable=SC2086
exec "${PYTHON:-python}" benches/collapse_study.py --dataset "$dataset" --edits "$edits" --every "${EVERY:-50}" \
  --retention-sample "${SAMPLE:-200}" --threads "${THREADS:-1}" --stats-tokens 1000000 \
  ${SETTINGS[$name]} "${fork[@]}" --out "$out"
