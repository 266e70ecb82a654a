#include "common/runtime.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
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

int hardware_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

int default_threads() {
  // libgomp's workers spin-wait between parallel regions (OMP_WAIT_POLICY=active is its default,
  // and it is read before main, so gradq cannot change it). On a machine whose cores are already
  // busy the spinning thread steals the core the other one needs: gradq eval took 3.3-6.3x the
  // wall time (3.6-8x the CPU time) with 2 threads as with 1 on the loaded 2-core machine, and
  // OMP_DYNAMIC was worse still (docs/BENCHMARKS.md). So only the cores the one-minute load
  // average leaves idle are used, at least one.
  const int cores = hardware_threads();
  double load[1] = {0};
  if (::getloadavg(load, 1) != 1) return cores;
  const int idle = static_cast<int>(std::floor(cores - load[0] + 0.5));
  return std::clamp(idle, 1, cores);
}

int set_threads(int threads) {
  const int cores = hardware_threads();
  GRADQ_CHECK(threads >= 0 && threads <= kMaxThreadsPerCore * cores,
              "--threads must be between 1 and {} ({} cores x {}), or 0 for the default; got {}",
              kMaxThreadsPerCore * cores, cores, kMaxThreadsPerCore, threads);
  if (threads == 0) threads = default_threads();
  at::set_num_threads(threads);
  return threads;
}

namespace {

// Directory of the loaded libgradq.so, or "" if the dynamic loader cannot say.
std::string libgradq_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&libgradq_dir), &info) && info.dli_fname && *info.dli_fname)
    return fs::path(info.dli_fname).parent_path().string();
  return "";
}

}  // namespace

std::string assets_dir() {
  if (const char* env = std::getenv("GRADQ_ASSETS")) return env;
  // Installed layout: <prefix>/lib/libgradq.so -> <prefix>/share/gradq/assets.
  if (const std::string lib = libgradq_dir(); !lib.empty()) {
    fs::path installed = fs::path(lib).parent_path() / "share" / "gradq" / "assets";
    if (fs::exists(installed / "SOURCES.md")) return installed.string();
  }
  return GRADQ_SOURCE_ASSETS;
}

std::vector<std::string> module_candidates(const std::string& install_name, const std::string& build_path) {
  std::vector<std::string> paths;
  if (const std::string lib = libgradq_dir(); !lib.empty()) paths.push_back((fs::path(lib) / install_name).string());
  paths.push_back(build_path);
  return paths;
}

std::string version() { return GRADQ_VERSION; }

}  // namespace gradq
