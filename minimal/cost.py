"""What a method costs at inference: prefill time and peak memory, measured side by side.

Timings on a shared machine drift (other processes, CPU frequency, caches), so a method is
never timed alone: :func:`latency_ratio` runs the base model and the method back to back,
alternating their order (ABBA), and reports the median of the paired ratios. Ratios measured
that way are comparable across runs; the absolute seconds are not.

:func:`peak_memory_mb` is the extra memory one call needs at its peak, above what was in use
before it: on CUDA from PyTorch's allocator statistics, on Linux CPUs from the kernel's
high-water mark of the process (``VmHWM``, reset through ``/proc/self/clear_refs``) after
handing freed heap memory back to the system (``malloc_trim``). Elsewhere it returns None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

import torch


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


@torch.no_grad()
def latency_ratio(base, other, input_ids, *, attention_mask=None, repeats: int = 11, warmup: int = 2) -> dict:
    """Forward (prefill) time of ``other`` relative to ``base`` on the same batch, side by side.

    Each repeat times both models back to back (order alternating, ABBA) and gives one ratio
    ``t_other / t_base``; the result is the median of those paired ratios. Returns
    ``{"ratio", "base_s", "other_s", "repeats"}`` (times: medians, in seconds).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least 1")
    cuda = input_ids.is_cuda

    def run(model) -> float:
        _sync(cuda)
        start = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention_mask)
        _sync(cuda)
        return time.perf_counter() - start

    for _ in range(warmup):
        run(base), run(other)
    base_t, other_t = [], []
    for i in range(repeats):
        pair = (base, other) if i % 2 == 0 else (other, base)
        first, second = run(pair[0]), run(pair[1])
        base_t.append(first if i % 2 == 0 else second)
        other_t.append(second if i % 2 == 0 else first)
    ratio = _median([o / b for o, b in zip(other_t, base_t)])
    return {"ratio": ratio, "base_s": _median(base_t), "other_s": _median(other_t), "repeats": repeats}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so the next peak is really new memory."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


@torch.no_grad()
def peak_memory_mb(fn, device="cpu") -> float | None:
    """Extra memory (MiB) that ``fn()`` needs at its peak above what was in use before it.

    CUDA: ``max_memory_allocated`` during the call minus ``memory_allocated`` before it.
    CPU (Linux): the process's peak resident memory (VmHWM) during the call minus its resident
    memory before it. Returns None where neither is available (macOS, Windows).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        before = _status_kb("VmRSS")
    except OSError:
        return None
    fn()
    return (_status_kb("VmHWM") - before) / 1024
