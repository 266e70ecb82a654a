#!/usr/bin/python3
"""Builds the user-style model zoo: small random-init causal LMs saved as TorchScript the way users
write and save their own models (plain nn.Modules, torch.jit.script or torch.jit.trace).

    /usr/bin/python3 tools/make_zoo.py [--out tests/zoo/models]

Needs Debian's python3-torch (PyTorch 1.13, whose TorchScript format Debian's libtorch 1.13 reads):
`apt-get install -y python3-torch`. The output is deterministic (fixed seeds) and committed under
tests/zoo/models/; tests/zoo/README.md lists every model's features, and tests/zoo/test_zoo.cpp runs
every gradq command on each of them.

Every model maps tokens int64 [B, T] to logits [B, T, 512] in its own dtype (vocab 512, so the real
stories260K tokenizer and TinyStories text in third_party/assets drive them). The features, spread so
that each appears at least once and most models combine several:
  saving         torch.jit.script | torch.jit.trace
  linear bias    nn.Linear(bias=True) | nn.Linear(bias=False) | GPT-2 Conv1D ([in, out] weight, addmm)
  head           tied to the embedding | untied
  norm           nn.LayerNorm | RMSNorm
  positions      learned nn.Embedding | rotary (Meta adjacent pairs, Hugging Face rotate_half)
  attention      MHA | GQA
  MLP            GELU | SwiGLU
  names          Meta (layers.N.attention.wq) | Hugging Face Llama (model.layers.N.self_attn.q_proj)
                 | GPT-2 (transformer.h.N.attn.c_attn)
  dtype          fp32 | fp16 | bf16
fp16 and bf16 models are built in fp32 and cast after scripting or tracing (PyTorch 1.13 has no fp16
kernels on the CPU to trace with). Nothing in a forward creates a float tensor of a fixed dtype: the
causal mask is boolean (masked_fill) and rotary tables are buffers, so every model runs in the dtype
it is cast to.
"""

import argparse
import math
import os
import sys

# Same checkout, same bytes: torch.jit.script writes a module's constants in the order of a Python set,
# so string hashing is fixed (only possible at interpreter start), and torch.jit.trace records this
# file's path in its debug table, so the script runs as tools/make_zoo.py from the repository root.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTHONHASHSEED") != "0" or os.getcwd() != REPO:
    env = dict(os.environ, PYTHONHASHSEED="0", MAKE_ZOO_CWD=os.environ.get("MAKE_ZOO_CWD", os.getcwd()))
    os.chdir(REPO)
    os.execve(sys.executable, [sys.executable, "tools/make_zoo.py"] + sys.argv[1:], env)

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 512
MAX_CTX = 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Conv1D(nn.Module):
    """GPT-2's projection: weight stored [in, out], y = x @ W + b (transformers.pytorch_utils.Conv1D)."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def causal_attention(q, k, v):
    """q [B, H, T, hs], k and v [B, H, T, hs] -> [B, H, T, hs]; the mask is boolean so any dtype works."""
    T = q.size(2)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def rotary_tables(head_size: int):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.outer(torch.arange(MAX_CTX).float(), inv_freq)  # [MAX_CTX, head_size / 2]
    return torch.cos(angles), torch.sin(angles)


# ---- GPT-2 (Hugging Face GPT-2 names, Conv1D, LayerNorm, learned positions, GELU) -------------------
class GPT2Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(dim, 3 * dim)
        self.c_proj = Conv1D(dim, dim)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        y = causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class GPT2MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = Conv1D(dim, hidden)
        self.c_proj = Conv1D(hidden, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = GPT2Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = GPT2MLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, layers: int):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(MAX_CTX, dim)
        self.h = nn.ModuleList([GPT2Block(dim, heads, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, tokens):
        positions = torch.arange(tokens.size(1), device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LM(nn.Module):
    def __init__(self, dim=64, heads=4, hidden=128, layers=2, tied=False):
        super().__init__()
        self.transformer = GPT2Body(dim, heads, hidden, layers)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, tokens):
        return self.lm_head(self.transformer(tokens))


# ---- Meta Llama names (layers.N.attention.wq), RMSNorm or LayerNorm, adjacent-pair rotary --------
class MetaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, bias: bool):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_size = dim // heads
        self.wq = nn.Linear(dim, heads * self.head_size, bias=bias)
        self.wk = nn.Linear(dim, kv_heads * self.head_size, bias=bias)
        self.wv = nn.Linear(dim, kv_heads * self.head_size, bias=bias)
        self.wo = nn.Linear(heads * self.head_size, dim, bias=bias)

    def rope(self, x, cos, sin):
        B, T, H, hs = x.size()
        pairs = x.reshape(B, T, H, hs // 2, 2)
        x0 = pairs[..., 0]
        x1 = pairs[..., 1]
        c = cos.view(1, T, 1, hs // 2)
        s = sin.view(1, T, 1, hs // 2)
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(B, T, H, hs)

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        q = self.rope(self.wq(x).view(B, T, self.heads, self.head_size), cos, sin).transpose(1, 2)
        k = self.rope(self.wk(x).view(B, T, self.kv_heads, self.head_size), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_size).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = causal_attention(q, k, v).transpose(1, 2).reshape(B, T, self.heads * self.head_size)
        return self.wo(y)


class MetaSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MetaGELU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class MetaBlock(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, bias, swiglu, layernorm):
        super().__init__()
        norm = (lambda: nn.LayerNorm(dim)) if layernorm else (lambda: RMSNorm(dim))
        self.attention_norm = norm()
        self.attention = MetaAttention(dim, heads, kv_heads, bias)
        self.ffn_norm = norm()
        self.feed_forward = MetaSwiGLU(dim, hidden, bias) if swiglu else MetaGELU(dim, hidden, bias)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLM(nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=4, hidden=128, layers=2, bias=False, swiglu=True,
                 layernorm=False, tied=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(
            [MetaBlock(dim, heads, kv_heads, hidden, bias, swiglu, layernorm) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim) if layernorm else RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(dim // heads)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, tokens):
        T = tokens.size(1)
        x = self.tok_embeddings(tokens)
        cos = self.freqs_cos[:T]
        sin = self.freqs_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


# ---- Hugging Face Llama names (model.layers.N.self_attn.q_proj), rotate_half rotary --------------
def rotate_half(x):
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HFAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_size = dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_size, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_size, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_size, bias=qkv_bias)
        self.o_proj = nn.Linear(heads * self.head_size, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.heads, self.head_size).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_size).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_size).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = causal_attention(q, k, v).transpose(1, 2).reshape(B, T, self.heads * self.head_size)
        return self.o_proj(y)


class HFMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HFDecoderLayer(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, qkv_bias):
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = HFAttention(dim, heads, kv_heads, qkv_bias)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = HFMLP(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class HFModel(nn.Module):
    def __init__(self, dim, heads, kv_heads, hidden, layers, qkv_bias):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList([HFDecoderLayer(dim, heads, kv_heads, hidden, qkv_bias) for _ in range(layers)])
        self.norm = RMSNorm(dim)
        cos, sin = rotary_tables(dim // heads)
        # Hugging Face layout: the half-size table repeated, [MAX_CTX, head_size].
        self.register_buffer("rotary_cos", torch.cat((cos, cos), dim=-1))
        self.register_buffer("rotary_sin", torch.cat((sin, sin), dim=-1))

    def forward(self, tokens):
        T = tokens.size(1)
        x = self.embed_tokens(tokens)
        cos = self.rotary_cos[:T]
        sin = self.rotary_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class HFLlamaLM(nn.Module):
    def __init__(self, dim=64, heads=4, kv_heads=2, hidden=128, layers=2, qkv_bias=False, tied=True):
        super().__init__()
        self.model = HFModel(dim, heads, kv_heads, hidden, layers, qkv_bias)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens):
        return self.lm_head(self.model(tokens))


# ---- The zoo -----------------------------------------------------------------------------------------
# name: (constructor, save with, dtype, features for the README)
ZOO = {
    "gpt2_script": (lambda: GPT2LM(tied=False), "script", torch.float32,
                    "GPT-2 names, Conv1D [in,out] with bias, LayerNorm, learned positions, MHA, GELU, "
                    "untied bias-free nn.Linear head (issue 13's failing case)"),
    "gpt2_tied_trace_bf16": (lambda: GPT2LM(tied=True), "trace", torch.bfloat16,
                             "GPT-2 names, Conv1D, LayerNorm, learned positions, MHA, GELU, head tied to wte"),
    "meta_swiglu_gqa_trace": (lambda: MetaLM(kv_heads=2, swiglu=True, bias=False), "trace", torch.float32,
                              "Meta names, bias-free nn.Linear, RMSNorm, rotary (pairs), GQA 4/2, SwiGLU, untied head"),
    "meta_bias_gelu_fp16": (lambda: MetaLM(kv_heads=4, swiglu=False, bias=True, layernorm=True, layers=3),
                            "script", torch.float16,
                            "Meta names, nn.Linear with bias, LayerNorm, rotary (pairs), MHA, GELU, 3 layers, "
                            "untied head"),
    "hf_llama_tied_bf16": (lambda: HFLlamaLM(kv_heads=2, tied=True), "script", torch.bfloat16,
                           "Hugging Face Llama names, bias-free nn.Linear, RMSNorm, rotary (rotate_half), "
                           "GQA 4/2, SwiGLU, head tied to embed_tokens"),
    "hf_qkv_bias_trace_fp16": (lambda: HFLlamaLM(dim=96, heads=6, kv_heads=2, hidden=192, qkv_bias=True, tied=False),
                               "trace", torch.float16,
                               "Hugging Face Llama names, q/k/v nn.Linear with bias (Qwen style), dim 96, "
                               "RMSNorm, rotary (rotate_half), GQA 6/2, SwiGLU, untied head"),
}


def build(name: str):
    make, how, dtype, _ = ZOO[name]
    # One seed per model, derived from its name, so adding a model does not change the others.
    torch.manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)))
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.02)
    example = torch.randint(0, VOCAB, (2, 16))
    tokens = torch.randint(0, VOCAB, (1, 37))
    with torch.no_grad():
        want = model(tokens)
    saved = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example, check_trace=False)
    saved = saved.to(dtype)
    # A traced graph must not have frozen the length it was traced with (37, traced with 16).
    with torch.no_grad():
        got = saved.float()(tokens) if dtype == torch.float16 else saved(tokens).float()
        saved.to(dtype)
    assert got.shape == (1, 37, VOCAB), (name, got.shape)
    tolerance = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    err = (got - want).abs().max().item()
    assert err < tolerance, (name, err)
    return saved


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "zoo", "models"))
    args = parser.parse_args()
    args.out = os.path.join(os.environ["MAKE_ZOO_CWD"], args.out)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    for name in ZOO:
        path = os.path.join(args.out, name + ".pt")
        build(name).save(path)
        print(f"{os.path.relpath(path, os.environ['MAKE_ZOO_CWD'])}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
