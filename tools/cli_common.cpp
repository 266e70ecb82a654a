#include <iostream>

#include "cli.h"
#include "common/runtime.h"

namespace gradq::cli {

void add_common_options(cxxopts::Options& options) {
  options.add_options("general")
      ("threads", "CPU threads for libtorch (0 = all cores)", cxxopts::value<int>()->default_value("0"))
      ("h,help", "show this help");
}

bool parse(cxxopts::Options& options, int argc, char** argv, cxxopts::ParseResult& out) {
  out = options.parse(argc, argv);
  if (out.count("help")) {
    std::cout << options.help() << std::endl;
    return false;
  }
  if (!out.unmatched().empty()) throw cxxopts::exceptions::invalid_option_syntax(out.unmatched().front());
  set_threads(out["threads"].as<int>());
  return true;
}

}  // namespace gradq::cli
