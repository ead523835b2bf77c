"""Check the fused Triton OpAmp kernel against the PyTorch reference over a grid of cases.

    python kernels/check.py           # CPU: Triton interpreter, small grid (< 2 minutes)
    python kernels/check.py           # GPU: the full grid (automatic when CUDA is present)
    python kernels/check.py --small   # GPU: the small grid only
    python kernels/check.py --full    # force the full grid (slow on CPU)

For every case (shape x dtype x causal x GQA, some with key padding) it runs the kernel
forward and backward and the reference (minimal.attention.opamp_attention) in float64 on the
same rounded inputs, and prints the relative error max|kernel - ref| / max|ref| of the output
and of each gradient (dq1, dk1, dq2, dk2, dv), plus the largest absolute error. It exits 1 if
any error is above the tolerance of its dtype (TOL below), 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must happen before the kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from minimal import attention as ref  # noqa: E402
from minimal import triton_opamp as tk  # noqa: E402

# relative-to-max tolerances (the kernel rounds probabilities and dS to the input dtype
# before its matmuls, as FlashAttention does); fp32 uses IEEE dots on GPU, not TF32
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
NAMES = ("out", "dq1", "dk1", "dq2", "dk2", "dv")

# (B, H, T, S, D, pad); GQA groups are applied on top (Hkv = H // group)
SMALL_SHAPES = [
    (1, 4, 17, 17, 16, False),  # tail row (blocks are 16 under the interpreter)
    (2, 4, 33, 33, 32, True),  # key padding
    (1, 4, 1, 33, 32, False),  # decoding: one query against 33 keys
    (1, 4, 33, 17, 24, True),  # T > S, D not a power of two
]
FULL_SHAPES = [
    (2, 8, 128, 128, 64, False),
    (2, 8, 257, 257, 64, True),  # tails on GPU blocks
    (1, 8, 1, 1000, 128, False),  # decoding against a long cache
    (1, 8, 100, 1000, 128, True),  # chunked prefill, T < S
    (1, 8, 1000, 1000, 16, False),
    (1, 8, 777, 777, 96, True),  # D padded to 128
    (1, 16, 2048, 2048, 128, False),
    (1, 8, 300, 200, 32, False),  # T > S
]


def run_case(B, H, Hkv, T, S, D, dtype, causal, pad, device, K=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, q2 = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k1, k2, v = (torch.randn(B, Hkv, S, D, generator=g) for _ in range(3))
    inputs = [t.to(device, dtype) for t in (q1, k1, q2, k2, v)]
    kpm = None
    if pad:  # left padding on item 0, a hole on item 1
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[0, : S // 3] = False
        if B > 1:
            kpm[1, S // 2] = False
        kpm = kpm.to(device)
    dout = torch.randn(B, H, T, D, generator=g).to(device, dtype)

    ins = [t.clone().requires_grad_() for t in inputs]
    out = tk.opamp_attention(*ins, K=K, causal=causal, key_padding_mask=kpm)
    grads = torch.autograd.grad(out, ins, dout)

    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = ref.opamp_attention(*ins64, K=K, causal=causal, key_padding_mask=kpm)
    grads64 = torch.autograd.grad(out64, ins64, dout.double())

    rel, worst_abs = {}, 0.0
    for name, a, b in zip(NAMES, (out, *grads), (out64, *grads64)):
        err = (a.double() - b).abs().max().item()
        if not torch.isfinite(a).all():
            err = float("inf")
        rel[name] = err / max(b.abs().max().item(), 1e-12)
        worst_abs = max(worst_abs, err)
    return rel, worst_abs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full grid (default on CUDA)")
    parser.add_argument("--small", action="store_true", help="the small grid (default on CPU)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    full = args.full or (device == "cuda" and not args.small)
    shapes = FULL_SHAPES if full else SMALL_SHAPES
    dtypes = [torch.float32, torch.float16]
    if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        dtypes.append(torch.bfloat16)  # bf16 dots are wrong under the interpreter: GPU only
    groups = (1, 4) if full else (1, 2)

    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter"
    print(f"OpAmp kernel check on {where}: {'full' if full else 'small'} grid, K=10")
    print(f"relative error = max|kernel - ref| / max|ref|, ref in float64; tolerances {_fmt_tol()}")
    header = f"{'B':>2} {'H':>3} {'Hkv':>3} {'T':>5} {'S':>5} {'D':>4} {'dtype':>8} {'causal':>6} {'pad':>3} |"
    header += "".join(f"{n:>9}" for n in NAMES) + f" | {'max abs':>8}  ok"
    print(header)
    print("-" * len(header))

    failures, worst, t0 = 0, {}, time.time()
    for B, H, T, S, D, pad in shapes:
        for group in groups:
            for dtype in dtypes:
                for causal in (True, False):
                    rel, abs_err = run_case(B, H, H // group, T, S, D, dtype, causal, pad, device)
                    ok = all(e < TOL[dtype] for e in rel.values())
                    failures += not ok
                    for n, e in rel.items():
                        worst[dtype, n] = max(worst.get((dtype, n), 0.0), e)
                    name = str(dtype).replace("torch.", "")
                    row = f"{B:>2} {H:>3} {H // group:>3} {T:>5} {S:>5} {D:>4} {name:>8} {causal!s:>6} {'y' if pad else 'n':>3} |"
                    row += "".join(f"{e:>9.1e}" for e in rel.values()) + f" | {abs_err:>8.1e}  {'ok' if ok else 'FAIL'}"
                    print(row, flush=True)

    print("-" * len(header))
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        print(f"worst {name:>8}: " + "  ".join(f"{n} {worst[dtype, n]:.1e}" for n in NAMES) + f"  (tol {TOL[dtype]:.0e})")
    print(f"{failures} failure(s), {time.time() - t0:.1f} s")
    return 1 if failures else 0


def _fmt_tol():
    return ", ".join(f"{str(d).replace('torch.', '')} {t:.0e}" for d, t in TOL.items())


if __name__ == "__main__":
    sys.exit(main())
