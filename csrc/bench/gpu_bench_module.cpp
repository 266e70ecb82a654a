// run_gpu_kernel_bench: loads the GPU part of `gradq bench kernels` (libgradq_cuda_bench.so, built
// from kernel_bench_gpu.cpp with GRADQ_CUDA) on first use, so that only a process that asks for a
// GPU bench maps the CUDA runtime and cuBLAS, and a gradq built with its kernels still starts where
// they are not installed.

#include <dlfcn.h>
#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "bench/kernel_bench_internal.h"
#include "common/runtime.h"

namespace gradq::bench::detail {

#if defined(GRADQ_CUDA_BENCH_INSTALL_NAME)
namespace {

using GpuBenchFn = void (*)(const KernelBenchOptions*, DeviceBench*, std::ostream*);

struct GpuBenchModule {
  GpuBenchFn run = nullptr;
  std::string error;  ///< why it could not be loaded, when run is null
};

// The first candidate that exists (the last one, the build's, when none does: dlopen names it in
// the error). Never dlclose()d: the CUDA runtime registers exit handlers.
GpuBenchModule load_module() {
  GpuBenchModule m;
  const std::vector<std::string> candidates = module_candidates(GRADQ_CUDA_BENCH_INSTALL_NAME, GRADQ_CUDA_BENCH_BUILD_PATH);
  const auto found = std::find_if(candidates.begin(), candidates.end(),
                                  [](const std::string& p) { return std::filesystem::exists(p); });
  const std::string& path = found != candidates.end() ? *found : candidates.back();
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    m.error = fmt::format("cannot load gradq's CUDA bench module ({})", why ? why : path);
    return m;
  }
  m.run = reinterpret_cast<GpuBenchFn>(dlsym(lib, "gradq_cuda_kernel_bench"));
  if (!m.run) m.error = fmt::format("'{}' lacks gradq_cuda_kernel_bench (a module from another gradq build?)", path);
  return m;
}

}  // namespace

void run_gpu_kernel_bench(const KernelBenchOptions& options, DeviceBench& out, std::ostream* log) {
  static std::once_flag once;
  static GpuBenchModule module;
  std::call_once(once, [] { module = load_module(); });
  if (!module.run) {
    out.ran = false;
    out.skipped_reason = module.error;
    return;
  }
  module.run(&options, &out, log);
}

#else

void run_gpu_kernel_bench(const KernelBenchOptions&, DeviceBench& out, std::ostream*) {
  out.ran = false;
  out.skipped_reason = "gradq was built without its CUDA kernels (GRADQ_CUDA=OFF)";
}

#endif

}  // namespace gradq::bench::detail
