#pragma once
// Checks on the pickles of a PyTorch archive (torch.save / torch.jit.save zip files) that gradq makes
// before libtorch's unpickler reads them.

#include <caffe2/serialize/inline_container.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace gradq {

/// Throws gradq::Error naming `what` when the pickle `data[0, size)` declares a string, bytes or long
/// integer longer than the bytes left after its length field, or stores a memo entry (LONG_BINPUT)
/// at an index no pickle of `size` bytes reaches (each entry takes at least one opcode). libtorch
/// 1.13's unpickler allocates and zero-fills the declared length before it finds the record too
/// short (up to 4 GiB from a 4-byte field, 2^64 from an 8-byte one), and grows its memo table to the
/// index (16 bytes an entry: 64 GiB from a 4-byte index). The walk follows the opcodes up to STOP and
/// leaves every other error (unknown opcode, truncated argument) to the unpickler.
void check_pickle_lengths(const uint8_t* data, size_t size, const std::string& what);

/// check_pickle_lengths on every `.pkl` record of `archive`, named `path` in errors.
void check_archive_pickles(caffe2::serialize::PyTorchStreamReader& archive, const std::string& path);

/// The bytes of an archive held in memory, for caffe2::serialize::PyTorchStreamReader; `bytes` must
/// outlive the reader.
class BytesReadAdapter : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit BytesReadAdapter(const std::string& bytes) : bytes_(bytes) {}
  size_t size() const override { return bytes_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* what = "") const override;

 private:
  const std::string& bytes_;
};

}  // namespace gradq
