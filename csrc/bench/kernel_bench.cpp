#include "bench/kernel_bench.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <ostream>
#include <sstream>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "bench/kernel_bench_internal.h"
#include "common/error.h"
#include "ops/ops.h"
#include "quant/quantize.h"

namespace gradq::bench {
namespace detail {

double median(std::vector<double> v) {
  GRADQ_CHECK(!v.empty(), "median of no measurements");
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int rotation_copies(int64_t bytes_per_copy, int64_t rotate_bytes) {
  if (bytes_per_copy <= 0 || rotate_bytes <= bytes_per_copy) return 1;
  const int64_t n = (rotate_bytes + bytes_per_copy - 1) / bytes_per_copy;
  return static_cast<int>(std::min<int64_t>(n, kMaxRotationCopies));
}

OpResult make_op_result(std::string device, std::string op, std::string spec, const BenchShape& shape, int64_t batch,
                        int64_t packed_bytes, int64_t bytes, int copies, const std::vector<double>& seconds) {
  OpResult r;
  r.device = std::move(device);
  r.op = std::move(op);
  r.spec = std::move(spec);
  r.shape = shape;
  r.batch = batch;
  r.packed_bytes = packed_bytes;
  r.bytes = bytes;
  r.copies = copies;
  r.seconds = median(seconds);
  r.min_seconds = *std::min_element(seconds.begin(), seconds.end());
  // A call below the clock's resolution would divide by zero; such a run says nothing anyway.
  const double s = std::max(r.seconds, 1e-9);
  r.gb_per_s = static_cast<double>(bytes) / s / 1e9;
  return r;
}

CopyResult make_copy_result(int64_t buffer_bytes, const std::vector<double>& seconds, std::string method) {
  CopyResult c;
  c.buffer_bytes = buffer_bytes;
  c.bytes = 2 * buffer_bytes;
  c.seconds = median(seconds);
  c.gb_per_s = static_cast<double>(c.bytes) / std::max(c.seconds, 1e-12) / 1e9;
  c.method = std::move(method);
  return c;
}

void set_copy_reference(DeviceBench& d) {
  d.copy_gb_per_s = std::max(d.copy.gb_per_s, d.copy_after.gb_per_s);
  for (OpResult& r : d.ops) r.fraction_of_copy = d.copy_gb_per_s > 0 ? r.gb_per_s / d.copy_gb_per_s : 0.0;
}

at::Tensor bench_weight(const BenchShape& shape, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({shape.out_features, shape.in_features}, gen, at::kFloat).mul_(0.02);
}

at::Tensor bench_activations(int64_t batch, int64_t in_features, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({batch, in_features}, gen, at::kFloat);
}

}  // namespace detail

namespace {
using Clock = std::chrono::steady_clock;

// Times `repeat` calls of `call(i)` after untimed ones; call i reads input copy i % copies. The
// untimed calls are `warmup`, and at least one per copy: without that, whichever op was timed
// first was up to 3x slow on this project's VM (4096x4096 quantize: 13.1 ms first, 4.4 ms after
// another shape or with a warm-up over every copy). The value a call returns is destroyed after the
// clock stops, so freeing its output is not timed (allocating it is: that is part of what the op
// costs a caller).
template <typename Call>
std::vector<double> time_calls(int warmup, int repeat, int copies, const Call& call) {
  int64_t k = 0;
  for (int i = 0; i < std::max(warmup, copies); ++i) (void)call(static_cast<int>(k++ % copies));
  std::vector<double> seconds;
  seconds.reserve(static_cast<size_t>(repeat));
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = Clock::now();
    [[maybe_unused]] auto result = call(static_cast<int>(k++ % copies));
    const auto t1 = Clock::now();
    seconds.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  return seconds;
}

// While alive, glibc keeps freed blocks of any size in the heap instead of unmapping them, so that
// the next call's output reuses pages that are already mapped (kernel_bench.h).
class OutputReuse {
 public:
  explicit OutputReuse(bool on) {
#if defined(__GLIBC__)
    on_ = on && mallopt(M_MMAP_THRESHOLD, kThreshold) == 1 && mallopt(M_TRIM_THRESHOLD, kThreshold) == 1;
#else
    (void)on;
#endif
  }
  ~OutputReuse() {
#if defined(__GLIBC__)
    if (!on_) return;
    mallopt(M_MMAP_THRESHOLD, kGlibcDefault);
    mallopt(M_TRIM_THRESHOLD, kGlibcDefault);
    malloc_trim(0);
#endif
  }
  OutputReuse(const OutputReuse&) = delete;
  OutputReuse& operator=(const OutputReuse&) = delete;
  bool on() const { return on_; }

 private:
  static constexpr int kThreshold = 1 << 30;
  static constexpr int kGlibcDefault = 128 * 1024;
  bool on_ = false;
};

void check_options(const KernelBenchOptions& o) {
  GRADQ_CHECK(!o.specs.empty(), "bench kernels: expected at least one quantization spec");
  for (const QuantSpec& s : o.specs) {
    GRADQ_CHECK(s.is_integer(), "bench kernels: spec {} is not an integer format; the kernels take b<bits>g<group> "
                "specs such as b4g128, b8g128, b3g64, b2g32", s.name());
    s.validate();
  }
  GRADQ_CHECK(!o.shapes.empty(), "bench kernels: expected at least one shape");
  for (const BenchShape& s : o.shapes)
    GRADQ_CHECK(s.out_features > 0 && s.in_features > 0, "bench kernels: expected shapes with out and in > 0, got {}x{}",
                s.out_features, s.in_features);
  GRADQ_CHECK(!o.batches.empty(), "bench kernels: expected at least one batch size");
  for (int64_t b : o.batches) GRADQ_CHECK(b >= 1, "bench kernels: expected batch sizes >= 1, got {}", b);
  GRADQ_CHECK(o.repeat >= 1, "bench kernels: expected --repeat >= 1, got {}", o.repeat);
  GRADQ_CHECK(o.warmup >= 0, "bench kernels: expected --warmup >= 0, got {}", o.warmup);
  GRADQ_CHECK(o.copy_bytes >= 1, "bench kernels: expected a copy buffer of at least 1 byte, got {}", o.copy_bytes);
  GRADQ_CHECK(o.rotate_bytes >= 0, "bench kernels: expected rotate bytes >= 0, got {}", o.rotate_bytes);
}

CopyResult cpu_copy_bandwidth(const KernelBenchOptions& o) {
  // Both buffers are written once before timing so that no page fault is timed.
  at::Tensor src = at::empty({o.copy_bytes}, at::kByte).fill_(1);
  at::Tensor dst = at::zeros({o.copy_bytes}, at::kByte);
  const std::vector<double> seconds = time_calls(o.warmup, std::max(o.repeat, 3), 1, [&](int) {
    dst.copy_(src);
    return 0;
  });
  return detail::make_copy_result(
      o.copy_bytes, seconds,
      fmt::format("at::Tensor::copy_ of a {:.0f} MiB uint8 tensor into another; bytes = read + write",
                  static_cast<double>(o.copy_bytes) / (1 << 20)));
}

// "model name" of /proc/cpuinfo, or "CPU".
std::string cpu_model_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) != 0) continue;
    const size_t colon = line.find(':');
    if (colon == std::string::npos) break;
    std::string name = line.substr(colon + 1);
    name.erase(0, name.find_first_not_of(" \t"));
    if (!name.empty()) return name;
  }
  return "CPU";
}

// Clones of `t` so that consecutive calls read different memory.
std::vector<at::Tensor> tensor_copies(const at::Tensor& t, int n) {
  std::vector<at::Tensor> v{t};
  for (int i = 1; i < n; ++i) v.push_back(t.clone());
  return v;
}

std::vector<PackedWeight> packed_copies(const PackedWeight& p, int n) {
  std::vector<PackedWeight> v{p};
  for (int i = 1; i < n; ++i) {
    PackedWeight c = p;
    c.codes = p.codes.clone();
    c.scales = p.scales.clone();
    if (p.zeros.defined()) c.zeros = p.zeros.clone();
    if (p.sub_scales.defined()) c.sub_scales = p.sub_scales.clone();
    v.push_back(std::move(c));
  }
  return v;
}

void run_cpu(const KernelBenchOptions& o, DeviceBench& cpu, std::ostream* log) {
  const OutputReuse reuse(o.reuse_outputs);
  cpu.ran = true;
  const int threads = at::get_num_threads();
  cpu.name = fmt::format("{}, {} thread{}", cpu_model_name(), threads, threads == 1 ? "" : "s");
  cpu.outputs = reuse.on() ? "reused: glibc mmap/trim thresholds raised to 1 GiB for the run, so a freed output's "
                             "pages serve the next call"
                           : "allocator defaults: outputs above glibc's mmap threshold are fresh mappings, "
                             "their page faults timed";
  cpu.copy = cpu_copy_bandwidth(o);
  if (log) *log << fmt::format("cpu: copy bandwidth {:.2f} GB/s\n", cpu.copy.gb_per_s);
  for (size_t si = 0; si < o.shapes.size(); ++si) {
    const BenchShape& shape = o.shapes[si];
    const std::string shape_name = fmt::format("{}x{}", shape.out_features, shape.in_features);
    if (log) *log << fmt::format("cpu: {} ...\n", shape_name) << std::flush;
    const at::Tensor w = detail::bench_weight(shape, o.seed + si);
    const int n_float = detail::rotation_copies(4 * detail::weight_elems(shape), o.rotate_bytes);
    const std::vector<at::Tensor> w_copies = tensor_copies(w, n_float);

    // The float baseline depends only on shape and batch: measured once, before the specs.
    std::vector<OpResult> float_rows;
    for (int64_t batch : o.batches) {
      const at::Tensor x = detail::bench_activations(batch, shape.in_features, o.seed + 1000 + si);
      const auto secs = time_calls(o.warmup, o.repeat, n_float, [&](int i) { return at::linear(x, w_copies[i]); });
      float_rows.push_back(detail::make_op_result("cpu", "linear_fp32", "fp32", shape, batch, 0,
                                                  detail::float_linear_bytes(shape, batch, 4), n_float, secs));
    }

    for (const QuantSpec& spec : o.specs) {
      const int64_t packed = spec.storage_bytes(shape.out_features, shape.in_features);
      auto secs = time_calls(o.warmup, o.repeat, n_float, [&](int i) { return quantize(w_copies[i], spec); });
      cpu.ops.push_back(detail::make_op_result("cpu", "quantize", spec.name(), shape, 0, packed,
                                               detail::quantize_bytes(spec, shape), n_float, secs));

      const PackedWeight p = quantize(w, spec);
      TORCH_INTERNAL_ASSERT(p.storage_bytes() == packed, "packed weight holds ", p.storage_bytes(), " bytes, spec says ",
                            packed);
      const int n_packed = detail::rotation_copies(packed, o.rotate_bytes);
      const std::vector<PackedWeight> p_copies = packed_copies(p, n_packed);
      secs = time_calls(o.warmup, o.repeat, n_packed, [&](int i) { return dequantize(p_copies[i]); });
      cpu.ops.push_back(detail::make_op_result("cpu", "dequantize", spec.name(), shape, 0, packed,
                                               detail::dequantize_bytes(spec, shape, 4), n_packed, secs));

      for (size_t bi = 0; bi < o.batches.size(); ++bi) {
        const int64_t batch = o.batches[bi];
        const at::Tensor x = detail::bench_activations(batch, shape.in_features, o.seed + 1000 + si);
        secs = time_calls(o.warmup, o.repeat, n_packed, [&](int i) { return ops::linear(x, p_copies[i]); });
        OpResult r = detail::make_op_result("cpu", "linear", spec.name(), shape, batch, packed,
                                            detail::linear_bytes(spec, shape, batch, 4), n_packed, secs);
        r.speedup_vs_float = float_rows[bi].seconds / std::max(r.seconds, 1e-9);
        cpu.ops.push_back(r);
      }
    }
    for (OpResult& r : float_rows) cpu.ops.push_back(std::move(r));
  }
  cpu.copy_after = cpu_copy_bandwidth(o);
  if (log) *log << fmt::format("cpu: copy bandwidth after the ops {:.2f} GB/s\n", cpu.copy_after.gb_per_s);
  detail::set_copy_reference(cpu);
}

// ---- Goals of issue 3 ----------------------------------------------------------------------------

GoalResult evaluate_goal(std::string name, std::string target, double threshold, const DeviceBench& dev,
                         const std::function<bool(const OpResult&)>& applies,
                         const std::function<double(const OpResult&)>& value) {
  GoalResult g;
  g.name = std::move(name);
  g.target = std::move(target);
  if (!dev.ran) {
    g.detail = "not measured: " + dev.skipped_reason;
    return g;
  }
  const OpResult* worst = nullptr;
  int n = 0;
  for (const OpResult& r : dev.ops) {
    if (!applies(r)) continue;
    ++n;
    if (!worst || value(r) < value(*worst)) worst = &r;
  }
  if (!worst) {
    g.detail = "not measured: no matching measurement in this run";
    return g;
  }
  g.evaluated = true;
  g.measured = value(*worst);
  g.met = g.measured >= threshold;
  g.detail = fmt::format("worst of {} measurement{} ({}: {}x{}{})", n, n == 1 ? "" : "s", dev.name,
                         worst->shape.out_features, worst->shape.in_features,
                         worst->batch ? fmt::format(", batch {}", worst->batch) : "");
  return g;
}

std::vector<GoalResult> evaluate_goals(const KernelBenchResult& res) {
  std::vector<GoalResult> goals;
  for (const QuantSpec& spec : res.options.specs) {
    const std::string s = spec.name();
    goals.push_back(evaluate_goal(
        fmt::format("cpu quantize+pack {}", s), "fraction of CPU copy bandwidth >= 0.50", 0.5, res.cpu,
        [&](const OpResult& r) { return r.op == "quantize" && r.spec == s; },
        [](const OpResult& r) { return r.fraction_of_copy; }));
  }
  // The GPU goals name an H100; they are evaluated on whatever device ran, and the detail names it.
  const std::string b4g128 = QuantSpec{}.name();
  goals.push_back(evaluate_goal(
      "gpu linear b4g128 batch 1 (GEMV) vs fp16 linear", "speedup >= 3.5 (on an H100)", 3.5, res.gpu,
      [&](const OpResult& r) { return r.op == "linear" && r.spec == b4g128 && r.batch == 1; },
      [](const OpResult& r) { return r.speedup_vs_float; }));
  goals.push_back(evaluate_goal(
      "gpu linear b4g128 batch 1 (GEMV) bandwidth", "fraction of GPU copy bandwidth >= 0.80 (on an H100)", 0.8, res.gpu,
      [&](const OpResult& r) { return r.op == "linear" && r.spec == b4g128 && r.batch == 1; },
      [](const OpResult& r) { return r.fraction_of_copy; }));
  for (const QuantSpec& spec : res.options.specs) {
    const std::string s = spec.name();
    goals.push_back(evaluate_goal(
        fmt::format("gpu quantize kernel {}", s), "fraction of GPU copy bandwidth >= 0.60 (on an H100)", 0.6, res.gpu,
        [&](const OpResult& r) { return r.op == "quantize" && r.spec == s; },
        [](const OpResult& r) { return r.fraction_of_copy; }));
  }
  return goals;
}

// ---- Parsing -------------------------------------------------------------------------------------

std::vector<std::string> split_list(const std::string& list, const char* what) {
  std::vector<std::string> items;
  std::string item;
  // getline drops a trailing empty entry, so "a," is caught here.
  GRADQ_CHECK(list.empty() || list.back() != ',', "{}: empty entry in '{}'", what, list);
  std::istringstream in(list);
  while (std::getline(in, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    GRADQ_CHECK(!item.empty(), "{}: empty entry in '{}'", what, list);
    items.push_back(item);
  }
  GRADQ_CHECK(!items.empty(), "{}: expected a comma-separated list, got '{}'", what, list);
  return items;
}

// A positive decimal integer of at most 12 digits into `out`; false otherwise.
bool parse_positive(const std::string& s, int64_t& out) {
  if (s.empty() || s.size() > 12 || s.find_first_not_of("0123456789") != std::string::npos) return false;
  out = std::stoll(s);
  return out > 0;
}

}  // namespace

std::vector<BenchShape> parse_bench_shapes(const std::string& list) {
  std::vector<BenchShape> shapes;
  for (const std::string& item : split_list(list, "--shapes")) {
    const size_t x = item.find_first_of("xX");
    BenchShape s;
    const bool ok = x != std::string::npos && parse_positive(item.substr(0, x), s.out_features) &&
                    parse_positive(item.substr(x + 1), s.in_features);
    GRADQ_CHECK(ok, "--shapes: cannot parse '{}': expected OUTxIN with positive integers (out_features x "
                "in_features, e.g. 4096x11008), comma-separated", item);
    shapes.push_back(s);
  }
  return shapes;
}

std::vector<QuantSpec> parse_bench_specs(const std::string& list) {
  std::vector<QuantSpec> specs;
  for (const std::string& item : split_list(list, "--spec")) {
    QuantSpec s;
    try {
      s = parse_quant_spec(item);
    } catch (const Error& e) {
      throw Error(fmt::format("--spec '{}': {}", item, e.what()));
    }
    GRADQ_CHECK(s.is_integer(), "--spec '{}': not an integer format; the kernels take b<bits>g<16|32|64|128|row>"
                "[s][-f32] specs such as b4g128, b8g128, b3g64, b2g32", item);
    specs.push_back(s);
  }
  return specs;
}

std::vector<int64_t> parse_bench_batches(const std::string& list) {
  std::vector<int64_t> batches;
  for (const std::string& item : split_list(list, "--batch")) {
    int64_t b = 0;
    GRADQ_CHECK(parse_positive(item, b), "--batch: cannot parse '{}': expected positive integers, comma-separated",
                item);
    batches.push_back(b);
  }
  return batches;
}

KernelBenchResult run_kernel_bench(const KernelBenchOptions& options, std::ostream* log) {
  check_options(options);
  KernelBenchResult res;
  res.options = options;
  res.threads = at::get_num_threads();
  if (options.devices != BenchDevices::kGpu) {
    run_cpu(options, res.cpu, log);
  } else {
    res.cpu.skipped_reason = "not requested (--device gpu)";
  }
  if (options.devices != BenchDevices::kCpu) {
    detail::run_gpu_kernel_bench(options, res.gpu, log);
    GRADQ_CHECK(res.gpu.ran || options.devices != BenchDevices::kGpu, "bench kernels: the GPU part was asked for "
                "alone (--device gpu) but cannot run: {}", res.gpu.skipped_reason);
    if (!res.gpu.ran && log) *log << "gpu: skipped: " << res.gpu.skipped_reason << "\n";
  } else {
    res.gpu.skipped_reason = "not requested (--device cpu)";
  }
  res.goals = evaluate_goals(res);
  return res;
}

// ---- Output --------------------------------------------------------------------------------------

namespace {

constexpr const char* kShapeConvention = "out_features x in_features: W [out, in], y = x W^T, x [batch, in]";

std::string cpu_bytes_note() {
  return "quantize = 4*out*in (fp32 read) + storage_bytes (packed written); dequantize = storage_bytes + "
         "4*out*in (fp32 written); linear = storage_bytes + 4*batch*(in+out) (fp32 x, y); linear_fp32 = "
         "4*out*in + 4*batch*(in+out)";
}
std::string gpu_bytes_note() {
  return "quantize = 4*out*in (fp32 read) + storage_bytes (packed written); dequantize = storage_bytes + "
         "2*out*in (fp16 written); linear = storage_bytes + 2*batch*(in+out) (fp16 x, y); linear_fp16 = "
         "2*out*in + 2*batch*(in+out)";
}

void format_device(std::ostringstream& os, const char* label, const DeviceBench& d) {
  if (!d.ran) {
    os << fmt::format("{}: skipped: {}\n\n", label, d.skipped_reason);
    return;
  }
  os << fmt::format("{} ({}): copy bandwidth {:.2f} GB/s, the higher of {:.2f} before and {:.2f} after the ops\n"
                    "  [{}; median of {:.3f} and {:.3f} ms]\n",
                    label, d.name, d.copy_gb_per_s, d.copy.gb_per_s, d.copy_after.gb_per_s, d.copy.method,
                    d.copy.seconds * 1e3, d.copy_after.seconds * 1e3);
  os << fmt::format("{:<12} {:<8} {:>12} {:>5} {:>11} {:>10} {:>9} {:>8} {:>9} {:>6}\n", "op", "spec", "out x in",
                    "batch", "median ms", "MB/call", "GB/s", "of copy", "vs float", "copies");
  for (const OpResult& r : d.ops) {
    os << fmt::format("{:<12} {:<8} {:>12} {:>5} {:>11.3f} {:>10.2f} {:>9.2f} {:>8.3f} {:>9} {:>6}\n", r.op, r.spec,
                      fmt::format("{}x{}", r.shape.out_features, r.shape.in_features),
                      r.batch ? std::to_string(r.batch) : "-", r.seconds * 1e3, static_cast<double>(r.bytes) / 1e6,
                      r.gb_per_s, r.fraction_of_copy,
                      r.speedup_vs_float > 0 ? fmt::format("{:.2f}x", r.speedup_vs_float) : "-", r.copies);
  }
  os << "\n";
}

}  // namespace

std::string format_kernel_bench(const KernelBenchResult& res) {
  std::ostringstream os;
  os << fmt::format("gradq bench kernels: shapes are {}; median of {} timed calls after {} warm-up calls; "
                    "GB/s = 1e9 compulsory bytes/s\n\n",
                    kShapeConvention, res.options.repeat, res.options.warmup);
  format_device(os, "CPU", res.cpu);
  if (res.cpu.ran) os << "CPU outputs: " << res.cpu.outputs << "\n\n";
  format_device(os, "GPU", res.gpu);
  os << "bytes counted per call (storage_bytes = QuantSpec::storage_bytes: codes + scales + zero points):\n";
  if (res.cpu.ran) os << "  cpu: " << cpu_bytes_note() << "\n";
  if (res.gpu.ran) os << "  gpu: " << gpu_bytes_note() << "\n";
  os << "  copy: 2 * buffer (read + write). 'vs float' = float linear time / quantized linear time.\n\ngoals:\n";
  for (const GoalResult& g : res.goals) {
    const char* status = !g.evaluated ? "not measured" : g.met ? "met" : "NOT met";
    os << fmt::format("  [{}] {}: {}", status, g.name, g.target);
    if (g.evaluated) os << fmt::format("; measured {:.3f}, {}", g.measured, g.detail);
    else os << fmt::format("; {}", g.detail);
    os << "\n";
  }
  return os.str();
}

std::string kernel_bench_json(const KernelBenchResult& res) {
  using nlohmann::json;
  auto device_json = [](const DeviceBench& d, const std::string& bytes_note) {
    json j;
    j["ran"] = d.ran;
    if (!d.ran) {
      j["skipped_reason"] = d.skipped_reason;
      return j;
    }
    j["name"] = d.name;
    j["bytes_counted"] = bytes_note;
    if (!d.outputs.empty()) j["outputs"] = d.outputs;
    auto copy_json = [](const CopyResult& c) {
      return json{{"buffer_bytes", c.buffer_bytes}, {"bytes", c.bytes}, {"seconds", c.seconds},
                  {"gb_per_s", c.gb_per_s}, {"method", c.method}};
    };
    j["copy_gb_per_s"] = d.copy_gb_per_s;
    j["copy"] = copy_json(d.copy);
    j["copy_after"] = copy_json(d.copy_after);
    j["ops"] = json::array();
    for (const OpResult& r : d.ops) {
      json o = {{"op", r.op},
                {"spec", r.spec},
                {"out_features", r.shape.out_features},
                {"in_features", r.shape.in_features},
                {"batch", r.batch},
                {"packed_bytes", r.packed_bytes},
                {"bytes", r.bytes},
                {"copies", r.copies},
                {"seconds", r.seconds},
                {"min_seconds", r.min_seconds},
                {"gb_per_s", r.gb_per_s},
                {"fraction_of_copy", r.fraction_of_copy}};
      if (r.speedup_vs_float > 0) o["speedup_vs_float"] = r.speedup_vs_float;
      j["ops"].push_back(o);
    }
    return j;
  };
  json j;
  j["bench"] = "kernels";
  j["shape_convention"] = kShapeConvention;
  j["gb_per_s"] = "1e9 compulsory bytes per second; see bytes_counted of each device";
  j["threads"] = res.threads;
  json specs = json::array();
  for (const QuantSpec& s : res.options.specs) specs.push_back(s.name());
  json shapes = json::array();
  for (const BenchShape& s : res.options.shapes) shapes.push_back(fmt::format("{}x{}", s.out_features, s.in_features));
  j["options"] = {{"specs", specs},
                  {"shapes", shapes},
                  {"batches", res.options.batches},
                  {"repeat", res.options.repeat},
                  {"warmup", res.options.warmup},
                  {"copy_bytes", res.options.copy_bytes},
                  {"rotate_bytes", res.options.rotate_bytes},
                  {"seed", res.options.seed},
                  {"reuse_outputs", res.options.reuse_outputs},
                  {"statistic", "median of the timed calls"}};
  j["cpu"] = device_json(res.cpu, cpu_bytes_note());
  j["gpu"] = device_json(res.gpu, gpu_bytes_note());
  j["goals"] = json::array();
  for (const GoalResult& g : res.goals) {
    json o = {{"name", g.name}, {"target", g.target}, {"evaluated", g.evaluated}, {"detail", g.detail}};
    if (g.evaluated) {
      o["measured"] = g.measured;
      o["met"] = g.met;
    }
    j["goals"].push_back(o);
  }
  return j.dump(2) + "\n";
}

}  // namespace gradq::bench
