#!/usr/bin/env bash
# Builds gradq with its tests and runs them (the README's test command; .ci/run calls it).
#   bash tools/test.sh                against Debian's LibTorch 1.13, in build/: everything, every test
#   bash tools/test.sh --torch2       against PyTorch 2.x's libtorch (.venv-torch2), in build-torch2/:
#                                     what this second line alone proves (below)
#   bash tools/test.sh --torch2 --ops of that, only the op library's part (.ci/run runs it by default);
#                                     needs the Debian line's CLI (build/gradq, GRADQ_PYTHON_TEST_CLI)
#   bash tools/test.sh --torch2 --all the second line, everything, every test
# GRADQ_CUDA defaults to on when nvcc is found: the CUDA kernels are compiled (sm_80, sm_90,
# warnings as errors) and their GPU tests skip themselves without a GPU.
#
# What the second line alone proves, and so what --torch2 builds and runs: the op library built
# against 2.x, with the CUDA op registration when the wheel has CUDA and nvcc is present (only this
# line can compile csrc/ops/ops_cuda.cpp), and its suites test_ops and test_ops_cuda (registration
# checked without a device; the GPU cases skip themselves); the Python test (a packed checkpoint
# runs in PyTorch 2.x with torch.ops.load_library, which only this line's op library can do); the
# library and the CLI built against 2.x, and test_zoo (every command on TorchScript files written by
# PyTorch 2.x and 1.13, with gradq's graph code running on 2.x's TorchScript). The other suites test
# gradq's own logic through the same sources, and the Debian line runs them all; the kernels' test
# uses no torch. --ops leaves out the library, the CLI and test_zoo (most of the build: 1322 of
# the 1454 s of a measured --torch2, docs/BENCHMARKS.md, "What CI pays") and runs the Python test
# with the Debian line's CLI writing the checkpoint and the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
line_args=()
targets=()  # empty: all
tests=""    # empty: all
case "${1:-}" in
  "") build=${GRADQ_BUILD_DIR:-build}; bash tools/setup.sh ;;
  --torch2)
    build=${GRADQ_BUILD_DIR:-build-torch2}
    ops_tests='test_ops|test_ops_cuda_registration|test_ops_cuda_gpu|python_packed_checkpoint'
    case "${2:-}" in
      "") targets=(gradq_ops gradq_cli test_ops test_zoo); tests="^($ops_tests|test_zoo)\$"
          line_args+=(-DGRADQ_PYTHON_TEST_CLI=) ;;  # this build's CLI, also after an --ops run
      --ops)
        cli=${GRADQ_PYTHON_TEST_CLI:-$PWD/build/gradq}
        if [ ! -x "$cli" ]; then
          echo "test: --torch2 --ops runs the Python test with the Debian line's CLI, and $cli is not there:" \
               "run bash tools/test.sh first, or set GRADQ_PYTHON_TEST_CLI" >&2
          exit 1
        fi
        line_args+=(-DGRADQ_PYTHON_TEST_CLI="$cli")
        targets=(gradq_ops test_ops); tests="^($ops_tests)\$" ;;
      --all) line_args+=(-DGRADQ_PYTHON_TEST_CLI=) ;;
      *) echo "test: unknown option '$2' after --torch2 (expected none, --ops or --all)" >&2; exit 1 ;;
    esac
    bash tools/setup.sh --torch2
    python=$PWD/.venv-torch2/bin/python
    line_args+=(-DCMAKE_PREFIX_PATH="$("$python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
                -DGRADQ_PYTHON="$python") ;;
  *) echo "test: unknown option '$1' (expected none or --torch2)" >&2; exit 1 ;;
esac
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${line_args[@]}" ${GRADQ_CMAKE_ARGS:-}
if [ ${#targets[@]} -gt 0 ]; then
  # test_ops_cuda exists only where the CUDA op registration is compiled (CMakeLists.txt). grep
  # reads all of ninja's output: with -q it could stop early, and pipefail would see ninja's SIGPIPE.
  if ninja -C "$build" -t targets all | grep '^test_ops_cuda:' >/dev/null; then
    targets+=(test_ops_cuda)
  else
    echo "test: no CUDA op registration in this configuration (it needs nvcc and a CUDA-enabled torch)"
  fi
  cmake --build "$build" -j"$(nproc)" --target "${targets[@]}"
else
  cmake --build "$build" -j"$(nproc)"
fi
cd "$build"
ctest -j"$(nproc)" --output-on-failure --timeout 900 ${tests:+-R "$tests"}
