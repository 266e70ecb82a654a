#!/usr/bin/env bash
# Builds the libFuzzer fuzzers of tests/fuzz (clang 14, ASan + UBSan) and runs each on its corpus.
#   bash tools/fuzz.sh                    every fuzzer for 2,000 executions (FUZZ_SMOKE_RUNS) from a fixed
#                                         seed: the smoke run of .ci/run. The seed makes a fresh build try
#                                         the same inputs every time, so CI does not draw new ones per run.
#   FUZZ_SECONDS=60 bash tools/fuzz.sh    every fuzzer for that many seconds
#   FUZZ_RUNS=1000000 bash tools/fuzz.sh  every fuzzer for that many executions (tests/fuzz/README.md)
#   bash tools/fuzz.sh fuzz_plan ...      only these fuzzers
#   bash tools/fuzz.sh --help             this text
# New inputs the fuzzers find go to a scratch corpus in the build directory, never into
# tests/fuzz/corpus; a finding leaves its input in $build/artifacts and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
all=(fuzz_text fuzz_llama2c fuzz_plan fuzz_policy fuzz_analysis fuzz_sweep fuzz_reference fuzz_torchscript)
for f in "$@"; do
  case "$f" in
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  esac
  # Names checked before the build, not after it.
  [[ " ${all[*]} " == *" $f "* ]] || { echo "fuzz: unknown fuzzer '$f' (expected some of: ${all[*]})" >&2; exit 1; }
done
bash tools/setup.sh --fuzz
build=${GRADQ_FUZZ_BUILD_DIR:-build-fuzz}
cmake -S . -B "$build" -G Ninja -DGRADQ_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  ${GRADQ_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)" --target gradq_fuzzers
fuzzers=("$@")
[ ${#fuzzers[@]} -gt 0 ] || fuzzers=("${all[@]}")
if [ -n "${FUZZ_RUNS:-}" ]; then
  limit=(-runs="$FUZZ_RUNS")
elif [ -n "${FUZZ_SECONDS:-}" ]; then
  limit=(-max_total_time="$FUZZ_SECONDS")
else
  limit=(-runs="${FUZZ_SMOKE_RUNS:-2000}" -seed=1)
fi
mkdir -p "$build/artifacts"
for f in "${fuzzers[@]}"; do
  corpus=tests/fuzz/corpus/${f#fuzz_}
  [ -d "$corpus" ] || { echo "fuzz: no corpus $corpus for $f" >&2; exit 1; }
  scratch=$build/corpus/${f#fuzz_}
  mkdir -p "$scratch"
  # libtorch's archive and pickle readers leak a few hundred bytes on every input they reject
  # (allocated and lost inside libtorch_cpu). libFuzzer then checks for leaks after every input,
  # which runs those two fuzzers at 4 executions per second: they run without leak checking, during
  # the run (-detect_leaks) and at exit (ASan's own check).
  leaks=1
  case "$f" in fuzz_reference|fuzz_torchscript) leaks=0 ;; esac
  start=$(date +%s)
  # -rss_limit_mb / -malloc_limit_mb: a reader must refuse an input that asks for absurd memory.
  if ! ASAN_OPTIONS=detect_leaks=$leaks "$build/tests/fuzz/$f" "${limit[@]}" -rss_limit_mb=2560 -malloc_limit_mb=1024 -timeout=20 \
       -detect_leaks=$leaks -print_final_stats=1 -artifact_prefix="$build/artifacts/$f-" "$scratch" "$corpus" >"$build/$f.log" 2>&1; then
    tail -n 60 "$build/$f.log" >&2
    echo "fuzz: $f found a problem (input in $build/artifacts, log $build/$f.log)" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$build/$f.log")
  echo "fuzz: $f: $runs executions in $(( $(date +%s) - start )) s, no finding"
done
