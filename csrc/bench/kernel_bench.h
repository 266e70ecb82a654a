#pragma once
// `gradq bench kernels`: throughput of the quantization kernels (quantize+pack, dequantize, the
// quantized linear) against the memory bandwidth measured in the same run and against the float
// linear on the same shapes, on the CPU and, when gradq was built with its CUDA kernels and a device
// is present, on the GPU.
//
// Conventions (also written into the JSON, so a reader of the numbers needs nothing else):
//  * Shapes are out_features x in_features: W is [out, in] and the linear computes y = x W^T with
//    x [batch, in] and y [batch, out].
//  * GB/s is 1e9 bytes per second of *compulsory* bytes: what the op must at least move between
//    memory and the processor, counted from the formats, never from the implementation:
//      copy        2 * buffer bytes (read the source, write the destination; STREAM "Copy" counting,
//                  no write-allocate traffic counted)
//      quantize    4 * out * in (fp32 weights read) + QuantSpec::storage_bytes (codes, scales and
//                  zero points written)
//      dequantize  QuantSpec::storage_bytes (read) + out * in * (4 on the CPU: fp32; 2 on the GPU:
//                  fp16, the output the GPU linear uses) written
//      linear      QuantSpec::storage_bytes + batch * in * e (x) + batch * out * e (y), e = 4 on the
//                  CPU (fp32 activations), 2 on the GPU (fp16)
//      float linear  out * in * e + the same x and y bytes (fp32 on the CPU, fp16 on the GPU)
//    Work an implementation adds (the finiteness check in gradq::quantize, the fp32 weight that the
//    CPU linear materialises for batch > 4, allocator page faults) costs time but is not counted.
//  * fraction_of_copy = op GB/s / copy GB/s of the same device in the same run. The copy is timed
//    before and after the ops and the higher of the two is the reference, so that a machine that
//    got busier during the run cannot make the fractions look better.
//  * speedup_vs_float = float linear median time / quantized linear median time (> 1: faster).
//  * Every time is the median of `repeat` timed calls after `warmup` untimed ones (at least one per
//    input copy). Consecutive calls read different copies of their inputs (`rotate_bytes` of them
//    at least), so a weight that fits in the last-level cache is not timed from it.
//  * The CPU ops are the library calls (gradq::quantize, gradq::dequantize, gradq::ops::linear,
//    at::linear), which allocate their outputs. With `reuse_outputs` (the default) the bench raises
//    glibc's mmap and trim thresholds for its duration, so that an output freed by one call is
//    reused by the next, as in a process that quantizes layer after layer: the time is the op's,
//    like the copy's, whose buffers are written once before timing. Without it every output above
//    glibc's mmap threshold is a fresh mapping whose first-touch page faults are timed too (on a
//    microVM they can cost more than the op itself).

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "quant/quant_spec.h"

namespace gradq::bench {

/// A weight shape, out_features x in_features.
struct BenchShape {
  int64_t out_features = 0;
  int64_t in_features = 0;
  bool operator==(const BenchShape& o) const { return out_features == o.out_features && in_features == o.in_features; }
};

/// Which devices `run_kernel_bench` measures.
enum class BenchDevices { kAll, kCpu, kGpu };

struct KernelBenchOptions {
  /// Integer formats to measure (default: b4g128, asymmetric, fp16 scales).
  std::vector<QuantSpec> specs = {QuantSpec{}};
  /// Default: the projections of a 7B Llama (attention, MLP up, MLP down).
  std::vector<BenchShape> shapes = {{4096, 4096}, {4096, 11008}, {11008, 4096}};
  /// Activation rows of the linear (1 = decode).
  std::vector<int64_t> batches = {1, 8};
  int repeat = 10;  ///< timed calls per measurement, >= 1; the median is reported
  int warmup = 2;   ///< untimed calls before them, >= 0 (raised to one per input copy)
  /// Bytes of the copy-bandwidth buffer (source and destination are each this big).
  int64_t copy_bytes = int64_t{1} << 30;
  /// Consecutive timed calls cycle through enough input copies to touch at least this many bytes.
  int64_t rotate_bytes = int64_t{512} << 20;
  BenchDevices devices = BenchDevices::kAll;
  /// Reuse freed CPU outputs (header comment). Sets glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD
  /// for the process while the bench runs and restores glibc's defaults (128 KiB, fixed) after it.
  bool reuse_outputs = true;
  uint64_t seed = 0;  ///< of the Gaussian (std 0.02) weights and activations
};

/// One measured operation.
struct OpResult {
  std::string device;  ///< "cpu" or "gpu"
  std::string op;      ///< "quantize", "dequantize", "linear", "linear_fp32" (CPU) or "linear_fp16" (GPU)
  std::string spec;    ///< QuantSpec::name() of the packed format; "fp32"/"fp16" for the float linear
  BenchShape shape;
  int64_t batch = 0;         ///< activation rows (linear ops), 0 otherwise
  int64_t packed_bytes = 0;  ///< QuantSpec::storage_bytes of the packed weight (0 for the float linear)
  int64_t bytes = 0;         ///< compulsory bytes of one call (header comment)
  int copies = 0;            ///< input copies the timed calls cycled through
  double seconds = 0.0;      ///< median of the timed calls
  double min_seconds = 0.0;
  double gb_per_s = 0.0;     ///< bytes / seconds / 1e9
  double fraction_of_copy = 0.0;  ///< gb_per_s / DeviceBench::copy_gb_per_s
  /// Linear ops: float-linear time / this op's time on the same shape and batch; 0 otherwise.
  double speedup_vs_float = 0.0;
};

/// The copy bandwidth of one device.
struct CopyResult {
  int64_t buffer_bytes = 0;  ///< size of the source (and of the destination)
  int64_t bytes = 0;         ///< counted per copy: 2 * buffer_bytes (read + write)
  double seconds = 0.0;      ///< median
  double gb_per_s = 0.0;
  std::string method;        ///< what was timed
};

/// A goal of issue 3 and whether the measurements meet it (worst case over the matching rows).
struct GoalResult {
  std::string name;
  std::string target;
  bool evaluated = false;  ///< false when nothing it applies to was measured (device skipped, spec absent)
  double measured = 0.0;   ///< worst value over the rows it applies to
  bool met = false;
  std::string detail;      ///< which rows, and where the worst one is
};

struct DeviceBench {
  bool ran = false;
  std::string skipped_reason;  ///< why it did not run (ran == false)
  std::string name;            ///< "CPU, 2 threads" / the CUDA device and its memory
  std::string outputs;         ///< CPU: how outputs were allocated (KernelBenchOptions::reuse_outputs)
  CopyResult copy;        ///< timed before the ops
  CopyResult copy_after;  ///< timed after them
  double copy_gb_per_s = 0.0;  ///< the reference of fraction_of_copy: the higher of the two
  std::vector<OpResult> ops;
};

struct KernelBenchResult {
  KernelBenchOptions options;
  int threads = 0;  ///< libtorch intra-op threads during the CPU measurements
  DeviceBench cpu;
  DeviceBench gpu;
  std::vector<GoalResult> goals;
};

/// Runs the benchmark. Progress lines (one per shape and device) go to `log` when it is not null.
/// Throws gradq::Error on invalid options (non-integer spec, empty lists, sizes <= 0) and on CUDA
/// errors; a missing CUDA build or device is not an error but a reason in `gpu.skipped_reason`,
/// unless the GPU alone was asked for (BenchDevices::kGpu).
KernelBenchResult run_kernel_bench(const KernelBenchOptions& options, std::ostream* log = nullptr);

/// A readable table of a result, with the byte conventions and the goals.
std::string format_kernel_bench(const KernelBenchResult& result);

/// The result as JSON (options, conventions, copy bandwidths, every op, goals).
std::string kernel_bench_json(const KernelBenchResult& result);

/// "4096x4096,4096x11008" -> shapes; throws gradq::Error naming the bad entry.
std::vector<BenchShape> parse_bench_shapes(const std::string& list);
/// "b4g128,b3g64" -> integer specs; throws gradq::Error naming the bad entry.
std::vector<QuantSpec> parse_bench_specs(const std::string& list);
/// "1,8" -> batch sizes >= 1; throws gradq::Error naming the bad entry.
std::vector<int64_t> parse_bench_batches(const std::string& list);

}  // namespace gradq::bench
