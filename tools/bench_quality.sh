#!/usr/bin/env bash
# Quality benchmark: bits per weight of gradq's searched plan against every uniform configuration
# (bits x group size, same rounding) that meets the same held-out perplexity budget, on the
# embedded stories260K. Prints a markdown table; the numbers come from `gradq quantize` itself.
#
#   tools/bench_quality.sh [BUDGET] [extra gradq quantize options...]
#   env: GRADQ (the CLI, default build/gradq), THREADS (default 1)
set -euo pipefail
gradq=${GRADQ:-build/gradq}
threads=${THREADS:-1}
budget=${1:-0.05}
shift || true
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# "bits per weight: 5.302 ..." and "held-out (...): perplexity a -> b (+4.56%), ..." of the summary.
summary_bits() { sed -n 's/^bits per weight: \([0-9.]*\).*/\1/p' "$1"; }
summary_ppl() { sed -n 's/^held-out.*(\([-+0-9.]*\)%), KL.*/\1/p' "$1"; }

echo "| configuration | bits/weight | held-out ppl change | within +$(awk "BEGIN{print $budget*100}")% |"
echo "|---|---|---|---|"
best_bits=""
best_spec=""
for bits in 8 4 3 2; do
  for group in 128 64 32 16; do
    spec="b${bits}g${group}"
    "$gradq" quantize --uniform "$spec" -o "$out/u.pt" --threads "$threads" "$@" > "$out/s.txt" 2> "$out/err.txt" ||
      { cat "$out/err.txt" >&2; exit 1; }
    b=$(summary_bits "$out/s.txt")
    p=$(summary_ppl "$out/s.txt")
    ok=$(awk "BEGIN{print ($p <= $budget*100) ? \"yes\" : \"no\"}")
    echo "| uniform $spec | $b | $p% | $ok |"
    if [[ $ok == yes ]] && { [[ -z $best_bits ]] || awk "BEGIN{exit !($b < $best_bits)}"; }; then
      best_bits=$b
      best_spec=$spec
    fi
  done
done
start=$(date +%s.%N)
"$gradq" quantize --max-ppl-increase "$budget" -o "$out/q.pt" --threads "$threads" "$@" > "$out/s.txt" 2> "$out/err.txt" ||
  { cat "$out/err.txt" >&2; exit 1; }
seconds=$(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}")
b=$(summary_bits "$out/s.txt")
p=$(summary_ppl "$out/s.txt")
echo "| **gradq search** | **$b** | $p% | $(awk "BEGIN{print ($p <= $budget*100) ? \"yes\" : \"no\"}") |"
echo
if [[ -n $best_bits ]]; then
  echo "best uniform within budget: $best_spec at $best_bits bits/weight; gradq: $b ($(awk "BEGIN{printf \"%.1f\", 100*(1-$b/$best_bits)}")% fewer bits)"
else
  echo "no uniform configuration meets the budget; gradq: $b bits/weight"
fi
echo "gradq quantize took $seconds s on $threads thread(s)"
