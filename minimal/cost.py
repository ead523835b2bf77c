"""What a method costs at inference: prefill time and peak memory, measured side by side.

Timings on a shared machine drift (other processes, CPU frequency, caches), so a method is never timed alone:
:func:`latency_ratio` runs the base model and the method back to back, alternating their order (ABBA), and
reports the median of the paired ratios, which is comparable across runs; absolute seconds are not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

import torch


@torch.no_grad()
def latency_ratio(base, other, input_ids, *, attention_mask=None, repeats: int = 11, warmup: int = 2) -> dict:
    """Prefill time of ``other`` over ``base`` on one batch: each repeat times both back to back (order alternating),
    giving ``t_other / t_base``; returns the medians ``{"ratio", "base_s", "other_s", "repeats"}`` (seconds)."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least 1")

    def run(model) -> float:
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention_mask)
        if input_ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        run(base), run(other)
    times = [(run(base), run(other)) if i % 2 == 0 else (run(other), run(base))[::-1]
             for i in range(repeats)]  # (base, other) seconds, the order alternating (ABBA)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"ratio": median([o / b for b, o in times]), "base_s": median([b for b, _ in times]),
            "other_s": median([o for _, o in times]), "repeats": repeats}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@torch.no_grad()
def peak_memory_mb(fn, device="cpu") -> float | None:
    """Extra MiB ``fn()`` needs at its peak: on CUDA ``max_memory_allocated`` during the call minus ``memory_allocated``
    before; on Linux CPUs the peak resident memory (VmHWM) during the call minus the resident one before; else None."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    gc.collect()
    try:  # give freed heap back to the system (glibc), so the next peak is really new memory
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return (_status_kb("VmHWM") - before) / 1024
