"""The smallest flash attention: one softmax map, forward only, in Triton.

A teaching kernel for notebook 02, the step before ``minimal/triton_opamp.py`` (two of these
online-softmax states in one loop, plus the backward). It computes

    O = softmax(Q K^T s + causal mask) V          q (B, H, T, D), k and v (B, H, S, D)

without building the (T, S) scores (FlashAttention, Dao et al. 2022; Triton's fused-attention
tutorial). A program takes BLOCK_M query rows of one (batch, head) and streams over the keys
BLOCK_N at a time, keeping per row a running max ``m``, a running sum ``l`` of exp(score - m) and
``acc`` = sum of exp(score - m) V; a block that raises the max rescales both by exp(m_old - m_new).
At the end ``O = acc / l``. Kept small: no GQA, no padding mask, no gradient, head dim 16, 32, 64
or 128; conventions as in ``minimal.attention``, dtypes as in ``minimal.triton_common``.
"""

import torch

from .triton_common import (  # the import guard: without Triton, an ImportError saying how to install it
    LOG2E, check_kernel_inputs, interpreter_active, launch_settings, on_device, precision, tl, triton,
)
from .attention import check_opamp_inputs

__all__ = ["flash_attention", "interpreter_active"]


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O,  # (B, H, T, D), (B, H, S, D) x2, (B, H, T, D); contiguous
    qk_scale,  # softmax scale * log2(e): scores in log2 units
    T, S, D,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M  # this program's first query row
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) = D
    q = tl.load(Q + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=rows[:, None] < T, other=0.0)

    m = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # running max (a finite "-inf")
    l = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running sum of exp2(score - m) * v

    hi = S  # causal: no key after the last row's diagonal
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + S - T)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        kv = bh * S * D + cols[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D) offsets
        k = tl.load(K + kv, mask=cols[:, None] < S, other=0.0)
        v = tl.load(V + kv, mask=cols[:, None] < S, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        allowed = cols[None, :] < S
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + (S - T))
        s = tl.where(allowed, s, -1.0e30)

        m_new = tl.maximum(m, tl.max(s, 1))  # (BLOCK_M,)
        alpha = tl.exp2(m - m_new)  # rescale the old state to the new max
        p = tl.where(allowed, tl.exp2(s - m_new[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    l = tl.where(l == 0.0, 1.0, l)  # a row that saw no key: acc = 0, output 0
    o = acc / l[:, None]
    o_idx = bh * T * D + rows[:, None] * D + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    tl.store(O + o_idx, o.to(O.dtype.element_ty), mask=rows[:, None] < T)


def flash_attention(q, k, v, causal=True, scale=None):
    """``softmax(Q K^T s + causal mask) V`` in one pass over the keys; forward only.

    q (B, H, T, D); k, v (B, H, S, D); D in {16, 32, 64, 128}; returns (B, H, T, D) in the
    dtype of q. ``scale`` defaults to 1/sqrt(D). CUDA tensors, or CPU under TRITON_INTERPRET=1.
    """
    check_opamp_inputs(q, k, q, k, v)
    if q.shape[1] != k.shape[1] or q.shape[-1] not in (16, 32, 64, 128):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: this kernel needs as many key as query heads "
                         "and head dim 16, 32, 64 or 128")
    check_kernel_inputs(q, "minimal.triton_flash", "minimal.attention.softmax_attention")
    (B, H, T, D), S = q.shape, k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    q, k, v = (t.detach().contiguous() for t in (q, k, v))
    o = torch.empty_like(q)  # (B, H, T, D)
    blocks, launch = launch_settings(D, q.dtype)
    grid = (triton.cdiv(T, blocks["BLOCK_M"]), B * H)  # one program per (query block, batch*head)
    with on_device(q):
        _flash_fwd_kernel[grid](q, k, v, o, scale * LOG2E, T, S, D, CAUSAL=bool(causal),
                                PRECISION=precision(q.dtype), **blocks, **launch)
    return o
