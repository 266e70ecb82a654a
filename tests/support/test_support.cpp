#include "support/test_support.h"

#include <gtest/gtest.h>
#include <ftw.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "eval/evaluator.h"
#include "model/llama2c.h"
#include "tokenizer/tokenizer.h"

namespace gradq::test {
namespace fs = std::filesystem;

std::string assets() { return GRADQ_TEST_ASSETS; }

namespace {

// `path` and everything under it, by the C library: PyTorch 2.11's libtorch.so exports its own
// std::filesystem, which the test binaries bind to, and its remove_all jumps to address 0 on any
// directory that is not empty (test_zoo crashed after its last test). A leftover is no failure.
void remove_tree(const std::string& path) {
  auto remove_one = [](const char* file, const struct stat*, int, struct FTW*) {
    ::remove(file);
    return 0;  // go on with the rest
  };
  ::nftw(path.c_str(), remove_one, /*nopenfd=*/16, FTW_DEPTH | FTW_PHYS);
}

// The directories temp_dir made, removed after the last test (each run left about 45 MB in /tmp
// before). GRADQ_KEEP_TEST_FILES=1 keeps them, to look at after a failure. Removed from gtest's global
// tear-down, inside main rather than from a static destructor during exit.
struct TempDirs {
  std::mutex mutex;
  std::vector<fs::path> paths;
  void remove() {
    std::lock_guard<std::mutex> lock(mutex);
    const char* keep = std::getenv("GRADQ_KEEP_TEST_FILES");
    if (!(keep && std::string(keep) == "1")) {
      for (const fs::path& p : paths) remove_tree(p.string());
    }
    paths.clear();
  }
};

TempDirs& temp_dirs() {
  static TempDirs dirs;
  return dirs;
}

class RemoveTempDirs : public ::testing::Environment {
 public:
  void TearDown() override { temp_dirs().remove(); }
};
[[maybe_unused]] const ::testing::Environment* const kRemoveTempDirs =
    ::testing::AddGlobalTestEnvironment(new RemoveTempDirs);

}  // namespace

std::string temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("gradq_test_" + name + "_" + std::to_string(::getpid()));
  remove_tree(p.string());
  fs::create_directories(p);
  TempDirs& dirs = temp_dirs();
  std::lock_guard<std::mutex> lock(dirs.mutex);
  dirs.paths.push_back(p);
  return p.string();
}

std::string cli() {
  // Only the suites that call this depend on the CLI target (tests/CMakeLists.txt): a suite built
  // alone without that dependency would otherwise run a missing or stale binary.
  if (!fs::exists(GRADQ_TEST_CLI))
    throw std::runtime_error(std::string("the gradq CLI is not built: expected it at ") + GRADQ_TEST_CLI +
                             "; a suite that runs it needs add_dependencies on gradq_cli (tests/CMakeLists.txt)");
  return GRADQ_TEST_CLI;
}

std::pair<int, std::string> run(const std::string& command) {
  std::string out;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return {-1, "popen failed"};
  std::array<char, 4096> buf{};
  while (size_t n = fread(buf.data(), 1, buf.size(), pipe)) out.append(buf.data(), n);
  int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

DataSplit stories_data(const DataOptions& options) {
  auto tokenizer = Tokenizer::load_sentencepiece(tokenizer_model());
  return make_data_split(tokenizer->encode(read_text_file(tinystories_text())), tokenizer->bos_id(), options);
}

DataSplit small_stories_data() {
  DataOptions options;
  options.ctx = 128;
  options.calib_windows = 4;
  options.eval_windows = 8;
  return stories_data(options);
}

const std::string& stories_pt() {
  static const std::string path = [] {
    std::string p = temp_dir("stories_pt") + "/stories260K.pt";
    convert_llama2c(stories_bin(), p);
    return p;
  }();
  return path;
}

torch::jit::Module scripted_module(const std::string& body) {
  torch::jit::Module m("Misbehaving");
  m.define("def forward(self, tokens):\n" + body);
  return m;
}

double whole_model_kl(CausalLM& model, const Windows& windows, const QuantizedWeights& weights) {
  GradualEvaluator evaluator(windows, EvaluatorOptions{});
  evaluator.set_reference(model);
  for (const auto& [name, q] : weights) model.set_weight(name, q.dequantize());
  const double kl = evaluator.evaluate(model).kl->mean.value;
  model.restore_all();
  return kl;
}

std::map<std::string, at::Tensor> whole_model_nll_gradients(QuantizableModel& model, const Windows& windows) {
  GradientScope scope(model, GradientScope::Which::kQuantizableWeights);
  c10::InferenceMode not_inference(false);
  at::AutoGradMode grad_mode(true);
  const at::Tensor logits = model.forward(windows.inputs).to(at::kFloat);
  const at::Tensor scored = windows.scored_mask();
  const at::Tensor nll = -at::log_softmax(logits, -1).gather(-1, windows.targets.unsqueeze(-1)).squeeze(-1);
  nll.masked_select(scored).mean().backward();
  std::map<std::string, at::Tensor> gradients;
  for (const WeightInfo& w : model.weights()) {
    const at::Tensor g = model.parameter(w.name).grad();
    gradients[w.name] = (w.transposed ? g.t() : g).detach().clone();
  }
  return gradients;
}

}  // namespace gradq::test
