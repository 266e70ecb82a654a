#!/usr/bin/env bash
# The budget allocator against the progressive search (and any other configuration) on the embedded
# stories260K (or MODEL): bits per weight and held-out perplexity change from `gradq quantize` itself, then an
# independent evaluation of each quantized model on text no phase saw (the last 30% of the text's
# lines; calibration uses the first 10% of tokens and the held-out windows follow it), since
# verify-and-repair chooses its downgrades on the held-out windows. Prints a markdown table.
#
#   tools/bench_allocate.sh BUDGET "NAME|OPTIONS" ...
#   e.g. tools/bench_allocate.sh 0.05 "progressive|" "allocate gptq|--search allocate --method gptq"
#   env: GRADQ (default build/gradq), THREADS (default 1), WINDOWS (independent windows, default 256),
#        MODEL (a TorchScript model with the embedded tokenizer's vocabulary; default stories260K)
set -euo pipefail
gradq=${GRADQ:-build/gradq}
threads=${THREADS:-1}
windows=${WINDOWS:-256}
budget=$1
shift
assets=$(dirname "$0")/../third_party/assets
text=$assets/text/tinystories_val.txt
model=${MODEL:-$assets/stories260K/stories260K.bin}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
lines=$(wc -l < "$text")
tail -n $((lines * 3 / 10)) "$text" > "$out/independent.txt"

echo "| configuration | bits/weight | held-out ppl change, KL | independent ppl change, KL ($windows windows) | user CPU s |"
echo "|---|---|---|---|---|"
for config in "$@"; do
  name=${config%%|*}
  read -r -a opts <<< "${config#*|}"
  /usr/bin/time -f "%U" -o "$out/time" "$gradq" quantize --max-ppl-increase "$budget" --threads "$threads" \
    --model "$model" -o "$out/q.pt" "${opts[@]}" > "$out/s.txt" 2> "$out/err.txt" || { cat "$out/err.txt" >&2; exit 1; }
  bits=$(sed -n 's/^bits per weight: \([0-9.]*\).*/\1/p' "$out/s.txt")
  heldout=$(sed -n 's/^held-out.*(\([-+0-9.]*%\)), KL mean \([0-9.]*\).*/\1, \2/p' "$out/s.txt")
  "$gradq" eval --model "$out/q.pt" --reference "$model" --text "$out/independent.txt" \
    --max-windows "$windows" --threads "$threads" > "$out/e.txt" 2>&1 || { cat "$out/e.txt" >&2; exit 1; }
  ratio=$(sed -n 's/^PPL ratio *\([0-9.]*\).*/\1/p' "$out/e.txt")
  kl=$(sed -n 's/^mean KL (nats) *\([0-9.]*\).*/\1/p' "$out/e.txt")
  independent=$(awk "BEGIN{printf \"%+.2f%%, %s\", ($ratio - 1) * 100, \"$kl\"}")
  echo "| $name | $bits | $heldout | $independent | $(tail -1 "$out/time") |"
  rm -f "$out/q.pt"
done
