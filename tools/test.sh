#!/usr/bin/env bash
# Builds gradq with its tests and runs them all (the README's test command; .ci/run calls it).
#   bash tools/test.sh            against Debian's LibTorch 1.13, in build/
#   bash tools/test.sh --torch2   against PyTorch 2.x's libtorch (.venv-torch2), in build-torch2/
# GRADQ_CUDA defaults to on when nvcc is found: the CUDA kernels are compiled (sm_80, sm_90,
# warnings as errors) and their GPU tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
line_args=()
case "${1:-}" in
  "") build=${GRADQ_BUILD_DIR:-build}; bash tools/setup.sh ;;
  --torch2)
    build=${GRADQ_BUILD_DIR:-build-torch2}
    bash tools/setup.sh --torch2
    python=$PWD/.venv-torch2/bin/python
    line_args=(-DCMAKE_PREFIX_PATH="$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
               -DGRADQ_PYTHON="$python") ;;
  *) echo "test: unknown option '$1' (expected none or --torch2)" >&2; exit 1 ;;
esac
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${line_args[@]}" ${GRADQ_CMAKE_ARGS:-}
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest -j"$(nproc)" --output-on-failure --timeout 900
