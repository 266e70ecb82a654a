#!/usr/bin/env python3
"""Writes a random-weight llama2.c legacy checkpoint of a chosen shape (benchmarks of cost against
depth and width; the weights carry no knowledge, only their shapes and scales are realistic).

The layout is the one gradq's reader documents (csrc/model/llama2c.h): header of 7 int32, then float32
tensors, [out, in] matrices.

Scales: matrices ~ N(0, 1/in) so every block keeps the residual's scale; norms 1; embedding ~ N(0, 0.1^2)
so that tied logits (x @ E^T over a unit-RMS x) have a spread of about sqrt(dim) * 0.1, neither uniform
nor one-hot.

Two generators (--backend), each seeded by --seed and deterministic, giving different bytes:
  stdlib  Python's random.Random(seed).gauss(0, std) in float64, rounded to float32, tensor after tensor.
          Standard library only, so it runs wherever the benchmarks run; about 1.7 s per million
          parameters on the 2-core VM (half an hour at TinyLlama-1.1B's shapes). The files of earlier
          benchmarks came from it.
  torch   torch.Generator().manual_seed(seed), torch.randn in float32 in chunks of 2^24 values, times
          std in float32; the same bytes for the same seed, shapes and torch version (torch does not
          promise its random streams across versions; the thread count does not change them). 970M
          parameters in 142 s, 11 s of it CPU, the rest writing the 3.9 GB.
  auto    (default) torch when it can be imported on a little-endian machine, otherwise stdlib; the
          line printed at the end names the one used.
Norm weights and the RoPE tables are the same in both.

  python3 tools/make_random_llama2c.py --dim 256 --layers 8 -o /tmp/d256_l8.bin
  .venv-torch2/bin/python tools/make_random_llama2c.py --dim 2048 --hidden 5632 --heads 32 --kv-heads 4 \\
      --layers 22 --seq-len 2048 -o /tmp/tl22.bin
"""
import argparse
import array
import ctypes
import math
import os
import random
import struct
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--hidden", type=int, default=0, help="feed-forward width (default: llama2.c's rule, "
                   "2/3 of 4*dim rounded up to a multiple of 32)")
    p.add_argument("--heads", type=int, default=0, help="default dim/32")
    p.add_argument("--kv-heads", type=int, default=0, help="default: heads")
    p.add_argument("--vocab", type=int, default=512, help="must match the tokenizer (stories260K's: 512)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("auto", "stdlib", "torch"), default="auto",
                   help="random generator (above); auto: torch when importable")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()

    heads = a.heads or max(1, a.dim // 32)
    kv_heads = a.kv_heads or heads
    hidden = a.hidden or 32 * math.ceil((2 * 4 * a.dim // 3) / 32)
    if a.dim % heads or heads % kv_heads:
        print(f"make_random_llama2c: dim {a.dim} must divide by heads {heads}, heads by kv heads {kv_heads}",
              file=sys.stderr)
        return 1
    head_size = a.dim // heads
    kv_dim = head_size * kv_heads
    backend = a.backend
    torch = None
    if backend in ("auto", "torch"):
        try:
            import torch  # noqa: F811
        except ImportError:
            if backend == "torch":
                print("make_random_llama2c: --backend torch, but torch cannot be imported", file=sys.stderr)
                return 1
        if torch is not None and sys.byteorder != "little":
            if backend == "torch":
                print("make_random_llama2c: --backend torch writes native byte order; this machine is "
                      "big-endian", file=sys.stderr)
                return 1
            torch = None
        backend = "torch" if torch is not None else "stdlib"
    rng = random.Random(a.seed)
    gen = torch.Generator().manual_seed(a.seed) if torch is not None else None
    tmp = f"{a.output}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<7i", a.dim, hidden, a.layers, heads, kv_heads, a.vocab, a.seq_len))

        def gauss(count: int, std: float) -> None:
            if gen is not None:
                chunk = 1 << 24
                for start in range(0, count, chunk):
                    t = torch.randn(min(chunk, count - start), generator=gen, dtype=torch.float32)
                    t.mul_(std)
                    # Written from the tensor's memory: no numpy needed (PyTorch 2.x venvs often lack it).
                    f.write((ctypes.c_char * (t.numel() * 4)).from_address(t.data_ptr()))
                return
            buf = array.array("f", (rng.gauss(0.0, std) for _ in range(count)))
            if sys.byteorder != "little":
                buf.byteswap()
            buf.tofile(f)

        def ones(count: int) -> None:
            array.array("f", [1.0] * count).tofile(f)

        L = a.layers
        gauss(a.vocab * a.dim, 0.1)                      # tok_embeddings (tied head)
        ones(L * a.dim)                                  # rms_att
        gauss(L * a.dim * a.dim, a.dim ** -0.5)          # wq
        gauss(L * kv_dim * a.dim, a.dim ** -0.5)         # wk
        gauss(L * kv_dim * a.dim, a.dim ** -0.5)         # wv
        gauss(L * a.dim * a.dim, a.dim ** -0.5)          # wo
        ones(L * a.dim)                                  # rms_ffn
        gauss(L * hidden * a.dim, a.dim ** -0.5)         # w1
        gauss(L * a.dim * hidden, hidden ** -0.5)        # w2
        gauss(L * hidden * a.dim, a.dim ** -0.5)         # w3
        ones(a.dim)                                      # rms_final
        # RoPE tables (theta 10000), which readers may skip.
        half = head_size // 2
        freqs = [1.0 / (10000.0 ** (2 * i / head_size)) for i in range(half)]
        array.array("f", (math.cos(t * fr) for t in range(a.seq_len) for fr in freqs)).tofile(f)
        array.array("f", (math.sin(t * fr) for t in range(a.seq_len) for fr in freqs)).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, a.output)
    params = a.vocab * a.dim + L * (2 * a.dim * a.dim + 2 * kv_dim * a.dim + 3 * hidden * a.dim)
    print(f"{a.output}: dim {a.dim}, hidden {hidden}, layers {L}, heads {heads}/{kv_heads}, "
          f"{params / 1e6:.2f}M parameters, {backend} generator")
    return 0


if __name__ == "__main__":
    sys.exit(main())
