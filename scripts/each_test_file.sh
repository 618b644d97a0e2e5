#!/usr/bin/env bash
# Runs every test file on its own, each in a fresh interpreter and in a random order (pytest-randomly),
# so that no file passes only because another one ran first and left something behind (a model
# edited in place, Triton imported one way or the other, a cache filled). Prints one line per file
# and the files that failed; exit status 1 if any did.
#   bash scripts/each_test_file.sh                 (python from $PYTHON, else python3)
#   bash scripts/each_test_file.sh tests/test_a.py tests/test_b.py
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/test_*.py)
failed=()
SECONDS=0
for f in "${files[@]}"; do
  start=$SECONDS
  out=$("$PY" -m pytest -q -p no:cacheprovider "$f" 2>&1)
  rc=$?
  summary=$(printf '%s\n' "$out" | tail -n 1)
  if [ $rc -ne 0 ]; then  # 5 (no tests collected) included
    failed+=("$f")
    printf '%s\n' "$out" | tail -n 30
  fi
  printf '%-45s %4ds  %s\n' "$f" $((SECONDS - start)) "$summary"
done
echo "each_test_file: ${#files[@]} file(s) in ${SECONDS}s, ${#failed[@]} failed${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
