#!/usr/bin/env bash
# Builds gradq with its tests and runs them all (the README's test command; .ci/run calls it).
# GRADQ_CUDA defaults to on when nvcc is found: the CUDA kernels are compiled (sm_80, sm_90,
# warnings as errors) and their GPU tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
build=${GRADQ_BUILD_DIR:-build}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${GRADQ_CMAKE_ARGS:-}
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest -j"$(nproc)" --output-on-failure --timeout 900
