#!/usr/bin/env bash
# Builds gradq with AddressSanitizer and UBSan (GRADQ_SANITIZE, gcc as the normal build) and runs
# the fast test suites under them; .ci/run calls it after tools/test.sh. Which suites, and why, is
# in tests/fuzz/README.md ("Sanitizer build").
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
build=${GRADQ_SANITIZE_BUILD_DIR:-build-asan}
suites=(test_common test_data test_eval test_model test_ops test_readers test_report test_tokenizer)
# No CUDA: the kernels' GPU tests cannot run here and their host code is in the normal build.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRADQ_SANITIZE=ON -DGRADQ_CUDA=OFF \
  ${GRADQ_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)" --target "${suites[@]}"
cd "$build"
# libtorch keeps its operator registry and thread pools until exit without freeing them: leak
# reports would name libtorch, never gradq, so LeakSanitizer is off; every other ASan and UBSan
# check aborts the test (-fno-sanitize-recover).
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest -j"$(nproc)" --output-on-failure --timeout 900 -R "^($(IFS='|'; echo "${suites[*]}"))\$"
