"""Speed and memory of the fused OpAmp kernel on a GPU.

    python kernels/bench.py                 # bf16, causal, T = 512 .. 16384, D = 64 and 128
    python kernels/bench.py --quick         # T = 512 .. 2048 only
    python kernels/bench.py --group 4       # grouped-query attention, Hkv = H / 4
    python kernels/bench.py --min-T 1024 --max-T 16384 --no-eager   # a T range, fused and sdpa2 only

Three ways to compute the same OpAmp attention ``a M+ V - b M- V`` (a = K + 1/2, b = K - 1/2):

    fused    minimal.triton_opamp.opamp_attention: one kernel, two online softmaxes, V shared
    sdpa2    two torch scaled_dot_product_attention calls (FlashAttention inside) plus the
             combine: the best a user can write without a custom kernel
    eager    minimal.attention.opamp_attention: the reference, materialises both (T, S) maps
             (skipped where it would not fit in memory)

For each, forward (no grad) and forward+backward times (triton.testing.do_bench, median),
TFLOP/s and peak memory. The batch keeps B*T = 16384 tokens and H*D = 2048, as in the
FlashAttention benchmarks. TFLOP/s uses one nominal count for every method, so it is a speed
measure, not hardware utilisation: forward 2 maps x 2 matmuls x 2*B*H*T*S*D, halved when
causal; forward+backward 3.5x that (the backward counted as 2.5x the forward, the
FlashAttention-2 convention). The ratio fused/sdpa2 is measured in the same run.

Writes kernels/results/bench_<gpu>_<date>.{csv,json,png} with the device name, torch and
triton versions and the date. On a machine without CUDA it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS, HIDDEN = 16384, 2048  # B*T and H*D of every benchmarked shape
SEQS = [512, 1024, 2048, 4096, 8192, 16384]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 512, 1024, 2048 only")
    parser.add_argument("--group", type=int, default=1, help="query heads per KV head (GQA); 1 = MHA")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--K", type=float, default=10.0)
    parser.add_argument("--min-T", type=int, default=SEQS[0], help=f"shortest T (default {SEQS[0]})")
    parser.add_argument("--max-T", type=int, default=SEQS[-1], help=f"longest T (default {SEQS[-1]})")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager reference (fused and sdpa2 only)")
    args = parser.parse_args(argv)
    if HIDDEN // 128 % args.group:
        parser.error(f"--group must divide the number of heads ({HIDDEN // 128} at D=128)")
    if not any(args.min_T <= T <= args.max_T for T in SEQS):
        parser.error(f"no T of {SEQS} lies in [--min-T, --max-T] = [{args.min_T}, {args.max_T}]")

    if not torch.cuda.is_available():
        print("kernels/bench.py measures GPU speed and needs CUDA; none found, nothing to do.")
        print("On CPU, check correctness instead: python kernels/check.py")
        return 0

    import triton
    from triton.testing import do_bench

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
    from minimal import attention as ref
    from minimal import triton_opamp as tk

    dtype = getattr(torch, args.dtype)
    K = args.K
    a, b = K + 0.5, K - 0.5

    def sdpa2(q1, k1, q2, k2, v):
        gqa = q1.shape[1] != k1.shape[1]
        o1 = F.scaled_dot_product_attention(q1, k1, v, is_causal=True, enable_gqa=gqa)
        o2 = F.scaled_dot_product_attention(q2, k2, v, is_causal=True, enable_gqa=gqa)
        return a * o1 - b * o2

    methods = {
        "fused": lambda *t: tk.opamp_attention(*t, K=K, causal=True),
        "sdpa2": sdpa2,
        "eager": lambda *t: ref.opamp_attention(*t, K=K, causal=True),
    }
    if args.no_eager:
        del methods["eager"]

    # sanity first: the fused kernel and sdpa2 agree on a small case
    small = _inputs(1, 4, 4 // min(args.group, 4), 256, 64, dtype)
    expected = sdpa2(*small).float()
    rel = ((methods["fused"](*small).float() - expected).abs().max() / expected.abs().max()).item()
    print(f"fused vs sdpa2 on a small {args.dtype} case: max relative difference {rel:.1e}")
    if not rel < 5e-2:
        print("the fused kernel disagrees with sdpa2: run kernels/check.py before trusting timings")
        return 1

    device = torch.cuda.get_device_name()
    meta = dict(
        device=device, torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, date=dt.datetime.now().isoformat(timespec="seconds"),
        dtype=args.dtype, causal=True, K=K, group=args.group, tokens=TOKENS, hidden=HIDDEN,
        timer="triton.testing.do_bench, median",
    )
    print(f"{device} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype}, causal, K={K}")

    seqs = [T for T in (SEQS[:3] if args.quick else SEQS) if args.min_T <= T <= args.max_T]
    rows = []
    header = f"{'D':>4} {'T':>6} {'method':>6} | {'fwd ms':>8} {'TFLOP/s':>8} {'MiB':>8} | {'f+b ms':>8} {'TFLOP/s':>8} {'MiB':>8}"
    print(header + "\n" + "-" * len(header))
    for D in (64, 128):
        H = HIDDEN // D
        Hkv = H // args.group
        for T in seqs:
            B = max(1, TOKENS // T)
            flops_fwd = 8 * B * H * T * T * D * 0.5  # 2 maps x 2 matmuls x 2BHTSD, causal
            flops_fb = 3.5 * flops_fwd
            results = {}
            for name, fn in methods.items():
                row = dict(D=D, T=T, B=B, H=H, Hkv=Hkv, method=name)
                if name == "eager" and not _eager_fits(B, H, T):
                    row.update(fwd_ms=None, fb_ms=None, fwd_tflops=None, fb_tflops=None, fwd_mib=None, fb_mib=None)
                else:
                    row.update(_measure(fn, B, H, Hkv, T, D, dtype, do_bench))
                    if row["fwd_ms"] is not None:
                        row["fwd_tflops"] = flops_fwd / row["fwd_ms"] * 1e-9
                    if row["fb_ms"] is not None:
                        row["fb_tflops"] = flops_fb / row["fb_ms"] * 1e-9
                results[name] = row
                rows.append(row)
                print(f"{D:>4} {T:>6} {name:>6} | {_f(row.get('fwd_ms'))} {_f(row.get('fwd_tflops'))} {_f(row.get('fwd_mib'), 0)} "
                      f"| {_f(row.get('fb_ms'))} {_f(row.get('fb_tflops'))} {_f(row.get('fb_mib'), 0)}", flush=True)
            fused, pair = results["fused"], results["sdpa2"]
            for mode in ("fwd", "fb"):
                if fused.get(f"{mode}_ms") and pair.get(f"{mode}_ms"):
                    fused[f"{mode}_fused_over_sdpa2"] = fused[f"{mode}_ms"] / pair[f"{mode}_ms"]
            print(f"{'':>4} {'':>6} {'ratio':>6} | fused/sdpa2 time: fwd {_f(fused.get('fwd_fused_over_sdpa2'), 2)}"
                  f", fwd+bwd {_f(fused.get('fb_fused_over_sdpa2'), 2)}")

    _save(rows, meta)
    return 0


def _inputs(B, H, Hkv, T, D, dtype, requires_grad=False):
    q1, q2 = (torch.randn(B, H, T, D, device="cuda", dtype=dtype) for _ in range(2))
    k1, k2, v = (torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype) for _ in range(3))
    return [t.requires_grad_(requires_grad) for t in (q1, k1, q2, k2, v)]


def _eager_fits(B, H, T):
    # the reference keeps several fp32 (T, T) tensors per map alive for the backward
    need = 12 * B * H * T * T * 4
    return need < 0.8 * torch.cuda.mem_get_info()[0]


def _measure(fn, B, H, Hkv, T, D, dtype, do_bench):
    """Forward (no grad) and forward+backward: median ms and peak extra memory (MiB)."""
    out = {}
    try:
        x = _inputs(B, H, Hkv, T, D, dtype)
        with torch.no_grad():
            out["fwd_ms"] = do_bench(lambda: fn(*x), return_mode="median")
            out["fwd_mib"] = _peak_mib(lambda: fn(*x))
        del x
        x = _inputs(B, H, Hkv, T, D, dtype, requires_grad=True)
        dout = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
        step = lambda: torch.autograd.grad(fn(*x), x, dout)  # noqa: E731
        out["fb_ms"] = do_bench(step, return_mode="median")
        out["fb_mib"] = _peak_mib(step)
    except torch.cuda.OutOfMemoryError:
        print(f"   (out of memory at B={B} H={H} T={T} D={D})")
    out.setdefault("fwd_ms", None)
    out.setdefault("fb_ms", None)
    torch.cuda.empty_cache()
    return out


def _peak_mib(fn):
    """minimal.cost's peak memory of ``fn()`` (it measures under no_grad: the backward needs grad)."""
    from minimal.cost import peak_memory_mb

    def with_grad():
        with torch.enable_grad():
            fn()

    return peak_memory_mb(with_grad, "cuda")


def _f(x, digits=3):
    return f"{'-':>8}" if x is None else f"{x:>8.{digits}f}"


def _save(rows, meta):
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    stem = RESULTS / f"bench_{slug}_{meta['date'][:10]}"
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("D", "T", "B", "H", "Hkv", "method"), k))
    columns = ["device", "torch", "triton", "date", "dtype"] + keys  # every row says where it ran
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({**{k: meta[k] for k in columns[:5]}, **r} for r in rows)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode, title in zip(axes, ("fwd", "fb"), ("forward", "forward + backward")):
        for D, style in ((64, "--"), (128, "-")):
            for method, color in (("fused", "C0"), ("sdpa2", "C1"), ("eager", "C2")):
                pts = [(r["T"], r[f"{mode}_tflops"]) for r in rows
                       if r["D"] == D and r["method"] == method and r.get(f"{mode}_tflops")]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=color, label=f"{method}, D={D}")
        ax.set(xscale="log", xlabel="sequence length T", title=title)
        ax.set_xticks(sorted({r["T"] for r in rows}), [str(t) for t in sorted({r["T"] for r in rows})])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("TFLOP/s (nominal, see bench.py)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"OpAmp attention, {meta['dtype']}, causal, K={meta['K']} | {meta['device']} | "
                 f"torch {meta['torch']}, triton {meta['triton']} | {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"wrote {stem}.csv, .json, .png")


if __name__ == "__main__":
    sys.exit(main())
