#pragma once
// Shared plumbing of the gradq subcommands: option parsing conventions and error reporting.

#include <cxxopts.hpp>

#include <map>
#include <string>
#include <vector>

#include "common/progress.h"
#include "data/dataset.h"
#include "model/causal_lm.h"
#include "orchestrator/gradual_quantizer.h"

namespace gradq::cli {

/// Exit codes: 0 success, 1 error (bad input, failed run), 2 quality budget not met.
constexpr int kExitError = 1;
constexpr int kExitBudgetUnmet = 2;

/// Exit code of `gradq sweep` when the regression gate (--compare-to) finds a regression.
constexpr int kExitRegression = 3;

/// Adds --threads and --help to a subcommand's options.
void add_common_options(cxxopts::Options& options);
/// Adds --device (default auto) to `group` of `options`: where the model runs.
void add_device_option(cxxopts::Options& options, const std::string& group = "");
/// How a command loads its model: the device --device names (gradq::Error naming the option and the
/// problem otherwise, see parse_device).
AdapterOptions read_adapter_options(const cxxopts::ParseResult& args);
/// Parses; prints help and returns false when --help was given. Applies --threads.
bool parse(cxxopts::Options& options, int argc, char** argv, cxxopts::ParseResult& out);

/// The comma-separated items of an option value, empty ones included ("a,,b" -> a, "", b).
std::vector<std::string> split_commas(const std::string& text);
/// Comma-separated integers ("8,4,2"); throws naming the flag otherwise.
std::vector<int64_t> parse_int_list(const std::string& text, const char* flag);

// --- The text as token ids (eval, analyze, quantize, sweep) -----------------------------------------
/// Adds --tokens and --bos-id to `group`: token ids made by the model's own tokenizer, instead of
/// --text through a SentencePiece --tokenizer.
void add_token_options(cxxopts::Options& options, const std::string& group = "");
/// The files the text comes from, by role: {"tokens"}, or {"text", "tokenizer"}.
std::map<std::string, std::string> text_inputs(const cxxopts::ParseResult& args);
/// Throws when `ids_option` (--tokens; generate's --prompt-ids) is given with `text_option` (--text;
/// --prompt) or --tokenizer, when one of `id_options` (--bos-id; generate's --eos-id too) is given
/// without it, or when one is below -1 (none).
void check_token_options(const cxxopts::ParseResult& args, const std::string& ids_option = "tokens",
                         const std::string& text_option = "text",
                         const std::vector<std::string>& id_options = {"bos-id"});

struct TokenStream {
  std::vector<int64_t> ids;
  int64_t bos_id = -1;          ///< prepended to every window when >= 0
  int64_t tokenizer_vocab = 0;  ///< the SentencePiece tokenizer's; 0 for --tokens
  /// Throws when the model has no logits for an id (or for the tokenizer's whole vocabulary).
  void check_fits(int64_t model_vocab) const;
};
/// The text's token ids (after check_token_options): --tokens as given (windows start with --bos-id),
/// or --text encoded by --tokenizer (windows start with its BOS).
TokenStream read_token_stream(const cxxopts::ParseResult& args);

// --- What `quantize` and `sweep` share -----------------------------------------------------------
/// Options groups "search" (how the plan is searched) and "files"/"data" (model, tokenizer, text
/// and how the text becomes calibration and held-out windows).
void add_search_options(cxxopts::Options& options);
/// Adds --reference-storage to `group` of `options` (eval, analyze, quantize, sweep).
void add_reference_storage_option(cxxopts::Options& options, const std::string& group = "");
/// The value of --reference-storage; throws gradq::Error naming the option and the accepted forms.
ReferenceStorage read_reference_storage_option(const cxxopts::ParseResult& args);
void add_input_options(cxxopts::Options& options);
/// Fills the search part of `q` (safety, search, analysis seed, policy, analysis file).
void read_search_options(const cxxopts::ParseResult& args, QuantizerOptions& q);
/// The input files the options name (model, tokenizer, text, analysis, policy): never outputs.
std::vector<std::string> input_paths(const cxxopts::ParseResult& args);

/// Checks the "data" options' values (window length, counts, batch, fraction) before any loading.
void check_input_options(const cxxopts::ParseResult& args);

/// The final line of a command that wrote files: every path, in order.
void print_written(const std::vector<std::string>& paths);

struct Inputs {
  CausalLM model;
  DataSplit split;
};
/// Loads the model and the tokenizer, checks they fit, and splits the text; prints one line saying
/// what was loaded.
Inputs load_inputs(const cxxopts::ParseResult& args);

int cmd_convert(int argc, char** argv);
int cmd_generate(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_analyze(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_quantize(int argc, char** argv);
int cmd_sweep(int argc, char** argv);

}  // namespace gradq::cli
