#include "common/archive_check.h"

#include <algorithm>
#include <cstring>

#include "common/error.h"

namespace gradq {

void check_pickle_lengths(const uint8_t* data, size_t size, const std::string& what) {
  size_t i = 0;
  // The little-endian unsigned value of the `bytes`-byte field at i (the caller checked it fits).
  auto field = [&](int bytes) {
    uint64_t v = 0;
    for (int b = bytes - 1; b >= 0; --b) v = (v << 8) | data[i + b];
    return v;
  };
  auto skip_line = [&] {
    const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(data + i, '\n', size - i));
    if (!nl) return false;
    i = static_cast<size_t>(nl - data) + 1;
    return true;
  };
  while (i < size) {
    const size_t at = i;
    const uint8_t op = data[i++];
    int fixed = 0;      // bytes of a fixed-size argument
    int length = 0;     // bytes of the length field of a length-prefixed argument
    int lines = 0;      // newline-terminated arguments
    switch (op) {  // every opcode of pickle protocols 0 to 5 (Python's pickletools)
      case '.':  // STOP
        return;
      case '(': case '0': case '1': case '2': case 'N': case 'Q': case 'R': case 'a': case 'b': case 'd':
      case '}': case 'e': case 'l': case ']': case 'o': case 's': case 't': case ')': case 'u': case 0x81:
      case 0x85: case 0x86: case 0x87: case 0x88: case 0x89: case 0x8f: case 0x90: case 0x91: case 0x92:
      case 0x93: case 0x94: case 0x97: case 0x98:
        break;
      case 'K': case 'h': case 'q': case 0x80: case 0x82: fixed = 1; break;
      case 'M': case 0x83: fixed = 2; break;
      case 'J': case 'j': case 'r': case 0x84: fixed = 4; break;
      case 'G': case 0x95: fixed = 8; break;  // BINFLOAT, FRAME
      case 'F': case 'I': case 'L': case 'P': case 'S': case 'V': case 'g': case 'p': lines = 1; break;
      case 'c': case 'i': lines = 2; break;  // GLOBAL, INST: module and name
      case 'U': case 'C': case 0x8c: case 0x8a: length = 1; break;  // SHORT_BINSTRING/BINBYTES/BINUNICODE, LONG1
      case 'T': case 'X': case 'B': case 0x8b: length = 4; break;   // BINSTRING, BINUNICODE, BINBYTES, LONG4
      case 0x8d: case 0x8e: case 0x96: length = 8; break;            // BINUNICODE8, BINBYTES8, BYTEARRAY8
      default:
        return;  // not a pickle opcode: the unpickler rejects it itself
    }
    for (; lines > 0; --lines)
      if (!skip_line()) return;
    if (fixed > 0) {
      if (static_cast<size_t>(fixed) > size - i) return;
      if (op == 'r') {  // LONG_BINPUT: the unpickler grows its memo table to the index first
        const uint64_t index = field(4);
        GRADQ_CHECK(index < size, "{} is corrupt: the pickle opcode 0x{:02x} at byte {} stores memo entry {}, beyond "
                    "the {} entries a pickle of {} bytes can make", what, op, at, index, size, size);
      }
      i += fixed;
    }
    if (length > 0) {
      if (static_cast<size_t>(length) > size - i) return;
      const uint64_t n = field(length);
      i += length;
      GRADQ_CHECK(n <= size - i, "{} is corrupt: the pickle opcode 0x{:02x} at byte {} declares {} bytes, {} are left",
                  what, op, at, n, size - i);
      i += n;
    }
  }
}

void check_archive_pickles(caffe2::serialize::PyTorchStreamReader& archive, const std::string& path) {
  for (const std::string& name : archive.getAllRecords()) {
    if (name.size() < 4 || name.compare(name.size() - 4, 4, ".pkl") != 0) continue;
    auto [bytes, size] = archive.getRecord(name);
    check_pickle_lengths(static_cast<const uint8_t*>(bytes.get()), size, fmt::format("'{}' (record {})", path, name));
  }
}

size_t BytesReadAdapter::read(uint64_t pos, void* buf, size_t n, const char*) const {
  if (pos >= bytes_.size()) return 0;
  n = std::min<size_t>(n, bytes_.size() - pos);
  std::memcpy(buf, bytes_.data() + pos, n);
  return n;
}

}  // namespace gradq
