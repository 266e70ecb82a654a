#!/usr/bin/env bash
# Builds gradq with AddressSanitizer and UBSan (GRADQ_SANITIZE, gcc as the normal build) and runs
# test suites under them; .ci/run calls it after tools/test.sh.
# Suites: test_ops and test_quant, the quantization core (packing, bit layouts, the per-instruction-set
# hot loops, the custom ops): the code with the most pointer arithmetic, and the suites that need only
# libgradq_ops, so the build stays small (no libgradq, no CLI). The libgradq suites (tokenizer, data,
# eval, model, report, readers) are to follow: see tests/fuzz/README.md, "Sanitizer build".
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
build=${GRADQ_SANITIZE_BUILD_DIR:-build-asan}
suites=(test_ops test_quant)
# No CUDA: the kernels' GPU tests cannot run here and their host code is in the normal build.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRADQ_SANITIZE=ON -DGRADQ_CUDA=OFF \
  ${GRADQ_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)" --target "${suites[@]}"
cd "$build"
# Every ASan and UBSan report, leaks included, fails the suite (-fno-sanitize-recover).
export ASAN_OPTIONS=abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest -j"$(nproc)" --output-on-failure --timeout 900 -R "^($(IFS='|'; echo "${suites[*]}"))\$"
