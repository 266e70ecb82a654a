#!/usr/bin/env python3
"""Hugging Face transformers' own model classes, random init, traced as TorchScript the way users do.

tools/make_zoo.py writes plain nn.Modules with Hugging Face parameter names; this script runs the
real modeling code (LlamaForCausalLM, Qwen2ForCausalLM, ...) with eager attention and traces it in the
three ways a user gets a TorchScript file out of it: a wrapper that returns the tuple of
`return_dict=False` (what `torchscript=True` gave in transformers 4), the model itself traced with
`strict=False` (its output a dict holding "logits"), and a wrapper that returns the logits alone.
Every model has vocab 512 (the stories260K tokenizer and TinyStories text drive them), 2 layers and
width 64; each file's trace is checked against the eager model at other lengths and batch sizes.

  .venv-torch2/bin/pip install 'transformers==5.25.0'   # once (bash tools/setup.sh --torch2 first)
  .venv-torch2/bin/python tools/make_hf_zoo.py --out tests/zoo/models_hf
"""
import argparse
import os
import sys

import torch
import transformers as T

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)

# name: (config class, model class, config options, dtype, how it is traced)
MODELS = {
    "hf_llama_tuple_bf16": (T.LlamaConfig, T.LlamaForCausalLM, dict(LLAMA_LIKE, tie_word_embeddings=False),
                            torch.bfloat16, "tuple"),
    "hf_qwen2_tied_dict": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(LLAMA_LIKE, tie_word_embeddings=True),
                           torch.float32, "dict"),
    "hf_gpt2_tuple": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
                      torch.float32, "tuple"),
    "hf_phi3_fused_tensor": (T.Phi3Config, T.Phi3ForCausalLM, dict(LLAMA_LIKE, tie_word_embeddings=False),
                             torch.float32, "tensor"),
    "hf_gemma_tied_dict_bf16": (T.GemmaConfig, T.GemmaForCausalLM, dict(LLAMA_LIKE, head_dim=16),
                                torch.bfloat16, "dict"),
    "hf_opt_tuple": (T.OPTConfig, T.OPTForCausalLM,
                     dict(hidden_size=64, ffn_dim=176, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=64), torch.float32, "tuple"),
    # fp16 traced: its attention masks are made in fp16 inside the trace, which gradq's float32 CPU
    # path for fp16 models cannot run (a test expects the one-line refusal that says so).
    "hf_gpt2_fp16_cpu_refused": (T.GPT2Config, T.GPT2LMHeadModel,
                                 dict(n_embd=16, n_layer=1, n_head=2, n_positions=512), torch.float16, "tuple"),
}


class ReturnTuple(torch.nn.Module):
    """forward(tokens) -> the model's tuple output (logits first), as return_dict=False gives it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model(input_ids=tokens, use_cache=False, return_dict=False)


class ReturnLogits(ReturnTuple):
    """forward(tokens) -> logits."""

    def forward(self, tokens):
        return self.model(input_ids=tokens, use_cache=False, return_dict=False)[0]


def logits_of(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    return output[0]


def build(name, seed):
    config_class, model_class, options, dtype, how = MODELS[name]
    torch.manual_seed(seed)
    config = config_class(**COMMON, **options, use_cache=False)
    config._attn_implementation = "eager"  # sdpa's trace calls an op libtorch 1.13 lacks
    model = model_class(config).eval().to(dtype)
    example = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        if how == "dict":
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
        else:
            wrapper = ReturnTuple(model) if how == "tuple" else ReturnLogits(model)
            traced = torch.jit.trace(wrapper, example, check_trace=False)
        # Traces fix Python control flow: check other lengths and batch sizes against the eager model.
        for shape in [(1, 256), (2, 48), (1, 5)]:
            tokens = torch.randint(0, VOCAB, shape)
            want = model(input_ids=tokens, use_cache=False).logits
            got = logits_of(traced(tokens))
            if got.shape != want.shape or not torch.equal(got, want):
                sys.exit(f"{name}: the trace differs from the eager model at {shape}")
    return traced


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the .pt files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("names", nargs="*", help=f"models to build (default: all of {', '.join(MODELS)})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for name in args.names or MODELS:
        traced = build(name, args.seed)
        path = os.path.join(args.out, name + ".pt")
        traced.save(path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"{path}: {os.path.getsize(path)} bytes (transformers {T.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
