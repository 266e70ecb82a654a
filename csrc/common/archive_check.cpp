#include "common/archive_check.h"

#include <c10/core/QScheme.h>
#include <c10/core/ScalarType.h>
#include <fmt/ranges.h>  // fmt::join (in fmt/format.h before fmt 11)
#include <torch/csrc/jit/serialization/pickle.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <new>
#include <optional>
#include <set>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "common/error.h"

namespace gradq {

namespace {

// What the walk knows of a value on the unpickler's stack: enough to follow a storage's persistent
// id and a tensor's rebuild arguments from the literals and the memo entries they are made of.
struct Value {
  enum Kind : uint8_t { kUnknown, kInt, kStr, kTuple, kStorage };
  Kind kind = kUnknown;
  uint8_t depth = 0;                               // kTuple: 1 + the deepest tuple inside
  int32_t node = -1;                               // a container: its node in the ContainerGraph
  int64_t i = 0;                                   // kInt: the value; kStorage: the index in `storages`
  std::shared_ptr<const std::string> s;            // kStr
  std::shared_ptr<const std::vector<Value>> items;  // kTuple (shared: memo entries copy it)
};

// The checks read tuples two deep (a persistent id; rebuild arguments holding sizes and strides) and
// strings as long as a record's name. Deeper tuples and longer strings are kept as unknown values, so
// that the model's memory stays small and destroying a tuple never recurses deeper than this (a
// pickle of TUPLE1s nests as deep as it is long).
constexpr uint8_t kMaxTupleDepth = 8;
constexpr size_t kMaxString = 4096;

// libtorch releases an unpickled value recursively, a frame or more per level of nesting, so a pickle of
// containers nested about 130,000 deep overflows the stack (regressions/reference-deep-list.ref: a million
// nested lists, 3 kB deflated). No torch writer nests deeper than a module tree (an object and its
// state dict per level, then a tensor's arguments): tens of levels.
constexpr size_t kMaxNesting = 1000;

// The containers a pickle builds (tuples, lists, dicts, and what REDUCE and BUILD make, taken to hold
// their arguments) and which holds which. Lists and dicts change after they are made (APPENDS, SETITEMS,
// SETITEM), also through a memo entry after another container took them, so the nesting depth is only
// known once the walk ends: it is the longest chain of containers in the graph.
class ContainerGraph {
 public:
  int32_t add() { return nodes_++; }
  // `parent` holds `child`; values that are no containers (node -1) add nothing.
  void link(int32_t parent, int32_t child) {
    if (parent >= 0 && child >= 0) edges_.emplace_back(parent, child);
  }
  size_t size() const { return static_cast<size_t>(nodes_); }

  // The number of containers on the longest chain of containers holding one another, or nullopt when
  // a container holds itself (a cycle: no longest chain). Stops counting past `limit`. Iterative: the
  // graph can be as deep as the pickle is long.
  std::optional<size_t> depth(size_t limit) const {
    std::vector<int32_t> first(size() + 1, 0), child(edges_.size());  // children of n: child[first[n], first[n+1])
    for (const auto& e : edges_) ++first[static_cast<size_t>(e.first) + 1];
    for (size_t n = 0; n < size(); ++n) first[n + 1] += first[n];
    std::vector<int32_t> fill(first.begin(), first.end() - 1);
    for (const auto& e : edges_) child[static_cast<size_t>(fill[static_cast<size_t>(e.first)]++)] = e.second;
    enum : uint8_t { kNew, kOpen, kDone };
    std::vector<uint8_t> state(size(), kNew);
    std::vector<size_t> below(size(), 1);  // kDone: containers on the longest chain from the node down
    std::vector<std::pair<int32_t, int32_t>> path;  // (node, its next child) from the root being walked
    size_t deepest = 0;
    for (int32_t root = 0; root < nodes_; ++root) {
      if (state[static_cast<size_t>(root)] != kNew) continue;
      state[static_cast<size_t>(root)] = kOpen;
      path.emplace_back(root, first[static_cast<size_t>(root)]);
      while (!path.empty()) {
        auto& [n, next] = path.back();
        if (next < first[static_cast<size_t>(n) + 1]) {
          const int32_t c = child[static_cast<size_t>(next++)];
          if (state[static_cast<size_t>(c)] == kOpen) return std::nullopt;
          if (state[static_cast<size_t>(c)] == kNew) {
            if (path.size() > limit) return path.size();  // deeper than the limit already
            state[static_cast<size_t>(c)] = kOpen;
            path.emplace_back(c, first[static_cast<size_t>(c)]);
          } else {
            below[static_cast<size_t>(n)] = std::max(below[static_cast<size_t>(n)], below[static_cast<size_t>(c)] + 1);
          }
          continue;
        }
        const int32_t done = n;
        state[static_cast<size_t>(done)] = kDone;
        deepest = std::max(deepest, below[static_cast<size_t>(done)]);
        if (deepest > limit) return deepest;
        path.pop_back();
        if (!path.empty()) {
          const size_t parent = static_cast<size_t>(path.back().first);
          below[parent] = std::max(below[parent], below[static_cast<size_t>(done)] + 1);
        }
      }
    }
    return deepest;
  }

 private:
  int32_t nodes_ = 0;
  std::vector<std::pair<int32_t, int32_t>> edges_;
};

Value int_value(int64_t v) {
  Value r;
  r.kind = Value::kInt;
  r.i = v;
  return r;
}

// A storage's persistent id, as the unpickler reads it: ('storage', type, key, location, numel).
struct Storage {
  std::string key;
  c10::ScalarType type;
  int64_t numel;
};

// What a GLOBAL put into the unpickler's table of callables (readGlobal): what REDUCE and BUILD do.
enum class Callable : uint8_t { kRebuildTensor, kRebuildSparse, kOther };

// The element size of ScalarType `code`, 0 for a code that names none.
size_t element_size(int64_t code) {
  if (code < 0 || code >= static_cast<int64_t>(c10::NumScalarTypes)) return 0;
  const auto type = static_cast<c10::ScalarType>(code);
  if (std::strcmp(c10::toString(type), "UNKNOWN_SCALAR") == 0) return 0;
  return c10::elementSize(type);
}

// The value readGlobal pushes for `torch.<name>` (a storage class: its ScalarType; a qscheme: its
// number), or nullopt (the unpickler refuses any other `torch.` name).
std::optional<int64_t> torch_global_value(const std::string& name) {
  for (int code = 0; code < static_cast<int>(c10::NumScalarTypes); ++code)
    if (element_size(code) > 0 && name == std::string(c10::toString(static_cast<c10::ScalarType>(code))) + "Storage")
      return code;
  for (int q = 0; q < c10::COMPILE_TIME_NUM_QSCHEMES; ++q)
    if (name == c10::toString(static_cast<c10::QScheme>(q))) return q;
  return std::nullopt;
}

}  // namespace

void check_pickle(const uint8_t* data, size_t size, const std::string& what, const StorageRecords* storage_records) {
  // Each container takes an opcode, a byte at least, so this bounds the ContainerGraph's int32 ids. A
  // torch writer's pickle holds structure only (tensor data has records of its own): kB to MB.
  GRADQ_CHECK(size <= static_cast<size_t>(std::numeric_limits<int32_t>::max()), "{} is a pickle of {} bytes, more "
              "than the 2 GiB gradq reads", what, size);
  size_t i = 0;
  // The little-endian unsigned value of the `bytes`-byte field at i (the caller checked it fits).
  auto field = [&](int bytes) {
    uint64_t v = 0;
    for (int b = bytes - 1; b >= 0; --b) v = (v << 8) | data[i + b];
    return v;
  };
  auto read_line = [&](std::string* line) {
    const uint8_t* nl = static_cast<const uint8_t*>(std::memchr(data + i, '\n', size - i));
    if (!nl) return false;
    const size_t end = static_cast<size_t>(nl - data);
    if (line) line->assign(reinterpret_cast<const char*>(data + i), end - i);
    i = end + 1;
    return true;
  };

  // The model of the unpickler's stack (Unpickler::readInstruction). It follows the opcodes libtorch
  // 1.13 reads; after any other one (the unpickler refuses it, or the model would be wrong) it is
  // `lost`, and the walk checks lengths only, refusing any storage or tensor it then meets.
  std::vector<Value> stack;
  std::vector<size_t> marks;
  std::map<uint64_t, Value> memo;
  std::vector<Callable> callables;
  std::vector<Storage> storages;  // declared so far, in order
  ContainerGraph containers;
  size_t made_while_lost = 0;  // opcodes that can make a container, once the model is lost
  bool lost = false;
  auto pop = [&] {
    Value v = std::move(stack.back());
    stack.pop_back();
    return v;
  };
  // Pops the MARK and returns the stack size it recorded, checked against the stack.
  auto pop_mark = [&](size_t at, uint8_t op) {
    const size_t start = marks.back();
    marks.pop_back();
    GRADQ_CHECK(start <= stack.size(), "{} is corrupt: the pickle opcode 0x{:02x} at byte {} builds from a MARK at "
                "stack depth {}, above the stack's top ({} values)", what, op, at, start, stack.size());
    return start;
  };
  // A new container holding the values stack[from, end).
  auto container_of = [&](size_t from) {
    Value c;
    c.node = containers.add();
    for (size_t k = from; k < stack.size(); ++k) containers.link(c.node, stack[k].node);
    return c;
  };
  auto record_of = [&](const std::string& key) { return storage_records->folder + "/" + key; };
  auto cannot_check = [&](size_t at, const char* thing) {
    return Error(fmt::format("{} cannot be checked: the {} at byte {} is not made of literals and memo entries (no torch "
                             "writer makes such a pickle), so gradq cannot tell whether it stays inside its record",
                             what, thing, at));
  };
  // BINPERSID: the storage libtorch makes from a persistent id (the unpickler reads the record only
  // for numel > 0 and wraps it in numel * element size bytes without comparing the two).
  auto declare_storage = [&](const Value& id, size_t at) {
    Value r;
    if (!storage_records) return r;
    const std::vector<Value>* args = id.kind == Value::kTuple ? id.items.get() : nullptr;
    if (lost || !args || args->size() < 5 || (*args)[1].kind != Value::kInt || (*args)[2].kind != Value::kStr ||
        (*args)[4].kind != Value::kInt)
      throw cannot_check(at, "storage (persistent id)");
    const int64_t code = (*args)[1].i;
    const std::string& key = *(*args)[2].s;
    const int64_t numel = (*args)[4].i;
    const size_t element = element_size(code);
    GRADQ_CHECK(element > 0, "{} is corrupt: storage {} (byte {}) has type {}, which names no scalar type", what,
                record_of(key), at, code);
    GRADQ_CHECK(numel >= 0, "{} is corrupt: storage {} (byte {}) declares {} elements", what, record_of(key), at, numel);
    const auto type = static_cast<c10::ScalarType>(code);
    if (numel > 0) {  // the unpickler reads no record for an empty storage
      const std::optional<uint64_t> bytes = storage_records->record_size(record_of(key));
      GRADQ_CHECK(bytes.has_value(), "{} is corrupt: storage {} declares {} {} elements but the archive has no readable "
                  "record {}", what, record_of(key), numel, c10::toString(type), record_of(key));
      // In 128 bits: numel * element size overflows 64 for numel near 2^63.
      const unsigned __int128 need = static_cast<unsigned __int128>(numel) * element;
      GRADQ_CHECK(need <= *bytes, "{} is corrupt: storage {} declares {} {} elements ({} bytes) but its record holds {} "
                  "bytes", what, record_of(key), numel, c10::toString(type),
                  need >> 64 ? std::string("over 2^64") : std::to_string(static_cast<uint64_t>(need)),
                  *bytes);
    }
    storages.push_back({key, type, numel});
    r.kind = Value::kStorage;
    r.i = static_cast<int64_t>(storages.size() - 1);
    return r;
  };
  // _rebuild_tensor_v2 / _rebuild_qtensor((storage, offset, sizes, strides, ...)): libtorch sets the
  // offset, sizes and strides on the storage unchecked (Unpickler::rebuildTensor), so a view beyond
  // the storage reads past it on first use. The tensor keeps the storage (a later rebuild may use it).
  auto rebuild_tensor = [&](const Value& arg, size_t at) {
    Value r;
    if (!storage_records) return r;
    const std::vector<Value>* args = arg.kind == Value::kTuple ? arg.items.get() : nullptr;
    auto ints = [](const Value& v, std::vector<int64_t>* out) {
      if (v.kind != Value::kTuple) return false;
      for (const Value& e : *v.items) {
        if (e.kind != Value::kInt) return false;
        out->push_back(e.i);
      }
      return true;
    };
    std::vector<int64_t> sizes, strides;
    if (lost || !args || args->size() < 4 || (*args)[0].kind != Value::kStorage || (*args)[1].kind != Value::kInt ||
        !ints((*args)[2], &sizes) || !ints((*args)[3], &strides))
      throw cannot_check(at, "tensor (rebuild arguments)");
    const Storage& storage = storages[static_cast<size_t>((*args)[0].i)];
    const int64_t offset = (*args)[1].i;
    GRADQ_CHECK(sizes.size() == strides.size(), "{} is corrupt: the tensor at byte {} has {} sizes and {} strides", what,
                at, sizes.size(), strides.size());
    bool empty = false;  // an empty tensor reads nothing
    for (size_t d = 0; d < sizes.size(); ++d) {
      GRADQ_CHECK(sizes[d] >= 0, "{} is corrupt: the tensor at byte {} has size {} in dimension {}", what, at, sizes[d], d);
      empty = empty || sizes[d] == 0;
    }
    GRADQ_CHECK(offset >= 0, "{} is corrupt: the tensor at byte {} has storage offset {}", what, at, offset);
    // The lowest and highest element the view reaches, in 128 bits (a 64-bit size times a stride
    // overflows 64), stopping at the first dimension that leaves the storage: each term is below 2^126
    // and lo and hi stay within 64 bits until then, so the sums never overflow.
    __int128 lo = offset, hi = offset;
    for (size_t d = 0; !empty && d < sizes.size() && lo >= 0 && hi < storage.numel; ++d) {
      const __int128 reach = static_cast<__int128>(sizes[d] - 1) * strides[d];
      (reach < 0 ? lo : hi) += reach;
    }
    GRADQ_CHECK(empty || (lo >= 0 && hi < storage.numel),
                "{} is corrupt: the tensor at byte {} (offset {}, sizes [{}], strides [{}]) reaches outside {}, which "
                "holds {} elements", what, at, offset, fmt::join(sizes, ", "), fmt::join(strides, ", "),
                "storage " + record_of(storage.key), storage.numel);
    return (*args)[0];
  };

  auto walk = [&] {
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
      std::string module, name;  // GLOBAL's arguments
      // An argument line without its newline: libtorch 1.13's unpickler reads GLOBAL's lines in
      // chunks until a newline, and at the pickle's end it takes its last chunk again, forever
      // (fuzz_reference: a module name appended to itself until 1.4 GB).
      for (int line = 0; line < lines; ++line)
        GRADQ_CHECK(read_line(op == 'c' ? (line == 0 ? &module : &name) : nullptr),
                    "{} is corrupt: the pickle opcode 0x{:02x} at byte {} has an argument line that runs to the pickle's "
                    "end without a newline", what, op, at);
      uint64_t argument = 0;  // a fixed-size argument's value
      if (fixed > 0) {
        if (static_cast<size_t>(fixed) > size - i) return;
        argument = field(fixed);
        if (op == 'r') {  // LONG_BINPUT: the unpickler grows its memo table to the index first
          GRADQ_CHECK(argument < size, "{} is corrupt: the pickle opcode 0x{:02x} at byte {} stores memo entry {}, beyond "
                      "the {} entries a pickle of {} bytes can make", what, op, at, argument, size, size);
        }
        i += fixed;
      }
      const uint8_t* payload = nullptr;  // a length-prefixed argument's bytes
      uint64_t n = 0;
      if (length > 0) {
        if (static_cast<size_t>(length) > size - i) return;
        n = field(length);
        i += length;
        GRADQ_CHECK(n <= size - i, "{} is corrupt: the pickle opcode 0x{:02x} at byte {} declares {} bytes, {} are left",
                    what, op, at, n, size - i);
        payload = data + i;
        i += n;
      }
      if (lost) {  // a storage or tensor after this point cannot be followed
        if (storage_records && (op == 'Q' || op == 'R' || op == 'b'))
          throw cannot_check(at, op == 'Q' ? "storage (persistent id)" : "call (REDUCE or BUILD)");
        static constexpr std::string_view kMakesContainers("]})tldRb\x81\x85\x86\x87\x8f\x91\x92oi");
        made_while_lost += kMakesContainers.find(static_cast<char>(op)) != std::string_view::npos;
        continue;
      }
      // The opcode's effect on the stack, as Unpickler::readInstruction has it. An opcode that takes
      // more values than the stack holds, or a MARK there is none of, is refused: libtorch 1.13's
      // unpickler pops some of them from an empty std::vector (fuzz_reference: TUPLE3 on a stack of one
      // freed an address it never allocated), and no valid pickle does it.
      const size_t depth = stack.size();
      auto need = [&](size_t values, bool mark) {
        GRADQ_CHECK(depth >= values && (!mark || !marks.empty()), "{} is corrupt: the pickle opcode 0x{:02x} at byte {} "
                    "takes {} values{} from a stack of {}{}", what, op, at, values, mark ? " and a MARK" : "", depth,
                    marks.empty() ? " without a MARK" : "");
        return true;
      };
      switch (op) {
        case 0x80:  // PROTO: only the first opcode (Unpickler::run reads it before the loop)
          if (at != 0) lost = true;
          break;
        case '(': marks.push_back(depth); break;
        case 'N': case 0x88: case 0x89: case 'G': stack.emplace_back(); break;
        case ']': case '}': stack.push_back(container_of(stack.size())); break;  // EMPTY_LIST, EMPTY_DICT
        case ')': {
          Value t = container_of(stack.size());
          t.kind = Value::kTuple;
          t.items = std::make_shared<std::vector<Value>>();
          stack.push_back(std::move(t));
          break;
        }
        case 'K': case 'M': stack.push_back(int_value(static_cast<int64_t>(argument))); break;
        case 'J': stack.push_back(int_value(static_cast<int32_t>(static_cast<uint32_t>(argument)))); break;
        case 0x8a: {  // LONG1: little-endian two's complement
          if (n == 0 || n > 8) {
            stack.emplace_back();
            break;
          }
          uint64_t v = 0;
          for (size_t b = n; b-- > 0;) v = (v << 8) | payload[b];
          if (n < 8 && (payload[n - 1] & 0x80)) v |= ~uint64_t{0} << (8 * n);
          stack.push_back(int_value(static_cast<int64_t>(v)));
          break;
        }
        case 'X': {  // BINUNICODE
          if (n > kMaxString) {
            stack.emplace_back();
            break;
          }
          Value s;
          s.kind = Value::kStr;
          s.s = std::make_shared<const std::string>(reinterpret_cast<const char*>(payload), n);
          stack.push_back(std::move(s));
          break;
        }
        case 't': case 0x85: case 0x86: case 0x87: {  // TUPLE (from the MARK), TUPLE1, TUPLE2, TUPLE3
          size_t start;
          if (op == 't') {
            if (!need(0, true)) break;
            start = pop_mark(at, op);
          } else {
            if (!need(op - 0x84, false)) break;
            start = depth - (op - 0x84);
          }
          uint8_t depth = 1;
          for (size_t k = start; k < stack.size(); ++k)
            if (stack[k].kind == Value::kTuple) depth = std::max<uint8_t>(depth, stack[k].depth + 1);
          Value t = container_of(start);
          if (depth <= kMaxTupleDepth) {
            t.kind = Value::kTuple;
            t.depth = depth;
            t.items = std::make_shared<std::vector<Value>>(std::make_move_iterator(stack.begin() + start),
                                                           std::make_move_iterator(stack.end()));
          }
          stack.resize(start);
          stack.push_back(std::move(t));
          break;
        }
        case 'l': case 'd': case 'e': case 'u': {  // LIST, DICT (from the MARK); APPENDS, SETITEMS (into the
          if (!need(0, true)) break;                // container below the MARK)
          const size_t start = pop_mark(at, op);
          GRADQ_CHECK(op == 'l' || op == 'e' || (depth - start) % 2 == 0, "{} is corrupt: the pickle opcode 0x{:02x} at "
                      "byte {} builds a dict from {} values, not key-value pairs", what, op, at, depth - start);
          GRADQ_CHECK((op != 'e' && op != 'u') || start > 0, "{} is corrupt: the pickle opcode 0x{:02x} at byte {} adds "
                      "to a container below its MARK, and there is none", what, op, at);
          if (op == 'l' || op == 'd') {
            Value c = container_of(start);
            stack.resize(start);
            stack.push_back(std::move(c));
          } else {
            for (size_t k = start; k < stack.size(); ++k) containers.link(stack[start - 1].node, stack[k].node);
            stack.resize(start);
          }
          break;
        }
        case 's':  // SETITEM
          if (need(3, false)) {
            containers.link(stack[depth - 3].node, stack[depth - 2].node);
            containers.link(stack[depth - 3].node, stack[depth - 1].node);
            stack.resize(depth - 2);
          }
          break;
        case 'q': case 'r':  // BINPUT, LONG_BINPUT
          if (need(1, false)) memo[argument] = stack.back();
          break;
        case 'h': case 'j': {  // BINGET, LONG_BINGET
          auto it = memo.find(argument);
          if (it == memo.end()) lost = true;  // the unpickler refuses an index it has not stored
          else stack.push_back(it->second);
          break;
        }
        case 'c':  // GLOBAL (Unpickler::readGlobal): an index into the callables, or a value
          if (module == "torch" && name != "device") {
            const std::optional<int64_t> v = torch_global_value(name);
            if (v) stack.push_back(int_value(*v));
            else lost = true;  // the unpickler refuses it
          } else if (module == "torch._utils" && (name == "_rebuild_tensor_v2" || name == "_rebuild_qtensor")) {
            callables.push_back(Callable::kRebuildTensor);
            stack.push_back(int_value(static_cast<int64_t>(callables.size() - 1)));
          } else if (module == "torch._utils" && name == "_rebuild_sparse_tensor") {
            GRADQ_CHECK(!storage_records, "{} holds a sparse tensor (byte {}), which gradq does not read: libtorch builds "
                        "one without checking its indices", what, at);
            callables.push_back(Callable::kRebuildSparse);
            stack.push_back(int_value(static_cast<int64_t>(callables.size() - 1)));
          } else if (module == "torch._tensor" && name == "_rebuild_from_type_v2") {
            lost = true;  // it makes the unpickler skip the next two GLOBALs: not modelled
          } else {
            callables.push_back(Callable::kOther);
            stack.push_back(int_value(static_cast<int64_t>(callables.size() - 1)));
          }
          break;
        case 0x81:  // NEWOBJ: drops the arguments, leaves the callable for BUILD
          if (need(1, false)) stack.pop_back();
          break;
        case 'R': case 'b': {  // REDUCE, BUILD: callable(argument); every callable but an enum's pops one, pushes one
          if (!need(2, false)) break;
          Value arg = pop();
          const Value callable = pop();
          // What a call makes is taken to hold its argument (an object its state, a dict its items).
          Value made;
          made.node = containers.add();
          containers.link(made.node, arg.node);
          if (callable.kind != Value::kInt || callable.i < 0 || static_cast<size_t>(callable.i) >= callables.size()) {
            if (storage_records && callable.kind == Value::kUnknown) throw cannot_check(at, "call (REDUCE or BUILD)");
            lost = callable.kind == Value::kUnknown;  // an Int out of range or not an Int: the unpickler refuses it
            stack.push_back(std::move(made));
            break;
          }
          switch (callables[static_cast<size_t>(callable.i)]) {
            case Callable::kRebuildTensor: stack.push_back(rebuild_tensor(arg, at)); break;
            case Callable::kRebuildSparse: case Callable::kOther: stack.push_back(std::move(made)); break;
          }
          break;
        }
        case 'Q':  // BINPERSID
          if (need(1, false)) {
            const Value id = pop();
            stack.push_back(declare_storage(id, at));
          }
          break;
        default:  // an opcode libtorch 1.13's unpickler refuses
          lost = true;
          break;
      }
    }
  };
  walk();
  // Whether the unpickler reaches STOP or refuses an opcode on the way, it releases what it has built.
  if (lost) {  // the graph misses what the unmodelled opcodes did: a chain holds at most every container
    GRADQ_CHECK(containers.size() + made_while_lost <= kMaxNesting, "{} cannot be checked: it makes up to {} "
                "containers, some after an opcode the walk does not follow, so they could nest deeper than the {} "
                "levels gradq accepts (libtorch releases nested values recursively)", what,
                containers.size() + made_while_lost, kMaxNesting);
    return;
  }
  const std::optional<size_t> nesting = containers.depth(kMaxNesting);
  GRADQ_CHECK(nesting.has_value(), "{} is corrupt: a container holds itself, which no torch writer makes", what);
  GRADQ_CHECK(*nesting <= kMaxNesting, "{} is corrupt: its containers nest more than {} deep, the most gradq accepts "
              "(libtorch releases nested values recursively, and deep nesting overflows its stack)", what, kMaxNesting);
}

// The most bytes of TorchScript source one record may hold (check_archive).
constexpr size_t kMaxSourceBytes = size_t{64} << 20;

// Throws gradq::Error naming `what` when the unpickled debug information of a code record (its
// .debug_pkl) has a shape that libtorch 1.13's source-range reader indexes unchecked: it reads
// (FORMAT_WITH_STRING_TABLE, texts, rows) or rows alone; each row (byte offset, range, ...); each range
// (source, start, end); each source (text-table indices, file-name index, line) or (text, file name,
// line). Sizes and indices are not checked there (fuzz_torchscript: a file-name index past the table, a
// SEGV copying a string that is not there); types are (toTuple() and the like throw), so a value of
// another type is left to libtorch: older files laid rows out differently, and libtorch only fails on
// them if it ever reads them.
void check_debug_pickle(const c10::IValue& value, const std::string& what) {
  auto fail = [&](const std::string& detail) { throw Error(fmt::format("{} is corrupt: {}", what, detail)); };
  // The elements of `v` when it is a tuple (at least `at_least` of them), or none when it is not.
  auto tuple = [&](const c10::IValue& v, size_t at_least, const char* name) -> c10::ArrayRef<c10::IValue> {
    if (!v.isTuple()) return {};
    const auto& items = v.toTupleRef().elements();
    if (items.size() < at_least)
      fail(fmt::format("its {} has {} elements, expected at least {}", name, items.size(), at_least));
    return items;
  };
  const auto top = tuple(value, 1, "debug information");
  if (top.empty()) return;
  const bool with_table = top[0].isString() && top[0].toStringRef() == "FORMAT_WITH_STRING_TABLE";
  int64_t texts = 0;
  c10::IValue rows = value;
  if (with_table) {
    if (top.size() < 3) fail(fmt::format("its debug information has {} elements, expected 3", top.size()));
    texts = static_cast<int64_t>(tuple(top[1], 0, "text table").size());
    rows = top[2];
  }
  auto index = [&](int64_t i, const char* name) {
    if (i < 0 || i >= texts) fail(fmt::format("a {} index is {}, outside its text table of {}", name, i, texts));
  };
  for (const c10::IValue& row : tuple(rows, 0, "rows")) {
    const auto row_items = tuple(row, 2, "row");
    if (row_items.empty()) continue;
    const auto range = tuple(row_items[1], 3, "source range");
    if (range.empty()) continue;
    const auto source = tuple(range[0], 3, "source");
    if (!with_table || source.empty()) continue;
    if (source[0].isIntList())
      for (const int64_t i : source[0].toIntVector()) index(i, "text");
    if (source[1].isInt()) index(source[1].toInt(), "file name");
  }
}

namespace {

// The most bytes of central directory an archive may declare (read_central_directory).
constexpr uint64_t kMaxDirectoryBytes = uint64_t{64} << 20;

// The most bytes deflate can make of one compressed byte: a length-258 match coded in two bits.
constexpr uint64_t kMaxDeflateRatio = 1032;

// A record as the archive's central directory declares it.
struct DirectoryRecord {
  std::string folder;         // the top folder of its name in the archive ("" when it has none)
  std::string name;           // as PyTorchStreamReader names records: without that folder
  uint64_t size = 0;          // uncompressed
  uint64_t compressed_size = 0;
  uint16_t method = 0;        // 0 stored, 8 deflated
  uint64_t local_header = 0;  // the offset of its local header
};

// The bytes of an archive, read with bounds checks, and its little-endian fields; errors name `path`.
class ArchiveBytes {
 public:
  ArchiveBytes(const caffe2::serialize::ReadAdapterInterface& in, const std::string& path)
      : in_(in), path_(path), size_(in.size()) {}
  uint64_t size() const { return size_; }
  Error corrupt(const std::string& why) const { return Error(fmt::format("'{}' is a corrupt archive: {}", path_, why)); }
  std::string read(uint64_t pos, uint64_t n) const {
    if (pos > size_ || n > size_ - pos)
      throw corrupt(fmt::format("{} bytes at offset {} lie beyond its {} bytes", n, pos, size_));
    std::string bytes(n, '\0');
    if (in_.read(pos, bytes.data(), n, "archive check") != n)
      throw corrupt(fmt::format("{} bytes at offset {} could not be read", n, pos));
    return bytes;
  }
  static uint32_t u16(const std::string& b, size_t at) {
    return static_cast<uint32_t>(static_cast<uint8_t>(b[at])) | static_cast<uint32_t>(static_cast<uint8_t>(b[at + 1])) << 8;
  }
  static uint32_t u32(const std::string& b, size_t at) { return u16(b, at) | u16(b, at + 2) << 16; }
  static uint64_t u64(const std::string& b, size_t at) { return uint64_t{u32(b, at)} | uint64_t{u32(b, at + 4)} << 32; }

 private:
  const caffe2::serialize::ReadAdapterInterface& in_;
  const std::string& path_;
  uint64_t size_;
};

// The central directory of the archive `bytes` (the same bytes the reader reads), in its order, or
// nullopt when the bytes have no end-of-central-directory record (no zip archive at all). Throws
// gradq::Error on a directory it cannot follow.
std::optional<std::vector<DirectoryRecord>> read_central_directory(const ArchiveBytes& bytes) {
  using B = ArchiveBytes;
  // The end-of-central-directory record: 22 bytes and a comment of at most 65535, at the end.
  const uint64_t tail_size = std::min<uint64_t>(bytes.size(), 22 + 65535);
  const std::string tail = bytes.read(bytes.size() - tail_size, tail_size);
  size_t eocd = std::string::npos;
  for (size_t i = tail.size() >= 22 ? tail.size() - 22 + 1 : 0; i-- > 0;)
    if (B::u32(tail, i) == 0x06054b50u) {
      eocd = i;
      break;
    }
  if (eocd == std::string::npos) return std::nullopt;
  uint64_t entries = B::u16(tail, eocd + 10), offset = B::u32(tail, eocd + 16), cd_size = B::u32(tail, eocd + 12);
  // Zip64 (archives over 4 GiB or 65535 records): a locator just before the record points at the
  // zip64 end record, which holds the 64-bit counts and offset.
  const uint64_t eocd_pos = bytes.size() - tail_size + eocd;
  if (eocd_pos >= 20) {
    const std::string locator = bytes.read(eocd_pos - 20, 20);
    if (B::u32(locator, 0) == 0x07064b50u) {
      const std::string end64 = bytes.read(B::u64(locator, 8), 56);
      if (B::u32(end64, 0) != 0x06064b50u) throw bytes.corrupt("its zip64 locator points at no zip64 end record");
      entries = B::u64(end64, 32);
      cd_size = B::u64(end64, 40);
      offset = B::u64(end64, 48);
    }
  }
  // A model's directory is tens of bytes per record: 64 MiB is some 700,000 records.
  if (cd_size > kMaxDirectoryBytes)
    throw bytes.corrupt(fmt::format("its central directory declares {} bytes; gradq reads at most {}", cd_size,
                                    kMaxDirectoryBytes));
  const std::string cd = bytes.read(offset, cd_size);
  std::vector<DirectoryRecord> records;
  size_t at = 0;
  for (uint64_t e = 0; e < entries; ++e) {
    if (at + 46 > cd.size() || B::u32(cd, at) != 0x02014b50u)
      throw bytes.corrupt(fmt::format("central directory entry {} of {} is cut short or lacks its signature", e, entries));
    const size_t name_len = B::u16(cd, at + 28), extra_len = B::u16(cd, at + 30), comment_len = B::u16(cd, at + 32);
    if (at + 46 + name_len + extra_len + comment_len > cd.size())
      throw bytes.corrupt(fmt::format("central directory entry {} of {} runs past the directory", e, entries));
    DirectoryRecord record;
    record.method = static_cast<uint16_t>(B::u16(cd, at + 10));
    record.compressed_size = B::u32(cd, at + 20);
    record.size = B::u32(cd, at + 24);
    record.local_header = B::u32(cd, at + 42);
    // The zip64 extra field holds, in this order, the 64-bit value of each field that reads 0xFFFFFFFF.
    for (size_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const size_t id = B::u16(cd, x), len = B::u16(cd, x + 2);
      if (id == 0x0001) {
        size_t field = x + 4;
        for (uint64_t* value : {&record.size, &record.compressed_size, &record.local_header})
          if (*value == 0xFFFFFFFFu && field + 8 <= std::min(x + 4 + len, cd.size())) {
            *value = B::u64(cd, field);
            field += 8;
          }
      }
      x += 4 + len;
    }
    const std::string name = cd.substr(at + 46, name_len);
    // PyTorchStreamReader names a record by what follows the archive's folder: the first record's
    // folder, which every record must lie in (check_archive).
    const size_t slash = name.find('/');
    record.folder = slash == std::string::npos ? std::string() : name.substr(0, slash);
    record.name = name.substr(slash == std::string::npos ? 0 : slash + 1);
    records.push_back(std::move(record));
    at += 46 + name_len + extra_len + comment_len;
  }
  return records;
}

// libtorch links miniz and exports its functions (1.13 and the 2.x wheels) without installing its
// header. tinfl_decompress inflates a raw deflate stream; its status is miniz's tinfl_status.
extern "C" {
void* tinfl_decompressor_alloc();
void tinfl_decompressor_free(void* decompressor);
int tinfl_decompress(void* decompressor, const uint8_t* in, size_t* in_size, uint8_t* out_start, uint8_t* out_next,
                     size_t* out_size, uint32_t flags);
}
constexpr uint32_t kTinflNonWrappingOutput = 4;  // TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF: as getRecord inflates
constexpr int kTinflDone = 0, kTinflHasMoreOutput = 2;

// Throws gradq::Error unless the deflated `record`'s stream writes every byte of the size its
// directory declares. libtorch's getRecord inflates into a buffer of that size and does not check
// this: when miniz fails part way it returns false without setting the error libtorch looks at, and
// getRecord hands back the buffer with its tail uninitialized (libtorch 1.13; found by the
// fresh-clone test run on a fuzzer-made debug pickle). A stream that makes more than the size is
// cut at it by getRecord the same way, with every byte written: that one is left to the checks that
// follow, which then see the bytes libtorch reads.
void check_deflate_stream(const ArchiveBytes& bytes, const DirectoryRecord& record, const std::string& path) {
  const std::string local = bytes.read(record.local_header, 30);
  if (ArchiveBytes::u32(local, 0) != 0x04034b50u)
    throw bytes.corrupt(fmt::format("record {} has no local header at offset {}", record.name, record.local_header));
  const std::string stream = bytes.read(
      record.local_header + 30 + ArchiveBytes::u16(local, 26) + ArchiveBytes::u16(local, 28), record.compressed_size);
  const std::unique_ptr<uint8_t[]> out(new uint8_t[std::max<uint64_t>(record.size, 1)]);
  const std::unique_ptr<void, void (*)(void*)> inflater(tinfl_decompressor_alloc(), tinfl_decompressor_free);
  if (!inflater) throw std::bad_alloc();
  size_t in_size = stream.size(), made = record.size;
  const int status = tinfl_decompress(inflater.get(), reinterpret_cast<const uint8_t*>(stream.data()), &in_size,
                                      out.get(), out.get(), &made, kTinflNonWrappingOutput);
  if ((status == kTinflDone && made == record.size) || status == kTinflHasMoreOutput) return;
  throw Error(fmt::format("'{}' (record {}) is corrupt: its deflate stream of {} bytes {} after {} of the {} bytes it "
                          "declares",
                          path, record.name, stream.size(), status == kTinflDone ? "ends" : "fails", made, record.size));
}

}  // namespace

void check_archive(const std::shared_ptr<caffe2::serialize::ReadAdapterInterface>& in, const std::string& path) {
  auto ends_with = [](const std::string& s, const std::string& end) {
    return s.size() >= end.size() && s.compare(s.size() - end.size(), end.size(), end) == 0;
  };
  auto lower_case = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
    return s;
  };
  // The central directory first, before libtorch's reader reads any record: the reader allocates
  // the size a record declares before it inflates what there is into it, and its constructor reads
  // the `version` record (fuzz_reference: 4 GB declared by 4 compressed bytes).
  const ArchiveBytes bytes(*in, path);
  const std::optional<std::vector<DirectoryRecord>> directory = read_central_directory(bytes);
  if (!directory) {
    // Not an archive at all: the reader's own exception, which callers leave to the loader to report.
    caffe2::serialize::PyTorchStreamReader not_an_archive(in);
    throw bytes.corrupt("no end of central directory record");
  }
  if (directory->empty()) throw bytes.corrupt("it holds no records");
  std::set<std::string> lower_names;
  for (const DirectoryRecord& record : *directory) {
    const std::string lower_name = lower_case(record.name);
    // Listing the records (getAllRecords) throws on a record outside the archive's folder, and
    // torch::jit::load never lists them, so such a file would load with none of its records checked
    // (fuzz_torchscript). Refused here, where it is found before any record is inflated.
    GRADQ_CHECK(!record.folder.empty(),
                "'{}' is not a PyTorch archive: its record '{}' is in no folder (a PyTorch archive keeps every record "
                "in one)", path, record.name);
    GRADQ_CHECK(record.folder == directory->front().folder,
                "'{}' is a corrupt archive: record '{}/{}' is not in the folder '{}/' of its first record", path,
                record.folder, record.name, directory->front().folder);
    // A source record's size is bounded too: a model's source is a few MB at most, even traced and
    // unrolled over 80 layers (fuzz_torchscript: 4 GB declared for 173 compressed bytes took the
    // scan 54 s and 8 GB).
    GRADQ_CHECK(!ends_with(lower_name, ".py") || record.size <= kMaxSourceBytes,
                "'{}' (record {}) declares {} bytes of TorchScript source; gradq reads at most {}", path, record.name,
                record.size, kMaxSourceBytes);
    GRADQ_CHECK(record.compressed_size <= bytes.size(),
                "'{}' (record {}) is corrupt: it declares {} compressed bytes, more than the archive's {}", path,
                record.name, record.compressed_size, bytes.size());
    const bool could_hold = record.method == 0 ? record.size <= record.compressed_size
                                               : record.size / kMaxDeflateRatio <= record.compressed_size;
    GRADQ_CHECK(could_hold, "'{}' (record {}) is corrupt: it declares {} bytes, more than {}", path, record.name,
                record.size,
                record.method == 0 ? fmt::format("the {} bytes it stores", record.compressed_size)
                                   : fmt::format("its {} compressed bytes can make ({} per byte at most)",
                                                 record.compressed_size, kMaxDeflateRatio));
    // Two records whose names match ignoring case: which one libtorch reads is up to miniz's search
    // (it ignores case), so no check could know that it checked the bytes libtorch reads.
    GRADQ_CHECK(lower_names.insert(lower_name).second,
                "'{}' is corrupt: it holds two records named {} (names match ignoring case)", path, record.name);
  }
  // Then the compressed records' streams (after the cheap checks: each is inflated once more here).
  for (const DirectoryRecord& record : *directory)
    if (record.method == 8) check_deflate_stream(bytes, record, path);
  caffe2::serialize::PyTorchStreamReader archive(in);
  // Every record lies in the archive's folder (checked above), but miniz may still fail to list one.
  std::vector<std::string> names;
  try {
    names = archive.getAllRecords();
  } catch (const std::exception& e) {
    throw Error(fmt::format("'{}' is a corrupt archive: {}", path,
                            std::string(e.what()).substr(0, std::string(e.what()).find('\n'))));
  }
  for (const std::string& name : names) {
    // Record names are matched as libtorch's reader finds them: miniz looks names up ignoring case,
    // so libtorch unpickles a record named data.pkL as data.pkl (fuzz_reference: an unchecked 4 GB
    // string in one).
    const std::string lower = lower_case(name);
    // A TorchScript archive's code/<module>.py.debug_pkl records are pickles too: libtorch unpickles
    // one when a compile error highlights its source (torchscript-slow.pt: a 2.27 GB string).
    const bool source = ends_with(lower, ".py");
    if (!source && !ends_with(lower, ".pkl") && !ends_with(lower, ".debug_pkl")) continue;
    // A record this reader cannot read (corrupt deflate data, a size that does not match, bytes
    // beyond the archive) makes the archive corrupt. Passing the reader's error on let a caller take
    // it for an archive it cannot open and load it unchecked (fuzz_torchscript: a debug pickle after
    // such a record, whose REDUCE underflows libtorch's stack); skipping the record is no better:
    // torch::pickle_load reads the bytes through an adapter that does not check bounds
    // (fuzz_reference: a heap overflow reading a record that ends past the archive).
    at::DataPtr data;
    size_t size = 0;
    try {
      std::tie(data, size) = archive.getRecord(name);
    } catch (const std::exception& e) {
      throw Error(fmt::format("'{}' (record {}) is corrupt: {}", path, name,
                              std::string(e.what()).substr(0, std::string(e.what()).find('\n'))));
    }
    if (source) {
      check_torchscript_source(std::string_view(static_cast<const char*>(data.get()), size),
                               fmt::format("'{}' (record {})", path, name));
      continue;
    }
    const std::string stem = name.substr(0, name.size() - 4);
    const std::string lower_stem = lower.substr(0, lower.size() - 4);
    // readArchiveAndTensors reads the storages of <archive>.pkl from <archive>/<key>. The reader has
    // no record sizes but getRecord's (which reads the record): each is read once, a model's
    // weights once more in all, one record at a time.
    std::map<std::string, std::optional<uint64_t>> sizes;
    StorageRecords records{stem, [&](const std::string& record) {
                             auto it = sizes.find(record);
                             if (it != sizes.end()) return it->second;
                             std::optional<uint64_t> n;
                             try {
                               if (archive.hasRecord(record)) n = std::get<1>(archive.getRecord(record));
                             } catch (const std::exception&) {  // unreadable: refused like a missing one
                             }
                             return sizes[record] = n;
                           }};
    const bool has_storages = lower_stem == "data" || lower_stem == "constants";
    const std::string what = fmt::format("'{}' (record {})", path, name);
    check_pickle(static_cast<const uint8_t*>(data.get()), size, what, has_storages ? &records : nullptr);
    if (ends_with(lower, ".debug_pkl")) {
      // Unpickling is safe now that check_pickle passed. One that fails is left alone: libtorch
      // fails the same way (an exception) if it ever reads the record.
      std::optional<c10::IValue> debug;
      try {
        debug = torch::jit::unpickle(static_cast<const char*>(data.get()), size);
      } catch (const std::exception&) {
      }
      if (debug) check_debug_pickle(*debug, what);
    }
  }
}

size_t BytesReadAdapter::read(uint64_t pos, void* buf, size_t n, const char*) const {
  // An empty record is read into no buffer at all (buf null, n 0): memcpy must not see it (UBSan,
  // found by fuzz_reference).
  if (n == 0 || pos >= bytes_.size()) return 0;
  n = std::min<size_t>(n, bytes_.size() - pos);
  std::memcpy(buf, bytes_.data() + pos, n);
  return n;
}

}  // namespace gradq
