// gradq bench <target>: benchmarks whose numbers go into docs/BENCHMARKS.md. Each target is a row
// of kBenchTargets; the logic lives in csrc/bench.

#include <cstring>
#include <iostream>

#include <ATen/Parallel.h>

#include "bench/kernel_bench.h"
#include "bench/rounding_bench.h"
#include "cli.h"
#include "common/error.h"
#include "common/files.h"

namespace gradq::cli {
namespace {

int bench_kernels(int argc, char** argv) {
  cxxopts::Options options(
      "gradq bench kernels",
      "Throughput of quantize+pack, dequantize and the quantized linear on the CPU and (when gradq was built with "
      "its CUDA kernels and a device is present) the GPU, in GB/s of compulsory bytes and as a fraction of the "
      "copy bandwidth measured in the same run, and the ratio against the float linear (fp32 on the CPU, fp16 on "
      "the GPU) on the same shapes. Shapes are out_features x in_features (W [out, in], y = x W^T).");
  options.add_options()
      ("spec", "integer formats, comma-separated (e.g. b4g128,b8g128,b3g64,b2g32)", cxxopts::value<std::string>()->default_value("b4g128"))
      ("shapes", "weight shapes OUTxIN, comma-separated", cxxopts::value<std::string>()->default_value("4096x4096,4096x11008,11008x4096"))
      ("batch", "activation rows of the linear, comma-separated", cxxopts::value<std::string>()->default_value("1,8"))
      ("repeat", "timed calls per measurement (the median is reported)", cxxopts::value<int>()->default_value("10"))
      ("warmup", "untimed calls before them (at least one per input copy)", cxxopts::value<int>()->default_value("2"))
      ("device", "cpu, gpu or all (the GPU part reports why it is skipped when it cannot run)", cxxopts::value<std::string>()->default_value("all"))
      ("copy-mib", "size of the copy-bandwidth buffer in MiB (source and destination each)", cxxopts::value<int64_t>()->default_value("1024"))
      ("rotate-mib", "consecutive calls cycle through input copies spanning at least this many MiB, so no "
                     "input is timed from cache (0: one copy)", cxxopts::value<int64_t>()->default_value("512"))
      ("fresh-outputs", "CPU: leave glibc's allocator at its defaults, so that large outputs are fresh mappings "
                        "and their page faults are timed (default: freed outputs are reused, as in a long run)")
      ("seed", "seed of the Gaussian weights and activations", cxxopts::value<uint64_t>()->default_value("0"))
      ("json", "also write the results as JSON to this file (written atomically)", cxxopts::value<std::string>());
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;

  bench::KernelBenchOptions o;
  o.specs = bench::parse_bench_specs(args["spec"].as<std::string>());
  o.shapes = bench::parse_bench_shapes(args["shapes"].as<std::string>());
  o.batches = bench::parse_bench_batches(args["batch"].as<std::string>());
  o.repeat = args["repeat"].as<int>();
  o.warmup = args["warmup"].as<int>();
  GRADQ_CHECK(o.repeat >= 1, "--repeat must be >= 1, got {}", o.repeat);
  GRADQ_CHECK(o.warmup >= 0, "--warmup must be >= 0, got {}", o.warmup);
  const std::string device = args["device"].as<std::string>();
  GRADQ_CHECK(device == "all" || device == "cpu" || device == "gpu", "--device must be cpu, gpu or all, got '{}'", device);
  o.devices = device == "cpu" ? bench::BenchDevices::kCpu : device == "gpu" ? bench::BenchDevices::kGpu : bench::BenchDevices::kAll;
  const int64_t copy_mib = args["copy-mib"].as<int64_t>(), rotate_mib = args["rotate-mib"].as<int64_t>();
  GRADQ_CHECK(copy_mib >= 1 && copy_mib <= (int64_t{1} << 20), "--copy-mib must be in 1..{}, got {}", int64_t{1} << 20, copy_mib);
  GRADQ_CHECK(rotate_mib >= 0 && rotate_mib <= (int64_t{1} << 20), "--rotate-mib must be in 0..{}, got {}", int64_t{1} << 20, rotate_mib);
  o.copy_bytes = copy_mib << 20;
  o.rotate_bytes = rotate_mib << 20;
  o.seed = args["seed"].as<uint64_t>();
  o.reuse_outputs = !args.count("fresh-outputs");

  const bench::KernelBenchResult result = bench::run_kernel_bench(o, &std::cerr);
  std::cout << bench::format_kernel_bench(result) << std::flush;
  if (args.count("json")) write_file_atomically(args["json"].as<std::string>(), bench::kernel_bench_json(result));
  return 0;
}

int bench_rounding(int argc, char** argv) {
  cxxopts::Options options(
      "gradq bench rounding",
      "Time (wall and process CPU seconds) and layer output error trace(dW XtX dW^T) of each rounding method on "
      "Gaussian weights with a synthetic calibration XtX (channels of unequal magnitude). Shapes are "
      "out_features x in_features.");
  options.add_options()
      ("spec", "integer formats, comma-separated", cxxopts::value<std::string>()->default_value("b4g128"))
      ("shapes", "weight shapes OUTxIN, comma-separated", cxxopts::value<std::string>()->default_value("768x768,256x688"))
      ("method", "rounding methods, comma-separated (rtn, clip, gptq, trained)", cxxopts::value<std::string>()->default_value("rtn,clip,gptq,trained"))
      ("trained-iterations", "signed-gradient steps of trained rounding", cxxopts::value<int>()->default_value("200"))
      ("gptq-refit", "refit GPTQ's group scales by least squares to its codes")
      ("rows", "calibration rows behind XtX", cxxopts::value<int64_t>()->default_value("2048"))
      ("seed", "seed of the weights and activations", cxxopts::value<uint64_t>()->default_value("0"));
  add_common_options(options);
  cxxopts::ParseResult args;
  if (!parse(options, argc, argv, args)) return 0;
  bench::RoundingBenchOptions o;
  o.specs = bench::parse_bench_specs(args["spec"].as<std::string>());
  o.shapes = bench::parse_bench_shapes(args["shapes"].as<std::string>());
  o.methods.clear();
  for (const std::string& m : split_commas(args["method"].as<std::string>())) o.methods.push_back(parse_rounding_method(m));
  o.rounding.trained.iterations = args["trained-iterations"].as<int>();
  o.rounding.gptq.refit_scales = args.count("gptq-refit") > 0;
  o.rows = args["rows"].as<int64_t>();
  GRADQ_CHECK(o.rows >= 1, "--rows must be >= 1, got {}", o.rows);
  o.seed = args["seed"].as<uint64_t>();
  const std::vector<bench::RoundingBenchRow> rows = bench::run_rounding_bench(o, &std::cerr);
  std::cout << bench::format_rounding_bench(rows, at::get_num_threads()) << std::flush;
  return 0;
}

struct BenchTarget {
  const char* name;
  const char* summary;
  int (*run)(int, char**);
};

const BenchTarget kBenchTargets[] = {
    {"kernels", "quantize, dequantize and quantized linear vs copy bandwidth and the float linear", bench_kernels},
    {"rounding", "time and layer output error of the rounding methods (rtn, clip, gptq, trained)", bench_rounding},
};

void print_bench_usage() {
  std::cout << "usage: gradq bench <target> [options]   (gradq bench <target> --help for its options)\n\ntargets:\n";
  for (const auto& t : kBenchTargets)
    std::cout << "  " << t.name << std::string(12 - std::strlen(t.name), ' ') << t.summary << "\n";
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    print_bench_usage();
    return argc < 2 ? kExitError : 0;
  }
  for (const auto& t : kBenchTargets)
    if (!std::strcmp(argv[1], t.name)) return t.run(argc - 1, argv + 1);
  std::string names;
  for (const auto& t : kBenchTargets) names += (names.empty() ? "" : ", ") + std::string(t.name);
  throw Error(fmt::format("unknown bench target '{}'; available: {}", argv[1], names));
}

}  // namespace gradq::cli
