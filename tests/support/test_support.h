#pragma once
// Paths and fixtures shared by the test suites.

#include <torch/script.h>

#include <map>
#include <string>
#include <utility>

#include "data/dataset.h"
#include "model/causal_lm.h"
#include "quant/quantized_tensor.h"

namespace gradq::test {

/// third_party/assets in the source tree.
std::string assets();
inline std::string stories_bin() { return assets() + "/stories260K/stories260K.bin"; }
inline std::string tokenizer_model() { return assets() + "/stories260K/tok512.model"; }
inline std::string tinystories_text() { return assets() + "/text/tinystories_val.txt"; }

/// A fresh empty directory for one test's files, removed when the test process exits (kept with
/// GRADQ_KEEP_TEST_FILES=1).
std::string temp_dir(const std::string& name);

/// The path of the built gradq CLI.
std::string cli();

/// Runs a shell command, returns {exit code, combined stdout+stderr}.
std::pair<int, std::string> run(const std::string& command);

/// The TinyStories text tokenized with the stories260K tokenizer and split by make_data_split.
DataSplit stories_data(const DataOptions& options);
/// The small split the quantizer suites run on: 4 calibration and 8 held-out windows of 128 tokens.
DataSplit small_stories_data();

/// A parameter-free TorchScript module whose forward is `def forward(self, tokens):` + `body` (indented
/// TorchScript code), for models that misbehave on purpose (int64, NaN or tuple logits, a short context).
torch::jit::Module scripted_module(const std::string& body);

/// stories260K converted to TorchScript once per test process (cached at a temp path).
const std::string& stories_pt();

/// The KL of `model` with `weights` against `model` itself on `windows`, by a whole-model
/// evaluation; the model's original weights are restored.
double whole_model_kl(CausalLM& model, const Windows& windows, const QuantizedWeights& weights);

/// The gradient of the mean NLL of `windows`' scored targets with respect to every quantizable
/// weight of `model`, in logical [out, in] layout, by one autograd pass through the whole model.
std::map<std::string, at::Tensor> whole_model_nll_gradients(QuantizableModel& model, const Windows& windows);

}  // namespace gradq::test
