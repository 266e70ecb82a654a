// The text validator (read_text_file's checks: NUL bytes, strict UTF-8, blank text, BOM) and the
// token-id parser of --tokens (parse_token_ids), on the same bytes.
#include "data/dataset.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  gradq::fuzz::expect_only_gradq_errors([&] {
    const std::string text = gradq::validate_text(gradq::fuzz::as_string(data, size), "fuzz.txt");
    // Accepted text is non-empty and is a suffix of the input (only a BOM may be removed).
    if (text.empty() || text.size() > size || text.compare(0, text.size(), reinterpret_cast<const char*>(data) + (size - text.size()), text.size()) != 0)
      std::abort();
  });
  gradq::fuzz::expect_only_gradq_errors([&] {
    const std::vector<int64_t> ids = gradq::parse_token_ids(gradq::fuzz::as_string(data, size), "fuzz.txt");
    // Accepted ids are some, each a non-negative int32, never more than the bytes could spell.
    if (ids.empty() || ids.size() > size) std::abort();
    for (const int64_t id : ids)
      if (id < 0 || id >= (int64_t{1} << 31)) std::abort();
  });
  return 0;
}
