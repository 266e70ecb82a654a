// gradq: the command-line front end. Each subcommand parses its options and calls the library.

#include <dlfcn.h>

#include <c10/util/Exception.h>

#include <cstring>
#include <iostream>

#include "cli.h"
#include "common/error.h"
#include "common/error_text.h"
#include "common/files.h"
#include "common/runtime.h"

namespace {
struct Command {
  const char* name;
  const char* summary;
  int (*run)(int, char**);
};

const Command kCommands[] = {
    {"convert", "convert a llama2.c checkpoint to TorchScript", gradq::cli::cmd_convert},
    {"generate", "greedy text generation with a model", gradq::cli::cmd_generate},
    {"eval", "perplexity and KL divergence against a reference model", gradq::cli::cmd_eval},
    {"analyze", "per-layer and per-block importance: probes, ranking, stability", gradq::cli::cmd_analyze},
    {"bench", "benchmarks (gradq bench kernels: quantization kernel throughput)", gradq::cli::cmd_bench},
    {"quantize", "quantize a model and write a packed TorchScript checkpoint", gradq::cli::cmd_quantize},
    {"sweep", "quantize over a list of budgets with uniform baselines: report, Pareto plot, regression gate", gradq::cli::cmd_sweep},
};

void print_usage() {
  std::cout << "gradq " << gradq::version()
            << ": post-training quantization of causal LMs to the smallest model within a quality budget\n\n"
               "usage: gradq <command> [options]   (gradq <command> --help for its options)\n\ncommands:\n";
  for (const auto& c : kCommands) std::cout << "  " << c.name << std::string(12 - std::strlen(c.name), ' ') << c.summary << "\n";
  std::cout << "\nWith no --model/--tokenizer/--text, commands use the embedded default: stories260K, its\n"
               "tokenizer and TinyStories text (" << gradq::assets_dir() << ").\n";
}

// The malloc this process runs on: tcmalloc when the build linked it first (GRADQ_ALLOCATOR), so
// that it replaced the C library's; "system" otherwise.
const char* heap_allocator() {
  void* tc = dlsym(RTLD_DEFAULT, "tc_malloc");
  return tc && tc == dlsym(RTLD_DEFAULT, "malloc") ? "tcmalloc" : "system";
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    print_usage();
    return argc < 2 ? gradq::cli::kExitError : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::cout << "gradq " << gradq::version() << " (heap allocator: " << heap_allocator() << ")\n";
    return 0;
  }
  for (const auto& c : kCommands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    gradq::install_interrupt_cleanup();
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const cxxopts::exceptions::exception& e) {
      std::cerr << "gradq " << c.name << ": error: " << e.what() << " (see gradq " << c.name << " --help)\n";
    } catch (const gradq::Error& e) {
      std::cerr << "gradq " << c.name << ": error: " << e.what() << "\n";
    } catch (const std::exception& e) {  // c10::Error, torch::jit::JITException among others
      std::cerr << "gradq " << c.name << ": error: " << gradq::essential_error_line(e) << "\n";
    }
    return gradq::cli::kExitError;
  }
  std::cerr << "gradq: error: unknown command '" << argv[1] << "' (see gradq --help)\n";
  return gradq::cli::kExitError;
}
