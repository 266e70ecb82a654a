"""A packed checkpoint written by `gradq quantize` runs in PyTorch (Python) once the gradq op library
is loaded, and gives gradq's own logits.

    python test_packed_checkpoint.py GRADQ_CLI OPS_LIBRARY WORK_DIR TORCH_VERSION [DEVICE [MODEL]]

DEVICE cpu (the default, what ctest runs) or cuda (tools/device_check.sh: the checkpoint moved to the
GPU runs through the CUDA ops); MODEL a packed checkpoint to use instead of quantizing one with
`gradq quantize --uniform b4g32`. gradq computes the reference: `gradq eval --reference q.pt
--save-reference --reference-storage fp32` keeps the log-probabilities of every scored position of
its windows (with stride = ctx every position of every window is scored) and the windows' inputs.
Python runs the same windows through the same file and must give the same log-probabilities. The CLI
may be built against another libtorch than the op library (tools/test.sh --torch2 --ops: the Debian
line's 1.13 CLI, PyTorch 2.11 in Python). Exits 77 (ctest: skipped) with the reason when this
Python has no torch of the version gradq was built against: an op library is only loadable into
the libtorch it was built with.
"""

import os
import subprocess
import sys

SKIP = 77


def run(*cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAIL: {' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def main():
    cli, ops_library, work, built_against = sys.argv[1:5]
    device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    model = sys.argv[6] if len(sys.argv) > 6 else None
    try:
        import torch
    except ImportError as e:
        print(f"SKIP: {sys.executable} cannot import torch ({e}); gradq was built against libtorch {built_against}")
        return SKIP
    have = torch.__version__.split("+")[0]
    if have != built_against:
        print(f"SKIP: {sys.executable} has torch {have}, gradq was built against libtorch {built_against}")
        return SKIP

    os.makedirs(work, exist_ok=True)
    reference = os.path.join(work, "reference.pt")
    if model is None:
        model = os.path.join(work, "q.pt")
        run(cli, "quantize", "--uniform", "b4g32", "--device", "cpu", "-o", model)
    # fp32 storage: the CLI keeps references in fp16 by default, whose rounding (up to 2^-6 at these
    # log-probabilities) is far above the float noise this test allows on the CPU. gradq computes them
    # on the CPU whatever DEVICE is: the GPU run is compared with CPU logits.
    run(cli, "eval", "--model", model, "--reference", model, "--save-reference", reference, "--ctx", "64",
        "--max-windows", "4", "--reference-storage", "fp32", "--device", "cpu")

    torch.ops.load_library(ops_library)
    module = torch.jit.load(model)
    code = module.code
    assert "gradq.linear" in code, "the packed checkpoint does not call gradq::linear"
    # gradq's reference is a c10::Dict, pickled with a type tag that torch.load's weights-only mode
    # (the default from 2.6) refuses; the file is the one gradq wrote just now.
    saved = torch.load(reference, weights_only=False)
    windows, expected = saved["windows"], saved["log_probs"]
    module.to(device)  # floating parameters keep their dtype, integer codes move as they are
    with torch.no_grad():
        logits = module(windows.to(device))
    assert logits.device.type == device, f"logits on {logits.device}, expected {device}"
    got = torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1]).cpu()
    assert got.shape == expected.shape, f"log-probabilities: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
    assert torch.isfinite(got).all(), "non-finite log-probabilities"
    assert expected.abs().sum() > 0, "gradq's reference is all zeros"
    diff = (got - expected).abs().max().item()
    nll = -got.gather(1, saved["targets"].reshape(-1, 1)).mean().item()
    nll_expected = -expected.gather(1, saved["targets"].reshape(-1, 1)).mean().item()
    if device == "cpu":
        # Same file and ops: only the order of float sums may differ (threads; with the CLI built
        # against LibTorch 1.13 and Python's torch 2.11, BLAS and kernels too: max |diff| 2.7e-5).
        max_diff, nll_tolerance = 1e-4, 1e-5
    else:
        # The CUDA linear rounds its input to fp16 (2^-11 relative) and the GPU's attention and norms
        # sum in other orders: far below a quantization step's effect, far above float32 noise.
        max_diff, nll_tolerance = 0.1, 0.01 * nll_expected
    assert diff < max_diff, f"log-probabilities differ from gradq's by up to {diff:.3g} (tolerance {max_diff})"
    assert abs(nll - nll_expected) < nll_tolerance, f"mean NLL {nll} differs from gradq's {nll_expected}"
    print(f"OK on {device}: {windows.shape[0]} windows x {windows.shape[1]} tokens, max |diff| {diff:.3g}, "
          f"NLL {nll:.5f} (gradq {nll_expected:.5f}), torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
