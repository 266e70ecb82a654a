#include "model/model_loader.h"

#include <fstream>

#include "common/error.h"
#include "common/files.h"
#include "common/runtime.h"
#include "model/llama2c.h"

namespace gradq {

CausalLM load_model(const std::string& path, const AdapterOptions& options) {
  const bool llama2c = path.size() >= 4 && path.compare(path.size() - 4, 4, ".bin") == 0;
  if (llama2c) return CausalLM(load_llama2c(path), options);
  return CausalLM::load(path, options);
}

void save_module(const torch::jit::Module& module, const std::string& path) {
  // Streamed into the temporary file: an ostringstream and its str() copy held the archive twice
  // or more in memory (3.9 GB more for a 1.9 GB model) besides the module itself.
  write_file_atomically(path, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    GRADQ_CHECK(out.is_open(), "cannot open '{}' for writing", tmp);
    module.save(out);
    out.close();
    GRADQ_CHECK(out.good(), "failed writing the module to '{}'", tmp);
  });
}

std::string default_model_path() { return assets_dir() + "/stories260K/stories260K.bin"; }
std::string default_tokenizer_path() { return assets_dir() + "/stories260K/tok512.model"; }
std::string default_text_path() { return assets_dir() + "/text/tinystories_val.txt"; }

}  // namespace gradq
