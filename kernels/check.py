"""The kernel harness: every Triton kernel against its PyTorch spec, one row per case.

    python kernels/check.py                # CPU: Triton's interpreter, the small grid (~15 s)
    python kernels/check.py                # CUDA: compiled, the full grid (the small one with --small)
    python kernels/check.py --only sra     # one kernel: opamp, sra or flash

    kernel  the Triton code                                  its spec, in float64 on the same rounded inputs
    opamp   minimal.triton_opamp.opamp_attention, fwd + bwd  minimal.attention.opamp_attention
    sra     minimal.triton_sra.sra_rows, through             minimal.sra.sra_attention_eager
            minimal.sra.sra_attention(backend="triton")
    flash   minimal.triton_flash.flash_attention (fwd)       minimal.attention.softmax_attention

Where a kernel and its spec differ, by design (so the errors are not 0):

    the spec                                   the kernel
    builds the (T, S) maps                     streams key blocks: online softmax (opamp, flash),
                                               or two passes, log-sum-exp then sums (sra)
    one softmax over all keys                  per-block maxima and sums, rescaled: another summation order
    probabilities in fp32 or fp64              probabilities (and OpAmp's dS) rounded to the input dtype
                                               before their matmuls, as FlashAttention; fp32 accumulators
    any dtype, any device                      fp32/fp16/bf16 on CUDA (fp32 dots in IEEE, not TF32);
                                               fp32/fp16 under TRITON_INTERPRET=1 (bf16 raises there)

A row's error is max|kernel - spec| / max|spec| (for OpAmp the worst of out, dq1, dk1, dq2, dk2,
dv, named in the row, with its max abs error), its tolerance is that of its dtype (kernels/cases.py: TOL for the small
grid, TOL_FULL for the GPU grid). A case that raises is a FAIL row with the error. Exit status
1 on any FAIL. The cases and their inputs live in kernels/cases.py; tests/test_triton_*.py run
the small grid through the functions below.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter is chosen when a kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `import minimal` from a checkout

import cases  # noqa: E402
from minimal import attention, triton_flash, triton_opamp  # noqa: E402
from minimal.sra import SRAConfig, sra_attention, sra_attention_eager  # noqa: E402

SRA_CONFIG = SRAConfig(**cases.SRA_CONFIG)


def opamp(case, dtype, device=cases.DEVICE, K=10.0, scale=None):
    """OpAmp forward and backward: {"out": (kernel, spec), "dq1": (kernel, spec), ...}."""
    inputs, kpm = cases.opamp_inputs(case, dtype, device)
    kw = dict(K=K, causal=case.causal, key_padding_mask=kpm, scale=scale)
    dout = torch.randn(case.B, case.H, case.T, case.D, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ins = [t.clone().requires_grad_() for t in inputs]
    out = triton_opamp.opamp_attention(*ins, **kw)
    got = (out, *torch.autograd.grad(out, ins, dout))
    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = attention.opamp_attention(*ins64, **kw)
    want = (out64, *torch.autograd.grad(out64, ins64, dout.double()))
    return dict(zip(("out", "dq1", "dk1", "dq2", "dk2", "dv"), zip(got, want)))


def sra(case, dtype, device=cases.DEVICE, config=SRA_CONFIG):
    """SRA, forward: {"out": (kernel, spec)}; raises if the case re-weights nothing (a vacuous check)."""
    q, k, v = cases.sra_inputs(case, dtype, device)
    args = (case.layer, case.L, config, list(case.n))
    got = sra_attention(q, k, v, *args, backend="triton")
    q, k, v = (t.double() for t in (q, k, v))
    want = sra_attention_eager(q, k, v, *args)
    real = torch.arange(case.T, device=device) >= case.T - torch.tensor(case.n, device=device)[:, None]  # (B, T)
    if torch.equal(want, attention.softmax_attention(q, k, v, key_padding_mask=real)):
        raise AssertionError("SRA re-weights nothing in this case: the comparison would not test it")
    return {"out": (got, want)}


def flash(case, dtype, device=cases.DEVICE):
    """The single-map kernel, forward: {"out": (kernel, spec)}."""
    q, k, v = cases.flash_inputs(case, dtype, device)
    got = triton_flash.flash_attention(q, k, v, causal=case.causal)
    return {"out": (got, attention.softmax_attention(q.double(), k.double(), v.double(), causal=case.causal))}


def worst(pairs, dtype):
    """(name, max abs, max rel) of the worst tensor of {name: (kernel, spec)}; inf where a kernel
    output is not finite, not in the input dtype or not of the spec's shape."""
    result = ("", 0.0, -1.0)
    for name, (got, want) in pairs.items():
        if got.dtype != dtype or got.shape != want.shape or not bool(got.isfinite().all()):
            return name, math.inf, math.inf
        err = (got.double() - want).abs().max().item()
        rel = err / max(want.abs().max().item(), 1e-12)
        result = max(result, (name, err, rel), key=lambda r: r[2])
    return result


KERNELS = {"opamp": (opamp, cases.OPAMP, cases.OPAMP_FULL), "sra": (sra, cases.SRA, cases.SRA_FULL),
           "flash": (flash, cases.FLASH, cases.FLASH_FULL)}
HEADER = f"{'kernel':<6} {'case':<44} {'dtype':<8} {'worst':<5} {'max abs':>8} {'max rel':>8} {'tol':>6}  result"


def row(kernel, case, dtype, name, err, rel, tol, ok, note=""):
    """One line of the table (kernels/gpu_check.py prints its rows with it too)."""
    return (f"{kernel:<6} {case:<44} {cases.dtype_name(dtype):<8} {name:<5} {err:>8.1e} {rel:>8.1e} {tol:>6.0e}  "
            f"{'PASS' if ok else 'FAIL'}{note}")


def run(kernels, full, device, dtypes):
    """Print the table; returns the number of FAIL rows."""
    tol = cases.TOL_FULL if full else cases.TOL
    print(HEADER + "\n" + "-" * len(HEADER))
    failures = 0
    for kernel in kernels:
        fn, small_cases, full_cases = KERNELS[kernel]
        for case in full_cases if full else small_cases:
            for dtype in dtypes:
                try:
                    name, err, rel = worst(fn(case, dtype, device), dtype)
                    note = ""
                except Exception as e:  # a FAIL row, and the next case
                    name, err, rel, note = "", math.nan, math.nan, f"  {type(e).__name__}: {e}".splitlines()[0][:160]
                ok = rel < tol[dtype]
                failures += not ok
                print(row(kernel, cases.label(case), dtype, name, err, rel, tol[dtype], ok, note), flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the small grid on CUDA too (the default on CPU)")
    parser.add_argument("--full", action="store_true", help="the full grid on CPU too (slow)")
    parser.add_argument("--only", choices=list(KERNELS), action="append", help="this kernel only (repeatable)")
    args = parser.parse_args(argv)
    device = cases.DEVICE
    full = args.full or (device == "cuda" and not args.small)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter"
    print(f"kernels/check.py on {where}: the {'full' if full else 'small'} grid; error = max|kernel - spec| / max|spec|")
    t0 = time.time()
    failures = run(args.only or list(KERNELS), full, device, cases.dtypes(device))
    print(f"check: {'FAIL' if failures else 'PASS'}: {failures} failure(s) in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
