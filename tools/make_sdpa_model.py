#!/usr/bin/env python3
"""Writes a tiny causal LM whose attention is F.scaled_dot_product_attention, an op that PyTorch 2.0
introduced: a TorchScript file that libtorch 1.13 cannot load, for the test of gradq's message
naming the version problem (tests/zoo/test_zoo.cpp, tests/zoo/README.md).

    .venv-torch2/bin/python tools/make_sdpa_model.py tests/zoo/models_torch2/sdpa_script.pt

Needs PyTorch 2.x (tools/setup.sh --torch2). Vocab 512 like the zoo; random weights, fixed seed.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q = self.wq(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.wk(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.wv(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.wo(a.transpose(1, 2).reshape(b, t, d))


class Model(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 16, heads: int = 2, n_layers: int = 2):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([Block(dim, heads) for _ in range(n_layers)])
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(x)


def main():
    torch.manual_seed(0)
    torch.jit.script(Model().eval()).save(sys.argv[1])


if __name__ == "__main__":
    main()
