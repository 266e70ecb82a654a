#pragma once
// Checks on the records of a PyTorch archive (torch.save / torch.jit.save zip files) that gradq makes
// before libtorch reads them: its pickles (archive_check.cpp) and its TorchScript source (code_check.cpp).

#include <caffe2/serialize/inline_container.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace gradq {

/// Where a pickle's storages are: storage `key` is the archive record `folder + "/" + key`, and
/// `record_size` returns a record's size in bytes, or nullopt when the archive has no such record
/// (or cannot read it).
struct StorageRecords {
  std::string folder;
  std::function<std::optional<uint64_t>(const std::string& record)> record_size;
};

/// Throws gradq::Error naming `what` when the pickle `data[0, size)` would make libtorch 1.13's
/// unpickler allocate, read or write beyond what the archive holds. One walk over the opcodes, up to
/// STOP, refuses:
///  - a string, bytes or long integer longer than the bytes left after its length field (the
///    unpickler allocates and zero-fills the declared length first: up to 4 GiB from a 4-byte field,
///    2^64 from an 8-byte one);
///  - a memo entry (LONG_BINPUT) at an index no pickle of `size` bytes reaches (each entry takes at
///    least one opcode; the unpickler grows its memo table to the index first, 16 bytes an entry);
///  - a MARK above the top of the stack, or an odd count of keys and values, when a tuple, list or
///    dict is built from it (the unpickler then indexes its stack out of bounds);
///  - with `storages` given:
///    a storage, persistent id ('storage', type, key, location, numel), whose numel elements take
///    more bytes than its record holds, or that has no record (the unpickler wraps the record's
///    bytes in a storage of the declared size without comparing them); a tensor
///    (torch._utils._rebuild_tensor_v2 / _rebuild_qtensor) whose offset, sizes and strides reach
///    outside its storage (the unpickler sets them unchecked); a sparse tensor
///    (_rebuild_sparse_tensor: libtorch builds it without checking its indices); and a storage or
///    tensor whose arguments the walk cannot follow (they come from something other than literals
///    and the memo, which no torch writer emits).
/// The walk models the unpickler's stack only as far as these checks need; every other error
/// (unknown opcode, truncated argument, wrong types) is left to the unpickler.
void check_pickle(const uint8_t* data, size_t size, const std::string& what,
                  const StorageRecords* storages = nullptr);

/// Throws gradq::Error naming `what` and the line when the TorchScript source `code` (a code/*.py
/// record) has a class-body statement that libtorch 1.13's importer reads through a field the
/// statement lacks, unchecked (a crash): a value without a type in a module or plain class (other
/// than its parameter, buffer and hook lists), a parameter, buffer or hook list or an
/// `__annotations__[...]` entry without a value, a NamedTuple field without a type, an Enum member
/// without a value. Everything else is left to libtorch, which throws on malformed code.
void check_torchscript_source(std::string_view code, const std::string& what);

/// The checks on every record of `archive` that libtorch may read, named `path` in errors:
/// check_pickle on every `.pkl` and `.debug_pkl` record (the storages of `data.pkl` and
/// `constants.pkl`, the pickles torch::pickle_load and torch::jit::load unpickle, are checked against
/// the records `data/<key>` and `constants/<key>`), the sizes and text-table indices of the debug
/// information in every `.debug_pkl` record (which libtorch 1.13 indexes unchecked when it highlights a
/// compile error), and check_torchscript_source on every `.py` record (one that declares more than
/// 64 MiB of source is refused unread, by the size its central directory declares). A record the
/// reader cannot read is an error too, and so are two records whose names match ignoring case, a
/// central directory gradq cannot follow, a record declaring more bytes than its stored or compressed
/// bytes can make (libtorch allocates the declared size first, the `version` record's before anything
/// else), and a compressed record whose stream does not decompress to exactly its declared size
/// (libtorch then reads an uninitialized buffer). All of these are checked from the central directory
/// before libtorch's reader opens the archive. `in` is the archive's bytes; a PyTorchStreamReader
/// opens them here (its exception, not gradq::Error, when they are not a zip archive at all).
void check_archive(const std::shared_ptr<caffe2::serialize::ReadAdapterInterface>& in, const std::string& path);

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
