#!/usr/bin/env bash
# Builds gradq with AddressSanitizer and UBSan (GRADQ_SANITIZE, gcc as the normal build) and runs
# test suites under them; .ci/run calls it after tools/test.sh.
#   bash tools/test_sanitized.sh            the quantization core: test_ops and test_quant (CI)
#   bash tools/test_sanitized.sh --library  also the libgradq suites that do not run the CLI
#   bash tools/test_sanitized.sh --all      every suite: also those that run the CLI end to end
# CI's suites are packing, bit layouts, the per-instruction-set hot loops and the custom ops: the code
# with the most pointer arithmetic, which links only libgradq_ops (about 330 s of compile jobs). The
# readers of untrusted input are sanitized in the same CI run by the fuzz smoke run (tools/fuzz.sh).
# --library (the readers, tokenizer, data, model stages, evaluator, export and report suites) builds
# the whole library sanitized, about 1,950 s of compile jobs: with it CI took 2194 s, over its 30
# minutes (docs/BENCHMARKS.md, "What the default CI run pays"). --all adds the CLI and the suites that
# drive it, which run the same library code end to end at 2-3x the CPU under the sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."
all=0
suites=(test_ops test_quant)
case "${1:-}" in
  "") ;;
  --library) suites+=(test_common test_data test_eval test_export test_model test_readers test_report test_tokenizer) ;;
  --all) all=1 ;;
  *) echo "test_sanitized: unknown option '$1' (expected --library, --all or nothing)" >&2; exit 2 ;;
esac
bash tools/setup.sh
build=${GRADQ_SANITIZE_BUILD_DIR:-build-asan}
# No CUDA: the kernels' GPU tests cannot run here and their host code is in the normal build.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGRADQ_SANITIZE=ON -DGRADQ_CUDA=OFF \
  ${GRADQ_CMAKE_ARGS:-} >/dev/null
if [ "$all" = 1 ]; then
  cmake --build "$build" -j"$(nproc)"
else
  cmake --build "$build" -j"$(nproc)" --target "${suites[@]}"
fi
cd "$build"
# Every ASan and UBSan report, leaks included, fails the suite (-fno-sanitize-recover).
export ASAN_OPTIONS=abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
if [ "$all" = 1 ]; then
  ctest -j"$(nproc)" --output-on-failure --timeout 3600
else
  ctest -j"$(nproc)" --output-on-failure --timeout 900 -R "^($(IFS='|'; echo "${suites[*]}"))\$"
fi
