#!/usr/bin/env bash
# Issue 14's comparison on user-style zoo models: trains two of them briefly on TinyStories
# (tools/train_zoo.py, a few minutes each on one core) and runs the default `gradq sweep` on each:
# the allocator and the progressive search at every default budget beside the uniform baselines,
# held-out perplexity on the embedded text. Prints each sweep's table (sweep.md).
#
#   bash tools/bench_zoo.sh
#   env: GRADQ (the CLI, default build/gradq), THREADS (default 1), WORK (default a new temp dir),
#        MODELS (default "meta_swiglu_gqa gpt2"), STEPS (training steps, default 800),
#        SWEEP (extra sweep options, e.g. "--budgets 0.05")
# Needs Debian's python3-torch and python3-sentencepiece for the training.
set -euo pipefail
cd "$(dirname "$0")/.."
gradq=${GRADQ:-build/gradq}
threads=${THREADS:-1}
work=${WORK:-$(mktemp -d /tmp/gradq_bench_zoo.XXXXXX)}
models=${MODELS:-"meta_swiglu_gqa gpt2"}
steps=${STEPS:-800}
[ -x "$gradq" ] || { echo "bench_zoo: $gradq not found (build first)" >&2; exit 1; }
mkdir -p "$work"
for m in $models; do
  if [ ! -f "$work/$m.pt" ]; then
    /usr/bin/python3 tools/train_zoo.py --out "$work" --steps "$steps" --models "$m" | tee "$work/$m.train.txt"
  fi
done
for m in $models; do
  # Resumable: a second run skips the points already there.
  /usr/bin/time -v "$gradq" sweep --model "$work/$m.pt" --out "$work/sweep-$m" --threads "$threads" ${SWEEP:-} \
    > "$work/sweep-$m.txt" 2> "$work/sweep-$m.err" || { tail -5 "$work/sweep-$m.err" >&2; exit 1; }
  echo "## $m ($work/$m.pt): $(grep -h 'best validation' "$work/$m.train.txt" 2>/dev/null | sed 's/.*: //')"
  awk -F': ' '/User time/{u=$2} /System time/{s=$2} /Maximum resident/{r=$2} END{printf "sweep: %.0f CPU s, peak RSS %.0f MiB\n\n", u+s, r/1024}' \
    "$work/sweep-$m.err"
  cat "$work/sweep-$m/sweep.md"
  echo
done
