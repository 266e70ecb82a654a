#!/usr/bin/python3
"""Would rotated weights quantize better? Writes stories260K as a scripted Meta-style TorchScript
(Meta names, so gradq splits it into blocks) whose every linear reads its input rotated:
y = (x R)(W R)^T = x W^T for an orthogonal R, so the model computes what stories260K computes (the
same perplexity), and a quantizer of W R sees an incoherent weight, as in QuIP and QuaRot. Each
block's four inputs (attention in, wo in, feed-forward in, w2 in) get their own R, a buffer the
quantizer leaves alone (docs/BENCHMARKS.md, "First-order perplexity prices").

    /usr/bin/python3 tools/study_rotation.py OUT.pt MODE [SEED]

MODE: none (R = I: stories260K as TorchScript), qr (random orthogonal, QR of a Gaussian) or had
(random-sign Hadamard where the width is a power of 2, else qr). Needs Debian's python3-torch.
"""
import math
import os
import struct
import sys
import torch, torch.nn as nn, torch.nn.functional as F

src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party/assets/stories260K/stories260K.bin")
out, mode = sys.argv[1], sys.argv[2]
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
raw = open(src, "rb").read()
dim, hidden, L, H, KVH, vocab, seq = struct.unpack("<7i", raw[:28])
data = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
off = 0
def take(*shape):
    global off
    n = math.prod(shape)
    t = data[off:off + n].clone().view(*shape)
    off += n
    return t
hs = dim // H
kv = KVH * hs
emb = take(vocab, dim); rms_att = take(L, dim); wq = take(L, dim, dim); wk = take(L, kv, dim)
wv = take(L, kv, dim); wo = take(L, dim, dim); rms_ffn = take(L, dim); w1 = take(L, hidden, dim)
w2 = take(L, dim, hidden); w3 = take(L, hidden, dim); rms_final = take(dim)
gen = torch.Generator().manual_seed(seed)

def hadamard(n):
    h = torch.ones(1, 1)
    while h.size(0) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)

def rotation(n):
    if mode == "none":
        return torch.eye(n)
    if mode == "had" and n & (n - 1) == 0:
        signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        return signs[:, None] * hadamard(n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()

class RMSNorm(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w.clone())
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

def lin(w):
    m = nn.Linear(w.size(1), w.size(0), bias=False)
    m.weight = nn.Parameter(w.clone())
    return m

class Attention(nn.Module):
    def __init__(self, i):
        super().__init__()
        self.heads, self.kv_heads, self.head_size = H, KVH, hs
        r_in, r_out = rotation(dim), rotation(dim)
        self.register_buffer("rot_in", r_in)
        self.register_buffer("rot_o", r_out)
        self.wq = lin(wq[i] @ r_in); self.wk = lin(wk[i] @ r_in); self.wv = lin(wv[i] @ r_in)
        self.wo = lin(wo[i] @ r_out)
    def rope(self, x, cos, sin):
        B, T, Hh, d = x.size()
        pairs = x.reshape(B, T, Hh, d // 2, 2)
        x0 = pairs[..., 0]; x1 = pairs[..., 1]
        c = cos.view(1, T, 1, d // 2); s = sin.view(1, T, 1, d // 2)
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).reshape(B, T, Hh, d)
    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        x = torch.matmul(x, self.rot_in)
        q = self.rope(self.wq(x).view(B, T, self.heads, self.head_size), cos, sin).transpose(1, 2)
        k = self.rope(self.wk(x).view(B, T, self.kv_heads, self.head_size), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.head_size).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1); v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_size)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        y = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(B, T, self.heads * self.head_size)
        return self.wo(torch.matmul(y, self.rot_o))

class FFN(nn.Module):
    def __init__(self, i):
        super().__init__()
        r_in, r_h = rotation(dim), rotation(hidden)
        self.register_buffer("rot_in", r_in)
        self.register_buffer("rot_h", r_h)
        self.w1 = lin(w1[i] @ r_in); self.w3 = lin(w3[i] @ r_in); self.w2 = lin(w2[i] @ r_h)
    def forward(self, x):
        x = torch.matmul(x, self.rot_in)
        return self.w2(torch.matmul(F.silu(self.w1(x)) * self.w3(x), self.rot_h))

class Block(nn.Module):
    def __init__(self, i):
        super().__init__()
        self.attention_norm = RMSNorm(rms_att[i]); self.attention = Attention(i)
        self.ffn_norm = RMSNorm(rms_ffn[i]); self.feed_forward = FFN(i)
    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.tok_embeddings.weight = nn.Parameter(emb.clone())
        self.layers = nn.ModuleList([Block(i) for i in range(L)])
        self.norm = RMSNorm(rms_final)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight
        inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2).float() / hs))
        ang = torch.outer(torch.arange(seq).float(), inv)
        self.register_buffer("freqs_cos", torch.cos(ang)); self.register_buffer("freqs_sin", torch.sin(ang))
    def forward(self, tokens):
        T = tokens.size(1)
        x = self.tok_embeddings(tokens)
        cos = self.freqs_cos[:T]; sin = self.freqs_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))

torch.jit.script(LM().eval()).save(out)
