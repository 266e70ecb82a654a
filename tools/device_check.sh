#!/usr/bin/env bash
# The GPU check (issue 15), for the device tool's machine: a CUDA GPU, PyTorch 2.x, CMake, nvcc and
# a C++ compiler, but no Debian packages; gradq's other dependencies come in .device-bundle/
# (tools/make_device_bundle.sh, carried with the device tool). Builds gradq against that machine's
# PyTorch, runs the CUDA tests (kernels and the CUDA ops), `gradq bench kernels --device gpu`, a
# stories260K quantize within +5% perplexity, and runs the packed checkpoint on the GPU through the
# CUDA ops against gradq's CPU logits. Writes $OUT/summary.md (each step: status, seconds, last
# lines) and $OUT/<step>.log. Steps after a failed build are reported as not run; the others run
# whatever happened before, so one run shows everything. Without a GPU the GPU steps report that
# there is none (as a failure: this check exists to run them).
#   OUT=/tmp/check bash tools/device_check.sh     (GRADQ_DEVICE_PYTHON: the Python with torch)
# Rehearsal on a machine without a GPU: GRADQ_DEVICE_PREBUILT=1 GRADQ_DEVICE_BUILD_DIR=build-torch2
# skips configure and build and runs the other steps with that build (tools/test.sh --torch2 --all's:
# plain --torch2 does not build test_kernels).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/device_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
python=${GRADQ_DEVICE_PYTHON:-python3}
build=${GRADQ_DEVICE_BUILD_DIR:-build-device}
summary=$out/summary.md
start_all=$(date +%s)
echo "# gradq device check, $(date -u '+%Y-%m-%d %H:%M UTC')" >"$summary"
echo >>"$summary"

# step NAME COMMAND...: runs the command, its output in $out/NAME.log, a line in the summary.
step() {
  local name=$1
  shift
  local t0=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 0 ] || status="FAILED (exit $rc)"
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
  "$build/gradq" quantize --max-ppl-increase 0.05 -o "$out/stories260K-q.pt" --report "$out/quantize_report.json"
}

packed_on_gpu() {
  gpu_present || { echo "no GPU visible to torch: the packed checkpoint cannot run on one"; return 1; }
  "$python" tests/python/test_packed_checkpoint.py "$build/gradq" "$build/libgradq_ops.so" "$out/packed" \
    "$("$python" -c 'import torch; print(torch.__version__.split("+")[0])')" cuda "$out/stories260K-q.pt"
}

step environment environment
if [ "${GRADQ_DEVICE_PREBUILT:-0}" = 1 ]; then
  echo "- configure, build: skipped (GRADQ_DEVICE_PREBUILT=1: using $build as built)" >>"$summary"
  built() { true; }
else
  built() { step configure configure && step build build_targets; }
fi
if built; then
  step gpu_tests gpu_tests
  step bench_kernels bench
  step quantize quantize && step packed_on_gpu packed_on_gpu
else
  echo "- gpu_tests, bench_kernels, quantize, packed_on_gpu: not run (the build failed)" >>"$summary"
fi
echo >>"$summary"
echo "total $(( $(date +%s) - start_all )) s" >>"$summary"
cat "$summary"
