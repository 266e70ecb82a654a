#!/usr/bin/python3
"""Trains two user-style zoo models briefly on TinyStories, so that their perplexity means something,
and saves them as TorchScript the way tools/make_zoo.py does (issue 14's comparison on zoo models).

    /usr/bin/python3 tools/train_zoo.py --out DIR [--steps 600] [--models meta_swiglu_gqa,gpt2]

Needs Debian's python3-torch and python3-sentencepiece (`apt-get install -y python3-torch
python3-sentencepiece`). The models are make_zoo.py's classes at a larger size (width 128, 4 layers):
  meta_swiglu_gqa  Meta names, bias-free nn.Linear, RMSNorm, rotary on pairs, GQA 4/2, SwiGLU, untied
                   head; saved with torch.jit.trace
  gpt2             GPT-2 names, Conv1D [in, out] weights with bias, LayerNorm, learned positions, MHA,
                   GELU, untied head; saved with torch.jit.script
Both fp32, vocab 512 (the stories260K tokenizer), context 256.

Which text trains them: the stories from 30% to 65% of the lines of third_party/assets/text/
tinystories_val.txt, with 65% to 70% to pick the best step. gradq's default data options read the
first 10% of the text's tokens for calibration and fitting and the windows after them for the
held-out measurements, and the independent evaluations of docs/BENCHMARKS.md read the last 30% of
the lines: none of that text is trained on.

One thread and fixed seeds: the same checkout and packages give the same weights.
"""

import argparse
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# make_zoo.py re-executes itself unless PYTHONHASHSEED is 0 and the working directory is the
# repository (it fixes what torch.jit.script and trace write); satisfy that before importing it.
if os.environ.get("PYTHONHASHSEED") != "0" or os.getcwd() != REPO:
    env = dict(os.environ, PYTHONHASHSEED="0", MAKE_ZOO_CWD=os.environ.get("MAKE_ZOO_CWD", os.getcwd()))
    os.chdir(REPO)
    os.execve(sys.executable, [sys.executable, "tools/train_zoo.py"] + sys.argv[1:], env)

sys.path.insert(0, os.path.join(REPO, "tools"))
import sentencepiece  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import make_zoo  # noqa: E402

CTX = 256
MODELS = {
    "meta_swiglu_gqa": (lambda: make_zoo.MetaLM(dim=128, heads=4, kv_heads=2, hidden=384, layers=4, swiglu=True,
                                                bias=False), "trace"),
    "gpt2": (lambda: make_zoo.GPT2LM(dim=128, heads=4, hidden=512, layers=4, tied=False), "script"),
}


def stream(tokenizer, lines):
    """The lines' tokens as one stream, as gradq reads a text (one encode of the joined text)."""
    return torch.tensor(tokenizer.encode("".join(lines)), dtype=torch.long)


def windows(tokens, starts, bos):
    """Windows of CTX tokens at `starts`, as gradq makes them: BOS, then the stream; targets the stream."""
    targets = torch.stack([tokens[s:s + CTX] for s in starts])
    inputs = torch.cat([torch.full((len(starts), 1), bos, dtype=torch.long), targets[:, :-1]], dim=1)
    return inputs, targets


def mean_loss(model, tokens, bos):
    """Mean next-token loss over consecutive windows covering `tokens`."""
    losses = []
    with torch.no_grad():
        for s in range(0, tokens.numel() - CTX + 1, CTX):
            inputs, targets = windows(tokens, [s], bos)
            losses.append(F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item())
    return sum(losses) / len(losses)


def train(name, tokenizer, train_tokens, val_tokens, steps, batch, out_dir):
    make, how = MODELS[name]
    torch.manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)))
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(1234)
    bos = tokenizer.bos_id()
    best, best_state, start = float("inf"), None, time.time()
    for step in range(1, steps + 1):
        model.train()
        starts = torch.randint(0, train_tokens.numel() - CTX, (batch,), generator=generator).tolist()
        inputs, targets = windows(train_tokens, starts, bos)
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            model.eval()
            val = mean_loss(model, val_tokens, bos)
            if val < best:
                best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
            print(f"{name}: step {step}/{steps}, train loss {loss.item():.3f}, validation loss {val:.3f} "
                  f"(perplexity {math.exp(val):.2f}), {time.time() - start:.0f} s", flush=True)
    model.load_state_dict(best_state)
    model.eval()
    example = torch.randint(0, make_zoo.VOCAB, (2, 16))
    saved = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example, check_trace=False)
    with torch.no_grad():
        probe = torch.randint(0, make_zoo.VOCAB, (1, 37))
        err = (saved(probe) - model(probe)).abs().max().item()
    assert err < 1e-4, (name, err)
    path = os.path.join(out_dir, name + ".pt")
    tmp = path + ".tmp"
    saved.save(tmp)
    os.replace(tmp, path)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {os.path.relpath(path, os.environ['MAKE_ZOO_CWD'])}: {params} parameters, best validation loss "
          f"{best:.3f} (perplexity {math.exp(best):.2f})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for the .pt files")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per model")
    parser.add_argument("--batch", type=int, default=8, help="windows of 256 tokens per step")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    args = parser.parse_args()
    args.out = os.path.join(os.environ["MAKE_ZOO_CWD"], args.out)
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            sys.exit(f"train_zoo: unknown model '{n}' (expected one of {', '.join(MODELS)})")
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(REPO, "third_party", "assets", "stories260K", "tok512.model"))
    with open(os.path.join(REPO, "third_party", "assets", "text", "tinystories_val.txt"), encoding="utf-8") as f:
        lines = f.readlines()
    n = len(lines)
    train_tokens = stream(tokenizer, lines[int(0.30 * n):int(0.65 * n)])
    val_tokens = stream(tokenizer, lines[int(0.65 * n):int(0.70 * n)])
    print(f"train_zoo: {train_tokens.numel()} training tokens, {val_tokens.numel()} validation tokens", flush=True)
    for name in names:
        train(name, tokenizer, train_tokens, val_tokens, args.steps, args.batch, args.out)


if __name__ == "__main__":
    main()
