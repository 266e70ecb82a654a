// gradq bench kernels: the API and the CLI on small shapes with one repeat. Checks that every
// number is present, positive and finite, that the byte accounting is the one of QuantSpec (and of
// the tensors gradq::quantize really produces), and that bad options fail with a clear message.
// It does not check speed: the numbers of a real run go into docs/BENCHMARKS.md.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "bench/kernel_bench.h"
#include "bench/rounding_bench.h"
#include "quant/quantize.h"
#include "support/test_helpers.h"
#include "support/test_support.h"

namespace gradq::test {
namespace {

using bench::BenchShape;
using bench::KernelBenchOptions;
using bench::KernelBenchResult;
using bench::OpResult;

bool positive_finite(double v) { return std::isfinite(v) && v > 0; }

// Codes + scales + zero points that gradq::quantize really allocates for this spec and shape.
int64_t quantized_nbytes(const QuantSpec& spec, const BenchShape& s) {
  const PackedWeight p = quantize(gaussian(s.out_features, s.in_features, 7), spec);
  return p.codes.nbytes() + p.scales.nbytes() + (p.zeros.defined() ? p.zeros.nbytes() : 0);
}

KernelBenchOptions small_options() {
  KernelBenchOptions o;
  o.specs = bench::parse_bench_specs("b4g128,b3g64,b2g32s,b8grow-f32");
  // 200 inputs: partial last groups for g128, g64 and g32; 3-bit rows of 75 bytes.
  o.shapes = {{48, 200}, {17, 64}};
  o.batches = {1, 6};  // 6 > ops::kLinearFusedMaxRows: the dequantize + BLAS path too
  o.repeat = 1;
  o.warmup = 0;
  o.copy_bytes = 1 << 20;
  o.rotate_bytes = 1 << 16;  // a few copies of the small weights
  o.devices = bench::BenchDevices::kCpu;
  return o;
}

TEST(KernelBench, ApiRowsArePositiveAndBytesFollowTheSpec) {
  const KernelBenchOptions o = small_options();
  const KernelBenchResult r = bench::run_kernel_bench(o);
  ASSERT_TRUE(r.cpu.ran);
  EXPECT_FALSE(r.gpu.ran);
  EXPECT_EQ(r.gpu.skipped_reason, "not requested (--device cpu)");
  EXPECT_EQ(r.cpu.copy.bytes, 2 * o.copy_bytes);
  EXPECT_TRUE(positive_finite(r.cpu.copy.gb_per_s));
  EXPECT_TRUE(positive_finite(r.cpu.copy.seconds));
  EXPECT_EQ(r.cpu.copy_after.bytes, 2 * o.copy_bytes);
  EXPECT_TRUE(positive_finite(r.cpu.copy_after.gb_per_s));
  EXPECT_EQ(r.cpu.copy_gb_per_s, std::max(r.cpu.copy.gb_per_s, r.cpu.copy_after.gb_per_s));

  // Per shape: for every spec quantize + dequantize + one linear per batch; one fp32 linear per batch.
  const size_t per_shape = o.specs.size() * (2 + o.batches.size()) + o.batches.size();
  ASSERT_EQ(r.cpu.ops.size(), o.shapes.size() * per_shape);
  int quantize_rows = 0, linear_rows = 0, float_rows = 0;
  for (const OpResult& op : r.cpu.ops) {
    SCOPED_TRACE(op.op + " " + op.spec + " " + std::to_string(op.shape.out_features) + "x" +
                 std::to_string(op.shape.in_features) + " batch " + std::to_string(op.batch));
    EXPECT_EQ(op.device, "cpu");
    EXPECT_TRUE(positive_finite(op.seconds));
    EXPECT_TRUE(positive_finite(op.min_seconds));
    EXPECT_LE(op.min_seconds, op.seconds);
    EXPECT_TRUE(positive_finite(op.gb_per_s));
    EXPECT_TRUE(positive_finite(op.fraction_of_copy));
    EXPECT_NEAR(op.gb_per_s, static_cast<double>(op.bytes) / op.seconds / 1e9, 1e-9 * op.gb_per_s);
    EXPECT_NEAR(op.fraction_of_copy, op.gb_per_s / r.cpu.copy_gb_per_s, 1e-9 * op.fraction_of_copy);
    EXPECT_GE(op.copies, 1);
    const int64_t o_ = op.shape.out_features, i_ = op.shape.in_features;
    if (op.op == "linear_fp32") {
      ++float_rows;
      EXPECT_EQ(op.spec, "fp32");
      EXPECT_EQ(op.packed_bytes, 0);
      EXPECT_EQ(op.bytes, 4 * o_ * i_ + 4 * op.batch * (i_ + o_));
      EXPECT_EQ(op.speedup_vs_float, 0.0);
      continue;
    }
    const QuantSpec spec = parse_quant_spec(op.spec);
    EXPECT_EQ(op.packed_bytes, spec.storage_bytes(o_, i_));
    EXPECT_EQ(op.packed_bytes, quantized_nbytes(spec, op.shape));
    if (op.op == "quantize") {
      ++quantize_rows;
      EXPECT_EQ(op.batch, 0);
      EXPECT_EQ(op.bytes, 4 * o_ * i_ + op.packed_bytes);
    } else if (op.op == "dequantize") {
      EXPECT_EQ(op.bytes, op.packed_bytes + 4 * o_ * i_);
    } else {
      ASSERT_EQ(op.op, "linear");
      ++linear_rows;
      EXPECT_EQ(op.bytes, op.packed_bytes + 4 * op.batch * (i_ + o_));
      EXPECT_TRUE(positive_finite(op.speedup_vs_float));
    }
  }
  EXPECT_EQ(quantize_rows, static_cast<int>(o.shapes.size() * o.specs.size()));
  EXPECT_EQ(linear_rows, static_cast<int>(o.shapes.size() * o.specs.size() * o.batches.size()));
  EXPECT_EQ(float_rows, static_cast<int>(o.shapes.size() * o.batches.size()));

  // One CPU goal per spec, evaluated; the GPU goals say why they were not measured.
  int cpu_goals = 0;
  for (const bench::GoalResult& g : r.goals) {
    if (g.name.rfind("cpu ", 0) == 0) {
      ++cpu_goals;
      EXPECT_TRUE(g.evaluated) << g.name;
      EXPECT_TRUE(positive_finite(g.measured)) << g.name;
      EXPECT_EQ(g.met, g.measured >= 0.5) << g.name;
    } else {
      EXPECT_FALSE(g.evaluated) << g.name;
      EXPECT_NE(g.detail.find("not requested"), std::string::npos) << g.detail;
    }
  }
  EXPECT_EQ(cpu_goals, static_cast<int>(o.specs.size()));

  const std::string table = bench::format_kernel_bench(r);
  EXPECT_NE(table.find("copy bandwidth"), std::string::npos) << table;
  EXPECT_NE(table.find("GPU: skipped: not requested (--device cpu)"), std::string::npos) << table;
  EXPECT_NE(table.find("b3g64"), std::string::npos) << table;
}

TEST(KernelBench, ParsersRejectBadLists) {
  EXPECT_EQ(bench::parse_bench_shapes("4096x11008, 3X7").size(), 2u);
  EXPECT_EQ(bench::parse_bench_shapes("4096x11008")[0], (BenchShape{4096, 11008}));
  for (const char* bad : {"", "4096", "4096x", "x4096", "0x16", "16x-3", "4096x4096,", "4096*4096", "1e3x2"}) {
    const std::string msg = expect_error([&] { bench::parse_bench_shapes(bad); });
    EXPECT_NE(msg.find("--shapes"), std::string::npos) << bad << ": " << msg;
  }
  EXPECT_EQ(bench::parse_bench_specs("b4g128,b8g128,b3g64,b2g32").size(), 4u);
  EXPECT_NE(expect_error([] { bench::parse_bench_specs("b4g100"); }).find("cannot parse quantization spec 'b4g100'"),
            std::string::npos);
  EXPECT_NE(expect_error([] { bench::parse_bench_specs("b4g128,b7g128"); }).find("--spec 'b7g128': bits must be one of"),
            std::string::npos);
  EXPECT_NE(expect_error([] { bench::parse_bench_specs("b4g128,fp16"); }).find("--spec 'fp16': not an integer format"),
            std::string::npos);
  EXPECT_NE(expect_error([] { bench::parse_bench_batches("1,0"); }).find("--batch: cannot parse '0'"),
            std::string::npos);

  KernelBenchOptions o = small_options();
  o.specs = {parse_quant_spec("bf16")};
  EXPECT_NE(expect_error([&] { bench::run_kernel_bench(o); }).find("not an integer format"), std::string::npos);
  o = small_options();
  o.repeat = 0;
  EXPECT_NE(expect_error([&] { bench::run_kernel_bench(o); }).find("--repeat >= 1"), std::string::npos);
}

TEST(KernelBench, CliWritesJsonAndNamesTheGpuPart) {
  const std::string dir = temp_dir("bench_cli");
  const std::string json_path = dir + "/bench.json";
  const auto [code, out] = run(cli() + " bench kernels --shapes 40x160 --spec b4g128,b3g32 --batch 1,5 --repeat 1 "
                               "--warmup 0 --copy-mib 1 --rotate-mib 0 --threads 1 --json " + json_path + " 2>&1");
  ASSERT_EQ(code, 0) << out;
  std::ifstream in(json_path);
  ASSERT_TRUE(in) << "no JSON written: " << out;
  const nlohmann::json j = nlohmann::json::parse(in);

  EXPECT_EQ(j.at("bench"), "kernels");
  EXPECT_EQ(j.at("threads"), 1);
  EXPECT_EQ(j.at("options").at("specs"), nlohmann::json({"b4g128", "b3g32"}));
  EXPECT_EQ(j.at("options").at("shapes"), nlohmann::json({"40x160"}));
  EXPECT_NE(j.at("shape_convention").get<std::string>().find("out_features x in_features"), std::string::npos);
  const nlohmann::json& cpu = j.at("cpu");
  ASSERT_TRUE(cpu.at("ran").get<bool>());
  EXPECT_EQ(cpu.at("copy").at("bytes"), 2 << 20);
  EXPECT_TRUE(positive_finite(cpu.at("copy").at("gb_per_s").get<double>()));
  EXPECT_TRUE(positive_finite(cpu.at("copy_after").at("gb_per_s").get<double>()));
  EXPECT_TRUE(positive_finite(cpu.at("copy_gb_per_s").get<double>()));
  EXPECT_FALSE(cpu.at("bytes_counted").get<std::string>().empty());
  ASSERT_EQ(cpu.at("ops").size(), 2u * (2 + 2) + 2);
  for (const nlohmann::json& op : cpu.at("ops")) {
    for (const char* key : {"seconds", "min_seconds", "gb_per_s", "fraction_of_copy"})
      EXPECT_TRUE(positive_finite(op.at(key).get<double>())) << key << " in " << op.dump();
    EXPECT_GT(op.at("bytes").get<int64_t>(), 0) << op.dump();
    const std::string name = op.at("op");
    if (name == "linear") EXPECT_TRUE(positive_finite(op.at("speedup_vs_float").get<double>())) << op.dump();
    if (name != "linear_fp32") {
      const QuantSpec spec = parse_quant_spec(op.at("spec"));
      EXPECT_EQ(op.at("packed_bytes").get<int64_t>(), spec.storage_bytes(40, 160)) << op.dump();
      EXPECT_EQ(op.at("packed_bytes").get<int64_t>(), quantized_nbytes(spec, {40, 160})) << op.dump();
    }
  }
  // The GPU part either ran or says why not, in the JSON and in the printed table.
  const nlohmann::json& gpu = j.at("gpu");
  if (gpu.at("ran").get<bool>()) {
    EXPECT_FALSE(gpu.at("ops").empty());
  } else {
    const std::string why = gpu.at("skipped_reason");
    EXPECT_FALSE(why.empty());
    EXPECT_NE(out.find("GPU: skipped: " + why), std::string::npos) << out;
  }
  EXPECT_FALSE(j.at("goals").empty());
}

// The CUDA runtime and cuBLAS are mapped only by a process that asks for a GPU bench (they sit in
// libgradq_cuda_bench.so): linked into libgradq they cost every gradq process about 200 MiB of RSS.
// The dynamic loader's own log (LD_DEBUG=files) says which libraries a run opened.
TEST(KernelBench, OnlyAGpuBenchLoadsTheCudaLibraries) {
  const std::string dir = temp_dir("bench_cuda_libraries");
  const std::string args = " bench kernels --shapes 40x160 --spec b4g128 --batch 1 --repeat 1 --warmup 0 "
                           "--copy-mib 1 --rotate-mib 0 --threads 1 --json " + dir + "/bench.json";
  auto opened = [](const std::string& log, const std::string& lib) {  // a "file=<path or name> [...]" line
    std::istringstream lines(log);
    for (std::string line; std::getline(lines, line);) {
      const size_t file = line.find("file=");
      if (file != std::string::npos && line.find(lib, file) != std::string::npos) return true;
    }
    return false;
  };
  const auto [cpu_code, cpu_log] = run("LD_DEBUG=files " + cli() + args + " --device cpu 2>&1");
  ASSERT_EQ(cpu_code, 0) << cpu_log;
  EXPECT_FALSE(opened(cpu_log, "libcudart")) << "a CPU-only run loaded the CUDA runtime";
  EXPECT_FALSE(opened(cpu_log, "libcublas")) << "a CPU-only run loaded cuBLAS";

  const auto [all_code, all_log] = run("LD_DEBUG=files " + cli() + args + " --device all 2>&1");
  ASSERT_EQ(all_code, 0) << all_log;
  std::ifstream in(dir + "/bench.json");
  ASSERT_TRUE(in) << all_log;
  const nlohmann::json gpu = nlohmann::json::parse(in).at("gpu");
  const bool built_with_kernels =
      gpu.at("ran").get<bool>() || gpu.at("skipped_reason").get<std::string>().find("built without") == std::string::npos;
  EXPECT_EQ(opened(all_log, "libgradq_cuda_bench.so"), built_with_kernels) << gpu.dump();
  EXPECT_EQ(opened(all_log, "libcudart"), built_with_kernels) << gpu.dump();
}

TEST(KernelBench, CliRejectsBadOptionsWithOneClearLine) {
  struct Case {
    std::string args, message;
  };
  const Case cases[] = {
      {"bench kernels --spec b4g100", "gradq bench: error: --spec 'b4g100': cannot parse quantization spec 'b4g100'"},
      {"bench kernels --spec b7g128", "gradq bench: error: --spec 'b7g128': bits must be one of 2, 3, 4, 5, 6, 8, got 7"},
      {"bench kernels --spec b4g128,prune", "gradq bench: error: --spec 'prune': not an integer format"},
      {"bench kernels --shapes 4096by4096", "gradq bench: error: --shapes: cannot parse '4096by4096'"},
      {"bench kernels --shapes 64x0", "gradq bench: error: --shapes: cannot parse '64x0'"},
      {"bench kernels --device tpu", "gradq bench: error: --device must be cpu, gpu or all, got 'tpu'"},
      {"bench nothing", "gradq bench: error: unknown bench target 'nothing'; available: kernels"},
  };
  for (const Case& c : cases) {
    const auto [code, out] = run(cli() + " " + c.args + " 2>&1");
    EXPECT_EQ(code, 1) << c.args << ": " << out;
    EXPECT_NE(out.find(c.message), std::string::npos) << c.args << ": " << out;
    EXPECT_EQ(out.find("copy bandwidth"), std::string::npos) << c.args << ": no measurement expected, got " << out;
  }
  const auto [code, out] = run(cli() + " bench --help 2>&1");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("kernels"), std::string::npos) << out;

  // The GPU alone either runs or is an error that says why, never a silent success.
  const auto [gpu_code, gpu_out] = run(cli() + " bench kernels --device gpu --shapes 16x64 --batch 1,2 --repeat 1 "
                                       "--warmup 0 --copy-mib 1 --rotate-mib 0 2>&1");
  if (gpu_code == 0) {
    EXPECT_NE(gpu_out.find("GPU ("), std::string::npos) << gpu_out;
    EXPECT_EQ(gpu_out.find("GPU: skipped"), std::string::npos) << gpu_out;
  } else {
    EXPECT_EQ(gpu_code, 1) << gpu_out;
    EXPECT_NE(gpu_out.find("gradq bench: error: bench kernels: the GPU part was asked for alone (--device gpu) but "
                           "cannot run: "),
              std::string::npos)
        << gpu_out;
  }
}

// gradq bench rounding: one row per method x spec x shape, every number positive and finite, round
// to nearest at ratio 1 to itself, GPTQ below it and trained rounding not above it (the output
// error is what they minimise); the CLI prints the table and rejects an unknown method.
TEST(RoundingBench, RowsPerMethodAndErrorsAgainstRoundToNearest) {
  bench::RoundingBenchOptions o;
  o.specs = bench::parse_bench_specs("b4g32,b3g64s");
  o.shapes = {{24, 96}, {5, 40}};
  o.rounding.trained.iterations = 20;
  o.rows = 256;
  const std::vector<bench::RoundingBenchRow> rows = bench::run_rounding_bench(o);
  ASSERT_EQ(rows.size(), o.specs.size() * o.shapes.size() * o.methods.size());
  for (const bench::RoundingBenchRow& r : rows) {
    EXPECT_TRUE(positive_finite(r.wall_seconds));
    EXPECT_TRUE(std::isfinite(r.cpu_seconds) && r.cpu_seconds >= 0);
    EXPECT_TRUE(positive_finite(r.output_error));
    if (r.method == RoundingMethod::kRtn) EXPECT_EQ(r.error_vs_rtn, 1.0);
    if (r.method == RoundingMethod::kGptq) EXPECT_LT(r.error_vs_rtn, 1.0);
    // Trained rounding keeps round-to-nearest when no iterate beats it (20 steps on these small layers).
    if (r.method == RoundingMethod::kTrained) EXPECT_LE(r.error_vs_rtn, 1.0);
  }
  const std::string table = bench::format_rounding_bench(rows, 1);
  EXPECT_NE(table.find("| gptq | b4g32 | 24x96 |"), std::string::npos) << table;
  auto [rc, out] = test::run(test::cli() + " bench rounding --shapes 8x32 --spec b4g16 --method rtn,gptq --threads 1");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("| gptq | b4g16 | 8x32 |"), std::string::npos) << out;
  auto [brc, bout] = test::run(test::cli() + " bench rounding --method round 2>&1");
  EXPECT_EQ(brc, 1) << bout;
  EXPECT_NE(bout.find("got 'round'"), std::string::npos) << bout;
}

}  // namespace
}  // namespace gradq::test
