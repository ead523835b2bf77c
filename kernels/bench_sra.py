"""Memory and time of Scaled ReAttention on CPU, next to the base model's attention.

    python kernels/bench_sra.py                  # one layer at T = 1k, 2k, 4k, 8k; whole model at 2k
    python kernels/bench_sra.py --quick          # T = 1k, 2k only
    python kernels/bench_sra.py --eager-max 8192 # also the eager reference at 8k (~15 GB of RAM)
    python kernels/bench_sra.py --threads 0      # torch's default thread count (default here: 1)

One attention layer with SmolLM2-135M's shapes (batch 1, 9 query heads, 3 KV heads, head dim 64,
fp32, layer 14 of 30, SRAConfig defaults b=100, t=200), three ways:

    sdpa     the base model's attention: torch scaled_dot_product_attention, causal (flash on CPU)
    eager    minimal.sra.sra_attention_eager: softmax map (T x T) in memory, reattend, matmul (the spec)
    linear   minimal.sra.sra_attention(backend="blocked"): plain flash attention for the rows SRA leaves alone,
             two passes over key blocks for the rows it touches; never a T x T tensor

and the whole model's prefill (``model(ids, logits_to_keep=1)``, the first 2048 tokens of
data/text/facts_qa.txt) with and without SRA (linear form, defaults).

How memory is measured: every case runs in a fresh Python subprocess that builds its inputs,
then resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``, Linux) and reads
VmRSS; after one call it reads the peak VmHWM. "peak MB" is VmHWM - VmRSS: the extra resident
memory the call needed at its peak (every allocation, PyTorch's and the allocator's slack
included). Without clear_refs (non-Linux) it falls back to ru_maxrss, which is an upper bound.
Time: median of a few further calls in the same subprocess (wall clock). Threads: one by
default, for every case alike. On a shared, busy machine, multi-threaded runs of many small
tensor operations (SRA's few re-weighted rows) wait on the scheduler at every operation while
one fused SDPA call does not, which says more about the machine's load than about the method;
``--threads 0`` keeps torch's default. The script prints the table and the ratios the issue asks for:
linear form's memory growth per doubling of T (target <= 2.2x; eager ~4x) and SRA prefill time
over the base model's at 2k tokens (target <= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEQS = [1024, 2048, 4096, 8192]
H, HKV, D, LAYER, LAYERS = 9, 3, 64, 14, 30


def _status(field: str) -> float:
    """A field of /proc/self/status in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_case(case: str, T: int, repeats: int, threads: int) -> dict:
    """Inside the subprocess: build inputs, measure one call's peak memory, then time it."""
    import torch
    import torch.nn.functional as F

    if threads > 0:
        torch.set_num_threads(threads)

    sys.path.insert(0, str(ROOT))
    from minimal import sra

    torch.manual_seed(0)
    if case == "model" or case == "model_sra":
        import minimal
        from minimal import attention_stats, hooks

        model, tok = minimal.load_model()
        hooks.install(model)
        ids = tok(attention_stats.load_text(), return_tensors="pt").input_ids[:, :T]
        if ids.shape[1] < T:
            raise SystemExit(f"the shipped text has only {ids.shape[1]} tokens")
        if case == "model_sra":
            sra.apply_sra(model, sra.SRAConfig())

        def call():
            with torch.no_grad():
                model(input_ids=ids, logits_to_keep=1)
    else:
        q = torch.randn(1, H, T, D)
        k = torch.randn(1, HKV, T, D)
        v = torch.randn(1, HKV, T, D)
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            "eager": lambda: sra.sra_attention_eager(q, k, v, LAYER, LAYERS, sra.SRAConfig()),
            "linear": lambda: sra.sra_attention(q, k, v, LAYER, LAYERS, sra.SRAConfig(), backend="blocked"),
        }
        call = fns[case]

    exact = _reset_peak()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    peak = _status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = [first]
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"case": case, "T": T, "peak_mb": peak - before, "seconds": statistics.median(times[1:] or times),
            "exact_peak": exact}


def measure(case: str, T: int, repeats: int, threads: int) -> dict:
    """Run one case in a fresh subprocess and return its result."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, str(T), str(repeats), str(threads)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"{case} at T={T} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 1024, 2048 only")
    parser.add_argument("--eager-max", type=int, default=4096, help="longest T for the eager reference")
    parser.add_argument("--model-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (0: torch's default)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, T, repeats, threads = args.child
        print(json.dumps(run_case(case, int(T), int(repeats), int(threads))))
        return 0

    import torch

    seqs = SEQS[:2] if args.quick else SEQS
    threads = args.threads if args.threads > 0 else torch.get_num_threads()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{threads} thread(s) per case, load average {os.getloadavg()[0]:.1f} at start")
    print(f"one layer: B=1, H={H}, Hkv={HKV}, D={D}, fp32, layer {LAYER} of {LAYERS}, SRAConfig() defaults\n")
    results = {}
    print(f"{'T':>6} | {'case':>7} | {'peak MB':>9} | {'time s':>8}")
    for T in seqs:
        for case in ("sdpa", "eager", "linear"):
            if case == "eager" and T > args.eager_max:
                print(f"{T:>6} | {case:>7} | {'skipped (--eager-max)':>20}")
                continue
            repeats = 1 if (case == "eager" and T >= 4096) else 3
            r = measure(case, T, repeats, args.threads)
            results[(case, T)] = r
            print(f"{T:>6} | {case:>7} | {r['peak_mb']:9.1f} | {r['seconds']:8.3f}", flush=True)

    print("\nmemory growth per doubling of T (peak MB ratio):")
    for case in ("sdpa", "eager", "linear"):
        ts = [T for T in seqs if (case, T) in results]
        growth = [results[(case, b)]["peak_mb"] / max(results[(case, a)]["peak_mb"], 1e-3) for a, b in zip(ts, ts[1:])]
        print(f"  {case:>7}: " + ", ".join(f"{a}->{b}: {g:.2f}x" for a, b, g in zip(ts, ts[1:], growth)))
    print("time, SRA over the base attention (sdpa):")
    for case in ("eager", "linear"):
        print(f"  {case:>7}: " + ", ".join(
            f"T={T}: {results[(case, T)]['seconds'] / results[('sdpa', T)]['seconds']:.1f}x"
            for T in seqs if (case, T) in results))

    n = args.model_tokens
    base = measure("model", n, 3, args.threads)
    with_sra = measure("model_sra", n, 3, args.threads)
    print(f"\nwhole model prefill, SmolLM2-135M, {n} tokens (logits of the last position only):")
    print(f"  base (SDPA): {base['seconds']:.2f} s, peak {base['peak_mb']:.0f} MB")
    print(f"  SRA (linear form, defaults): {with_sra['seconds']:.2f} s, peak {with_sra['peak_mb']:.0f} MB")
    print(f"  SRA / base: time {with_sra['seconds'] / base['seconds']:.2f}x (target <= 1.5x), "
          f"memory {with_sra['peak_mb'] / base['peak_mb']:.2f}x")
    exact = all(r["exact_peak"] for r in [*results.values(), base, with_sra])
    print(f"\npeak memory method: {'VmHWM after clear_refs, minus VmRSS' if exact else 'ru_maxrss (upper bound)'}; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
