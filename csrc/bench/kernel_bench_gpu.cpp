// The GPU part of `gradq bench kernels`: the raw launchers of kernels/ timed with CUDA events, the
// fp16 linear baseline through cuBLAS, the copy bandwidth through cudaMemcpy device to device.
// Debian's libtorch has no CUDA, so this file uses the CUDA runtime directly. It is built, only with
// GRADQ_CUDA, as a module of its own (libgradq_cuda_bench.so) that gpu_bench_module.cpp loads when
// a GPU bench is asked for: linked into libgradq, the CUDA runtime and cuBLAS were mapped into
// every gradq process, about 200 MiB of resident memory on a machine without a GPU.

#include <ATen/ATen.h>
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <ostream>
#include <utility>
#include <vector>

#include "bench/kernel_bench_internal.h"
#include "common/error.h"
#include "dequantize.cuh"
#include "linear.cuh"
#include "quant/quant_math.h"
#include "quant/quantize.h"
#include "quantize.cuh"

namespace gradq::bench::detail {

namespace {
namespace kn = gradq::kernels;

void check_cuda(cudaError_t e, const char* expr) {
  GRADQ_CHECK(e == cudaSuccess, "bench kernels (gpu): {} failed: {}: {}", expr, cudaGetErrorName(e),
              cudaGetErrorString(e));
}
#define GRADQ_BENCH_CUDA(expr) check_cuda((expr), #expr)

void check_cublas(cublasStatus_t s, const char* expr) {
  GRADQ_CHECK(s == CUBLAS_STATUS_SUCCESS, "bench kernels (gpu): {} failed: {}", expr, kn::cublas_status_name(s));
}
#define GRADQ_BENCH_CUBLAS(expr) check_cublas((expr), #expr)

void check_status(const kn::KernelStatus& s) { GRADQ_CHECK(s.ok(), "bench kernels (gpu): {}", s.message); }

/// One device allocation, freed on scope exit.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  explicit DeviceMemory(size_t bytes) {
    if (bytes > 0) {
      const cudaError_t e = cudaMalloc(&ptr_, bytes);
      GRADQ_CHECK(e == cudaSuccess, "bench kernels (gpu): cudaMalloc of {} bytes failed: {} (lower --rotate-mib, "
                  "--copy-mib or the shapes)", bytes, cudaGetErrorString(e));
    }
  }
  ~DeviceMemory() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    return *this;
  }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

/// The handles of one bench run, released on scope exit.
struct GpuContext {
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  cublasHandle_t cublas = nullptr;
  GpuContext() {
    GRADQ_BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    GRADQ_BENCH_CUDA(cudaEventCreate(&start));
    GRADQ_BENCH_CUDA(cudaEventCreate(&stop));
    GRADQ_BENCH_CUBLAS(cublasCreate(&cublas));
    GRADQ_BENCH_CUBLAS(cublasSetStream(cublas, stream));
  }
  ~GpuContext() {
    if (cublas) cublasDestroy(cublas);
    if (stop) cudaEventDestroy(stop);
    if (start) cudaEventDestroy(start);
    if (stream) cudaStreamDestroy(stream);
  }
  GpuContext(const GpuContext&) = delete;
  GpuContext& operator=(const GpuContext&) = delete;

  /// Milliseconds between the events around `n` calls of `call(k++ % copies)`.
  template <typename Call>
  double elapsed_ms(int n, int copies, int64_t& k, const Call& call) {
    GRADQ_BENCH_CUDA(cudaEventRecord(start, stream));
    for (int i = 0; i < n; ++i) call(static_cast<int>(k++ % copies));
    GRADQ_BENCH_CUDA(cudaEventRecord(stop, stream));
    GRADQ_BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0.f;
    GRADQ_BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }

  /// Seconds per call: `repeat` timed repetitions after `warmup` untimed calls. A repetition
  /// launches as many back-to-back calls as fill about 1 ms (events resolve about 0.5 us, and a
  /// 4096x4096 4-bit GEMV takes a few us), each reading the next input copy.
  template <typename Call>
  std::vector<double> time_calls(int warmup, int repeat, int copies, const Call& call) {
    int64_t k = 0;
    for (int i = 0; i < std::max(warmup, 1); ++i) call(static_cast<int>(k++ % copies));
    const double one_ms = elapsed_ms(1, copies, k, call);
    const int inner = static_cast<int>(std::clamp(std::ceil(1.0 / std::max(one_ms, 1e-3)), 1.0, 1000.0));
    std::vector<double> seconds;
    for (int r = 0; r < repeat; ++r) seconds.push_back(elapsed_ms(inner, copies, k, call) * 1e-3 / inner);
    return seconds;
  }
};

/// Space for one packed weight on the device, in the layout of quant_spec.h.
struct DevicePacked {
  DeviceMemory codes, scales, zeros;
  kn::PackedWeightView view(const QuantSpec& spec, const BenchShape& s) const {
    kn::PackedWeightView v;
    v.codes = codes.as<uint8_t>();
    v.scales = scales.as<void>();
    v.zeros = spec.symmetric ? nullptr : zeros.as<uint8_t>();
    v.out_features = s.out_features;
    v.in_features = s.in_features;
    v.bits = spec.bits();
    v.group_size = spec.group_size;
    v.fp16_scale = spec.fp16_scale;
    v.zero_bits = spec.symmetric ? 8 : spec.zero_bits();
    v.sub_scale_bits = spec.sub_scale_bits;
    return v;
  }
};

DevicePacked allocate_packed(const QuantSpec& spec, const BenchShape& s) {
  DevicePacked p;
  p.codes = DeviceMemory(static_cast<size_t>(s.out_features * quant_row_bytes(s.in_features, spec.bits())));
  p.scales = DeviceMemory(static_cast<size_t>(s.out_features * spec.scale_cols(s.in_features) * (spec.fp16_scale ? 2 : 4)));
  if (!spec.symmetric) {
    p.zeros = DeviceMemory(static_cast<size_t>(quant_row_bytes(s.out_features * spec.n_groups(s.in_features), spec.zero_bits())));
  }
  return p;
}

DeviceMemory upload(const at::Tensor& host) {
  const at::Tensor c = host.contiguous();
  DeviceMemory d(c.nbytes());
  GRADQ_BENCH_CUDA(cudaMemcpy(d.as<void>(), c.data_ptr(), c.nbytes(), cudaMemcpyHostToDevice));
  return d;
}

std::vector<DeviceMemory> upload_copies(const at::Tensor& host, int n) {
  std::vector<DeviceMemory> v;
  for (int i = 0; i < n; ++i) v.push_back(upload(host));
  return v;
}

/// Device count and properties, or why there is no usable device.
std::string gpu_unavailable_reason() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return fmt::format("no CUDA device (cudaGetDeviceCount: {})", cudaGetErrorString(e));
  if (n == 0) return "no CUDA device (cudaGetDeviceCount reports 0 devices)";
  return "";
}

}  // namespace

void gpu_kernel_bench(const KernelBenchOptions& o, DeviceBench& out, std::ostream* log) {
  out.ran = false;
  out.skipped_reason = gpu_unavailable_reason();
  if (!out.skipped_reason.empty()) return;
  int dev = 0;
  GRADQ_BENCH_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  GRADQ_BENCH_CUDA(cudaGetDeviceProperties(&prop, dev));
  out.ran = true;
  out.name = fmt::format("{}, sm_{}{}, {:.0f} GiB, L2 {} MiB", prop.name, prop.major, prop.minor,
                         static_cast<double>(prop.totalGlobalMem) / (1 << 30), prop.l2CacheSize >> 20);
  GpuContext ctx;

  // Copy bandwidth: device-to-device memcpy, read + write counted.
  auto copy_bandwidth = [&] {
    DeviceMemory src(static_cast<size_t>(o.copy_bytes)), dst(static_cast<size_t>(o.copy_bytes));
    GRADQ_BENCH_CUDA(cudaMemset(src.as<void>(), 1, static_cast<size_t>(o.copy_bytes)));
    GRADQ_BENCH_CUDA(cudaMemset(dst.as<void>(), 0, static_cast<size_t>(o.copy_bytes)));
    const auto secs = ctx.time_calls(o.warmup, std::max(o.repeat, 3), 1, [&](int) {
      GRADQ_BENCH_CUDA(cudaMemcpyAsync(dst.as<void>(), src.as<void>(), static_cast<size_t>(o.copy_bytes),
                                       cudaMemcpyDeviceToDevice, ctx.stream));
    });
    return make_copy_result(o.copy_bytes, secs,
                            fmt::format("cudaMemcpyAsync device to device of a {:.0f} MiB buffer; bytes = read + write",
                                        static_cast<double>(o.copy_bytes) / (1 << 20)));
  };
  out.copy = copy_bandwidth();
  if (log) *log << fmt::format("gpu: {}: copy bandwidth {:.1f} GB/s\n", out.name, out.copy.gb_per_s);
  const int64_t max_batch = *std::max_element(o.batches.begin(), o.batches.end());

  for (size_t si = 0; si < o.shapes.size(); ++si) {
    const BenchShape& shape = o.shapes[si];
    if (log) *log << fmt::format("gpu: {}x{} ...\n", shape.out_features, shape.in_features) << std::flush;
    GRADQ_CHECK(shape.out_features <= INT_MAX && shape.in_features <= INT_MAX && max_batch <= INT_MAX,
                "bench kernels (gpu): cuBLAS takes int sizes, got {}x{} with batch {}", shape.out_features,
                shape.in_features, max_batch);
    const int out_i = static_cast<int>(shape.out_features), in_i = static_cast<int>(shape.in_features);
    const at::Tensor w = bench_weight(shape, o.seed + si);
    const int n_f32 = rotation_copies(4 * weight_elems(shape), o.rotate_bytes);
    const int n_f16 = rotation_copies(2 * weight_elems(shape), o.rotate_bytes);
    const std::vector<DeviceMemory> w_f32 = upload_copies(w, n_f32);
    const std::vector<DeviceMemory> w_f16 = upload_copies(w.to(at::kHalf), n_f16);
    const DeviceMemory x = upload(bench_activations(max_batch, shape.in_features, o.seed + 1000 + si).to(at::kHalf));
    const DeviceMemory y(static_cast<size_t>(max_batch * shape.out_features) * sizeof(__half));
    const DeviceMemory workspace(kn::linear_workspace_bytes(max_batch, shape.out_features, shape.in_features));

    // fp16 linear, the baseline: cuBLAS with fp32 accumulation, row-major as in kernels/linear.cu.
    std::vector<OpResult> float_rows;
    for (int64_t batch : o.batches) {
      const auto secs = ctx.time_calls(o.warmup, o.repeat, n_f16, [&](int i) {
        const float alpha = 1.f, beta = 0.f;
        GRADQ_BENCH_CUBLAS(cublasGemmEx(ctx.cublas, CUBLAS_OP_T, CUBLAS_OP_N, out_i, static_cast<int>(batch), in_i,
                                        &alpha, w_f16[i].as<void>(), CUDA_R_16F, in_i, x.as<void>(), CUDA_R_16F, in_i,
                                        &beta, y.as<void>(), CUDA_R_16F, out_i, CUBLAS_COMPUTE_32F,
                                        CUBLAS_GEMM_DEFAULT));
      });
      float_rows.push_back(make_op_result("gpu", "linear_fp16", "fp16", shape, batch, 0,
                                          float_linear_bytes(shape, batch, 2), n_f16, secs));
    }

    for (const QuantSpec& spec : o.specs) {
      if (spec.sub_scale_bits != 0) {  // the kernels reject k formats (kernels/packed.cuh)
        if (log) *log << fmt::format("gpu: {}: skipped, the CUDA kernels do not read k sub-scales\n", spec.name());
        continue;
      }
      const int64_t packed = spec.storage_bytes(shape.out_features, shape.in_features);
      const int n_packed = rotation_copies(packed, o.rotate_bytes);
      std::vector<DevicePacked> p;
      for (int i = 0; i < n_packed; ++i) p.push_back(allocate_packed(spec, shape));
      auto quantize_into = [&](int src, int dst) {
        kn::QuantizeParams q;
        q.weight = w_f32[src].as<float>();
        q.codes = p[dst].codes.as<uint8_t>();
        q.scales = p[dst].scales.as<void>();
        q.zeros = spec.symmetric ? nullptr : p[dst].zeros.as<uint8_t>();
        q.out_features = shape.out_features;
        q.in_features = shape.in_features;
        q.bits = spec.bits();
        q.group_size = spec.group_size;
        q.symmetric = spec.symmetric;
        q.fp16_scale = spec.fp16_scale;
        q.zero_bits = spec.symmetric ? 8 : spec.zero_bits();
        check_status(kn::quantize_launch(q, ctx.stream));
      };
      // The GPU quantizer writes one byte per zero point (kernels/quantize.cuh): formats with b-bit
      // zero points are quantized on the CPU and uploaded, and their quantize is not timed here.
      const bool gpu_quantizes = spec.symmetric || spec.zero_bits() == 8;
      if (gpu_quantizes) {
        // Call i reads fp32 copy i % n_f32 and writes packed copy i % n_packed: with n_f32 inputs
        // cycling, consecutive calls never find their input in L2.
        int64_t next = 0;
        auto secs = ctx.time_calls(o.warmup, o.repeat, n_f32, [&](int i) {
          quantize_into(i, static_cast<int>(next++ % n_packed));
        });
        out.ops.push_back(make_op_result("gpu", "quantize", spec.name(), shape, 0, packed, quantize_bytes(spec, shape),
                                         n_f32, secs));
        for (int i = 0; i < n_packed; ++i) quantize_into(0, i);  // every copy holds the codes of w
      } else {
        if (log) *log << fmt::format("gpu: {}: quantize not timed (b-bit zero points: CPU quantizer)\n", spec.name());
        const PackedWeight host = gradq::quantize(w, spec);
        for (int i = 0; i < n_packed; ++i) {
          GRADQ_BENCH_CUDA(cudaMemcpy(p[i].codes.as<void>(), host.codes.data_ptr(), host.codes.nbytes(), cudaMemcpyHostToDevice));
          GRADQ_BENCH_CUDA(cudaMemcpy(p[i].scales.as<void>(), host.scales.data_ptr(), host.scales.nbytes(), cudaMemcpyHostToDevice));
          GRADQ_BENCH_CUDA(cudaMemcpy(p[i].zeros.as<void>(), host.zeros.data_ptr(), host.zeros.nbytes(), cudaMemcpyHostToDevice));
        }
      }

      auto secs = ctx.time_calls(o.warmup, o.repeat, n_packed, [&](int i) {
        kn::DequantizeParams d;
        d.weight = p[i].view(spec, shape);
        d.out_fp16 = w_f16[i % n_f16].as<__half>();
        check_status(kn::dequantize_launch(d, ctx.stream));
      });
      out.ops.push_back(make_op_result("gpu", "dequantize", spec.name(), shape, 0, packed,
                                       dequantize_bytes(spec, shape, 2), n_packed, secs));

      for (size_t bi = 0; bi < o.batches.size(); ++bi) {
        const int64_t batch = o.batches[bi];
        secs = ctx.time_calls(o.warmup, o.repeat, n_packed, [&](int i) {
          kn::LinearParams l;
          l.weight = p[i].view(spec, shape);
          l.x = x.as<__half>();
          l.y_fp16 = y.as<__half>();
          l.batch = batch;
          l.workspace = workspace.as<__half>();
          check_status(kn::linear_launch(l, ctx.cublas, ctx.stream));
        });
        OpResult r = make_op_result("gpu", "linear", spec.name(), shape, batch, packed,
                                    linear_bytes(spec, shape, batch, 2), n_packed, secs);
        r.speedup_vs_float = float_rows[bi].seconds / std::max(r.seconds, 1e-12);
        out.ops.push_back(r);
      }
    }
    GRADQ_BENCH_CUDA(cudaStreamSynchronize(ctx.stream));
    for (OpResult& r : float_rows) out.ops.push_back(std::move(r));
  }
  out.copy_after = copy_bandwidth();
  set_copy_reference(out);
}

}  // namespace gradq::bench::detail

// The module's entry point (gpu_bench_module.cpp). C linkage so that it is found by a plain name;
// the module and libgradq come from one build, so the C++ types crossing it are the same.
extern "C" __attribute__((visibility("default"))) void gradq_cuda_kernel_bench(
    const gradq::bench::KernelBenchOptions* options, gradq::bench::DeviceBench* out, std::ostream* log) {
  gradq::bench::detail::gpu_kernel_bench(*options, *out, log);
}
