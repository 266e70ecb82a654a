// The text validator (read_text_file's checks: NUL bytes, strict UTF-8, blank text, BOM).
#include "data/dataset.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradq::fuzz::expect_only_gradq_errors([&] {
    const std::string text = gradq::validate_text(gradq::fuzz::as_string(data, size), "fuzz.txt");
    // Accepted text is non-empty and is a suffix of the input (only a BOM may be removed).
    if (text.empty() || text.size() > size || text.compare(0, text.size(), reinterpret_cast<const char*>(data) + (size - text.size()), text.size()) != 0)
      std::abort();
  });
  return 0;
}
