#include "common/runtime.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "common/error.h"

namespace gradq {
namespace fs = std::filesystem;

void configure_runtime() {
  // The profiling executor re-specializes the graph for every new input shape, which costs tens of
  // milliseconds per call when sequence lengths vary (generation, ragged windows) and gains nothing
  // on CPU for these graphs: run TorchScript through the plain interpreter.
  torch::jit::getProfilingMode() = false;
  torch::jit::setGraphExecutorOptimize(false);
}

void set_threads(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  at::set_num_threads(threads);
}

std::string assets_dir() {
  if (const char* env = std::getenv("GRADQ_ASSETS")) return env;
  // Installed layout: <prefix>/lib/libgradq.so -> <prefix>/share/gradq/assets.
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&assets_dir), &info) && info.dli_fname) {
    fs::path installed = fs::path(info.dli_fname).parent_path().parent_path() / "share" / "gradq" / "assets";
    if (fs::exists(installed / "SOURCES.md")) return installed.string();
  }
  return GRADQ_SOURCE_ASSETS;
}

std::string version() { return GRADQ_VERSION; }

}  // namespace gradq
