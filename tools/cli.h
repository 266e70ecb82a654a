#pragma once
// Shared plumbing of the gradq subcommands: option parsing conventions and error reporting.

#include <cxxopts.hpp>

#include <string>

namespace gradq::cli {

/// Exit codes: 0 success, 1 error (bad input, failed run), 2 quality budget not met.
constexpr int kExitError = 1;
constexpr int kExitBudgetUnmet = 2;

/// Adds --threads and --help to a subcommand's options.
void add_common_options(cxxopts::Options& options);
/// Parses; prints help and returns false when --help was given. Applies --threads.
bool parse(cxxopts::Options& options, int argc, char** argv, cxxopts::ParseResult& out);

int cmd_convert(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_analyze(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_quantize(int argc, char** argv);

}  // namespace gradq::cli
