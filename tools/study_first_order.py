#!/usr/bin/python3
"""How well does the calibration text's gradient predict what a quantized weight does to perplexity
on other text? (docs/BENCHMARKS.md, "First-order perplexity prices")

    gradq quantize --model M.pt --uniform b3g32 --fake-quant FQ.pt -o /tmp/x.pt
    /usr/bin/python3 tools/study_first_order.py M.pt FQ.pt [CALIBRATION_WINDOWS]

For each quantizable weight (layers.*, 2-D) alone at its fake-quant value, it measures the change of
the mean NLL and the KL against the model, on CALIBRATION_WINDOWS (default 16) windows of 256 tokens
from the start of the embedded TinyStories text and on 64 held-out windows from 10% of the way in,
and the first-order term <g, W_q - W> with g the gradient of the mean NLL on each of the two. A
perplexity change is the KL (second order at the reference) plus that first-order term; the study
prints how much of the held-out part that KL misses (dNLL - KL) the calibration gradient predicts.
Needs Debian's python3-torch and python3-sentencepiece; one thread.
"""
import os
import sys

import sentencepiece as spm
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = 256
torch.set_num_threads(1)
model = torch.jit.load(sys.argv[1]).eval()
fake_quant = dict(torch.jit.load(sys.argv[2]).named_parameters())
calibration_windows = int(sys.argv[3]) if len(sys.argv) > 3 else 16
sp = spm.SentencePieceProcessor(model_file=os.path.join(REPO, "third_party/assets/stories260K/tok512.model"))
ids = sp.encode(open(os.path.join(REPO, "third_party/assets/text/tinystories_val.txt")).read())


def windows(start, n):
    """n windows from token `start`: BOS + 255 tokens in, the 256 tokens out."""
    rows = []
    for w in range(n):
        t = ids[start + w * CTX:start + (w + 1) * CTX]
        rows.append([1] + t[:-1] + t)
    x = torch.tensor(rows)
    return x[:, :CTX], x[:, CTX:]


calibration = windows(0, calibration_windows)
held_out = windows(len(ids) // 10, 64)
params = dict(model.named_parameters())
names = [n for n in params if n.startswith("layers.") and params[n].dim() == 2]


def log_probs(data):
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(data[0][i:i + 8]).float(), -1) for i in range(0, data[0].size(0), 8)])


def nll_and_kl(data, reference):
    lp = log_probs(data)
    nll = -lp.gather(-1, data[1].unsqueeze(-1)).mean().item()
    kl = (reference.exp() * (reference - lp)).sum(-1).mean().item()
    return nll, kl


def gradients(data):
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    n = data[0].size(0)
    for i in range(0, n, 8):
        lp = torch.log_softmax(model(data[0][i:i + 8]).float(), -1)
        (-lp.gather(-1, data[1][i:i + 8].unsqueeze(-1)).sum() / (n * CTX)).backward()
    g = {k: params[k].grad.clone() for k in names}
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None
    return g


ref_c, ref_h = log_probs(calibration), log_probs(held_out)
nll_c0 = -ref_c.gather(-1, calibration[1].unsqueeze(-1)).mean().item()
nll_h0 = -ref_h.gather(-1, held_out[1].unsqueeze(-1)).mean().item()
g_c, g_h = gradients(calibration), gradients(held_out)
rows = []
print(f"{'weight':32s} {'g_c.dW':>9s} {'g_h.dW':>9s} {'dNLL_c':>9s} {'dNLL_h':>9s} {'KL_c':>8s} {'KL_h':>8s}")
for n in names:
    w = params[n].detach().clone()
    d = fake_quant[n].detach() - w
    with torch.no_grad():
        params[n].copy_(fake_quant[n])
    (nc, kc), (nh, kh) = nll_and_kl(calibration, ref_c), nll_and_kl(held_out, ref_h)
    with torch.no_grad():
        params[n].copy_(w)
    r = ((g_c[n] * d).sum().item(), (g_h[n] * d).sum().item(), nc - nll_c0, nh - nll_h0, kc, kh)
    rows.append(r)
    print(f"{n:32s} " + " ".join(f"{v:9.5f}" for v in r))
t = torch.tensor(rows)


def corr(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


missed_h = t[:, 3] - t[:, 5]  # what KL misses of the held-out NLL change
print(f"correlation of the first-order terms, calibration against held-out gradient: {corr(t[:, 0], t[:, 1]):.3f}")
print(f"correlation with the held-out dNLL - KL: calibration gradient {corr(missed_h, t[:, 0]):.3f}, "
      f"held-out gradient {corr(missed_h, t[:, 1]):.3f}")
print(f"rms of the held-out dNLL - KL {missed_h.pow(2).mean().sqrt().item():.5f}; less the calibration term "
      f"{(missed_h - t[:, 0]).pow(2).mean().sqrt().item():.5f}; less half of it "
      f"{(missed_h - 0.5 * t[:, 0]).pow(2).mean().sqrt().item():.5f}; less the held-out term "
      f"{(missed_h - t[:, 1]).pow(2).mean().sqrt().item():.5f}")
