#!/usr/bin/env bash
# Sweep benchmark: one `gradq sweep` over BUDGETS against one `gradq quantize` per budget, on the
# embedded stories260K with default options. Prints the wall times and their ratio, and checks
# that each sweep point's plan is byte-identical to the separate run's (the sweep only shares work,
# it must not change results).
#
#   tools/bench_sweep.sh [BUDGETS] [extra options for both commands...]
#   env: GRADQ (the CLI, default build/gradq), THREADS (default 1)
set -euo pipefail
gradq=${GRADQ:-build/gradq}
threads=${THREADS:-1}
budgets=${1:-0.01,0.02,0.05,0.1,0.2}
shift || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
now() { date +%s.%N; }

start=$(now)
"$gradq" sweep --out "$out/sweep" --budgets "$budgets" --baselines none --threads "$threads" "$@" \
  > "$out/sweep.txt" 2> "$out/sweep.err" || { tail -5 "$out/sweep.err" >&2; exit 1; }
sweep_s=$(awk "BEGIN{print $(now) - $start}")

separate_s=0
identical=0
compared=0
count=0
for b in ${budgets//,/ }; do
  start=$(now)
  rc=0
  "$gradq" quantize --max-ppl-increase "$b" -o "$out/q.pt" --save-plan "$out/plan-$b.json" --threads "$threads" "$@" \
    > "$out/q.txt" 2> "$out/q.err" || rc=$?
  [[ $rc == 0 || $rc == 2 ]] || { tail -5 "$out/q.err" >&2; exit 1; }
  t=$(awk "BEGIN{print $(now) - $start}")
  separate_s=$(awk "BEGIN{print $separate_s + $t}")
  count=$((count + 1))
  # A budget that cannot be met writes no plan; the sweep still records the point.
  if [[ -f $out/plan-$b.json ]]; then
    compared=$((compared + 1))
    cmp -s "$out/plan-$b.json" "$out/sweep/points/budget-$b.plan.json" && identical=$((identical + 1))
  fi
  echo "budget $b: separate run ${t} s" >&2
done

echo "| budgets | sweep (s) | $count separate quantize runs (s) | sweep / separate | identical plans (of the runs that wrote one) |"
echo "|---|---|---|---|---|"
printf '| %s | %.1f | %.1f | %.2f | %d of %d |\n' "$budgets" "$sweep_s" "$separate_s" \
  "$(awk "BEGIN{print $sweep_s / $separate_s}")" "$identical" "$compared"
echo
grep -E '^\| budget-|^Time:' "$out/sweep.txt"
