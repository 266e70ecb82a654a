#!/usr/bin/env bash
# The GPU check (issue 15), for the device tool's machine: a CUDA GPU, PyTorch 2.x, CMake, nvcc and
# a C++ compiler, but no Debian packages; gradq's other dependencies come in .device-bundle/
# (tools/make_device_bundle.sh, carried with the device tool). Builds gradq against that machine's
# PyTorch, runs the CUDA tests (kernels and the CUDA ops), `gradq bench kernels --device gpu`, a
# stories260K quantize within +5% perplexity on the GPU (--device), runs that packed checkpoint on the
# GPU through the CUDA ops against gradq's CPU logits, and quantizes a random-init model with
# Llama-7B's layer shapes on the GPU (bf16; uniform b4g128, then a KL-budgeted search). Writes
# $OUT/summary.md (each step: status, seconds, last lines; the GPU memory peak) and $OUT/<step>.log;
# the large models go to $GRADQ_DEVICE_SCRATCH (default /tmp/gradq-device-check). Each step has a
# time limit, so that one run fits the device tool's 10 minutes. Steps after a failed build are
# reported as not run; the others run whatever happened before, so one run shows everything. Without
# a GPU the GPU steps report that there is none (as a failure: this check exists to run them).
#   OUT=/tmp/check bash tools/device_check.sh     (GRADQ_DEVICE_PYTHON: the Python with torch)
# GRADQ_DEVICE_STEPS="gpu_tests bench_kernels" runs only the named steps after the build (a kernel
# change: its tests and its timings, in a third of the time).
# GRADQ_DEVICE_STEPS=scans (named only, never by default) runs issue 13's depth and width scans on the
# GPU: tools/bench_depth.sh with --device, the default search under --max-kl 0.05, local measurement,
# shapes GRADQ_DEVICE_SHAPES (default "256x4 256x16 128x4 512x4 1024x4"), the table in $OUT/scans.md.
# Rehearsal on a machine without a GPU: GRADQ_DEVICE_PREBUILT=1 GRADQ_DEVICE_BUILD_DIR=build
# GRADQ_DEVICE=cpu skips configure and build and runs the other steps with that build on the CPU
# (GRADQ_DEVICE_LAYERS=1 makes the Llama-7B-shaped model smaller).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/device_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${GRADQ_DEVICE_PYTHON:-python3}
build=${GRADQ_DEVICE_BUILD_DIR:-build-device}
device=${GRADQ_DEVICE:-cuda}
scratch=${GRADQ_DEVICE_SCRATCH:-/tmp/gradq-device-check}
mkdir -p "$scratch"
summary=$out/summary.md
start_all=$(date +%s)
echo "# gradq device check, $(date -u '+%Y-%m-%d %H:%M UTC')" >"$summary"
echo >>"$summary"

# step NAME LIMIT COMMAND...: runs the command for at most LIMIT seconds (less when the whole check's
# GRADQ_DEVICE_SECONDS, default 540, would run out first; not at all under 20), its output in
# $out/NAME.log, a line in the summary.
deadline=$((SECONDS + ${GRADQ_DEVICE_SECONDS:-540}))
step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${GRADQ_DEVICE_STEPS:-}" ] && [[ " $GRADQ_DEVICE_STEPS " != *" $name "* ]] &&
    [ "$name" != environment ] && [ "$name" != configure ] && [ "$name" != build ]; then
    echo "- **$name**: not run (GRADQ_DEVICE_STEPS=$GRADQ_DEVICE_STEPS)" >>"$summary"
    return 1
  fi
  local left=$((deadline - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "- **$name**: not run (the check's ${GRADQ_DEVICE_SECONDS:-540} s are spent)" >>"$summary"
    echo "$name: not run (out of time)"
    return 1
  fi
  local t0=$SECONDS
  # The steps are this script's functions: timeout runs them in a bash that has them (export -f below).
  timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 0 ] || status="FAILED (exit $rc)"
  [ $rc -eq 124 ] && status="FAILED (over its $limit s)"
  echo "- **$name**: $status, $((SECONDS - t0)) s" >>"$summary"
  tail -n 6 "$out/$name.log" | sed 's/^/      /' >>"$summary"
  echo "$name: $status ($((SECONDS - t0)) s)"
  return $rc
}

gpu_present() { "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

environment() {
  nvidia-smi || echo "nvidia-smi: not available"
  nvcc --version | tail -n 1
  cmake --version | head -n 1
  c++ --version | head -n 1
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "devices", torch.cuda.device_count())'
  echo "cores $(nproc)"
}

configure() {
  local torch_prefix bundle arch
  torch_prefix=$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || return 1
  bundle=$PWD/.device-bundle/usr
  [ -d "$bundle" ] || { echo "no .device-bundle/: run tools/make_device_bundle.sh and carry .device-bundle"; return 1; }
  arch=$(cat .device-bundle/multiarch)
  # Only this GPU's architecture (nvidia-smi's compute capability, e.g. 9.0 -> 90): one nvcc pass per kernel.
  local cc
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$torch_prefix;$bundle" \
    -Dfmt_DIR="$bundle/lib/$arch/cmake/fmt" -DGTest_DIR="$bundle/lib/$arch/cmake/GTest" \
    -Dcxxopts_DIR="$bundle/lib/cmake/cxxopts" -Dnlohmann_json_DIR="$bundle/share/cmake/nlohmann_json" \
    -DGRADQ_SENTENCEPIECE_LIBRARY="$bundle/lib/$arch/libsentencepiece.so.0" \
    -DGRADQ_SENTENCEPIECE_INCLUDE="$bundle/include" \
    -DGRADQ_CUDA=ON -DGRADQ_CUDA_ARCHITECTURES="${cc:-90}" -DGRADQ_PYTHON="$(command -v "$python")"
}

build_targets() {
  cmake --build "$build" -j"$(nproc)" --target gradq_cli gradq_load_check test_kernels test_ops test_ops_cuda
}

# The GPU tests must run here: a skip is a failure of this check.
gpu_tests() {
  gpu_present || { echo "no GPU visible to torch: the GPU tests cannot run"; return 1; }
  (cd "$build" && ctest --output-on-failure -R 'test_kernels|test_ops' --timeout 300) || return 1
  ! grep -q "no CUDA device" "$build/Testing/Temporary/LastTest.log"
}

bench() {
  gpu_present || { echo "no GPU visible to torch: nothing to benchmark"; return 1; }
  "$build/gradq" bench kernels --device gpu --json "$out/bench_kernels.json"
}

quantize() {
  "$build/gradq" quantize --device "$device" --max-ppl-increase 0.05 -o "$out/stories260K-q.pt" \
    --report "$out/quantize_report.json"
}

# A random-init llama2.c model with Llama-7B's layer shapes (dim 4096, hidden 11008, 32 heads,
# vocabulary 32000), converted to bf16 and quantized on $device: uniform b4g128, then the default
# search under a KL budget with 8 and 4 bits at group 128. Random weights: the numbers say what it
# costs, not what quality a real model keeps.
llama7b_shapes() {
  local m=$scratch/llama7b_l${GRADQ_DEVICE_LAYERS:-2}
  "$python" tools/make_random_llama2c.py --backend torch --dim 4096 --hidden 11008 --heads 32 \
    --layers "${GRADQ_DEVICE_LAYERS:-2}" --vocab 32000 --seq-len 2048 -o "$m.bin" || return 1
  "$build/gradq" convert "$m.bin" --dtype bf16 -o "$m.pt" || return 1
  rm -f "$m.bin"
  local data=(--model "$m.pt" --device "$device" --ctx 128 --calib-windows 4 --fit-windows 4 --eval-windows 8 --batch 4)
  local t0=$SECONDS
  "$build/gradq" quantize "${data[@]}" --uniform b4g128 -o "$m-b4g128.pt" --report "$out/llama7b_uniform.json" || return 1
  echo "uniform b4g128: $((SECONDS - t0)) s"
  t0=$SECONDS
  "$build/gradq" quantize "${data[@]}" --max-kl 0.05 --bits 8,4 --group-sizes 128 -o "$m-search.pt" \
    --report "$out/llama7b_search.json" || return 1
  echo "search --max-kl 0.05: $((SECONDS - t0)) s"
  ls -l "$m.pt" "$m-b4g128.pt" "$m-search.pt"
}

# Issue 13's depth and width scans (docs/BENCHMARKS.md, "Cost against depth"), run on $device.
scans() {
  GRADQ="$build/gradq" WORK="$scratch/scans" MEASURES=local SEARCH="--search allocate --max-kl 0.05" \
    EXTRA="--device $device" SHAPES="${GRADQ_DEVICE_SHAPES:-256x4 256x16 128x4 512x4 1024x4}" \
    bash tools/bench_depth.sh | tee "$out/scans.md"
  [ "${PIPESTATUS[0]}" -eq 0 ]
}

# nvidia-smi's used memory every 250 ms while the check runs; the summary gives the peak.
gpu_memory_sampler() {
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$out/gpu_memory.log" 2>/dev/null &
  sampler=$!
}

packed_on_gpu() {
  gpu_present || { echo "no GPU visible to torch: the packed checkpoint cannot run on one"; return 1; }
  "$python" tests/python/test_packed_checkpoint.py "$build/gradq" "$build/libgradq_ops.so" "$out/packed" \
    "$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')" cuda "$out/stories260K-q.pt"
}

export -f gpu_present environment configure build_targets gpu_tests bench quantize packed_on_gpu llama7b_shapes scans
export out python build device scratch
sampler=
gpu_memory_sampler
step environment 60 environment
if [ "${GRADQ_DEVICE_PREBUILT:-0}" = 1 ]; then
  echo "- configure, build: skipped (GRADQ_DEVICE_PREBUILT=1: using $build as built)" >>"$summary"
  built() { true; }
else
  built() { step configure 120 configure && step build 300 build_targets; }
fi
if built; then
  step gpu_tests 120 gpu_tests
  step bench_kernels 90 bench
  step quantize 150 quantize && step packed_on_gpu 60 packed_on_gpu
  step llama7b_shapes 240 llama7b_shapes
  [[ " ${GRADQ_DEVICE_STEPS:-} " == *" scans "* ]] && step scans 420 scans
else
  echo "- gpu_tests, bench_kernels, quantize, packed_on_gpu, llama7b_shapes: not run (the build failed)" >>"$summary"
fi
if [ -n "$sampler" ]; then
  kill "$sampler" 2>/dev/null
  echo "- GPU memory used, peak of nvidia-smi's 250 ms samples: $(sort -n "$out/gpu_memory.log" | tail -n 1) MiB" >>"$summary"
fi
echo >>"$summary"
echo "total $(( $(date +%s) - start_all )) s" >>"$summary"
cat "$summary"
