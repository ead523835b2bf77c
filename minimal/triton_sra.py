"""Scaled ReAttention in Triton: ``sra_rows``, the rows function of ``minimal.sra_linear.sra_output``,
two passes per query block, never building the (T, T) map. The spec is ``minimal.sra.reattend``.

SRA's rules need each key's *final* probability ``p_j = exp(s_j - lse)`` (is it below theta?), so
FlashAttention's one-pass online softmax is not enough. Two passes are (the sums: ``minimal.sra_linear``):
pass 1, ``_sra_lse_kernel``, computes lse_i = log sum_j exp(s_ij) with an online max and sum over key
blocks; pass 2, ``_sra_out_kernel``, goes over the key blocks again with p_ij = exp(s_ij - lse_i),
accumulates kept, r, mv, M and valid, and stores out = kept + r g mv / M and the flag valid.

One program per (query block, batch*head), as in FlashAttention-2 (Dao, 2023) and Triton's
fused-attention tutorial; K/V tiles are read by the query head's KV head (GQA), never repeated.
q (B, H, R, D) holds the *last* R of S positions (bottom-right causal); key_real (B, S) is True on
real tokens (left padding); a row that sees no key outputs 0. Head dims 16..128; fp16, bf16, fp32
(fp32 dots in IEEE precision, not TF32), fp32 accumulation; under Triton's CPU interpreter
(TRITON_INTERPRET=1, set before import) fp32 and fp16 only (``minimal.triton_common``).
"""

import torch

from .triton_common import (  # the import guard: without Triton, an ImportError saying how to install it
    LOG2E, check_kernel_inputs, interpreter_active, launch_settings, on_device, precision, tl, triton,
)

__all__ = ["sra_rows", "interpreter_active"]


@triton.jit
def _allowed(rows, cols, b, R, S, PAD):
    """Which (row, key) pairs may attend: inside the tensors, causal (bottom-right), real key."""
    ok = (rows[:, None] < R) & (cols[None, :] < S) & (cols[None, :] <= rows[:, None] + (S - R))
    keep = tl.load(PAD + b * S + cols, mask=cols < S, other=0)  # (BLOCK_N,) 1 = real token
    return ok & (keep[None, :] != 0)


@triton.jit
def _scores(q, K, kv_base, cols, offs_d, S, D, qk_scale, PRECISION: tl.constexpr):
    """Load a key tile and return (scores in log2 units (BLOCK_M, BLOCK_N), tile index, tile mask)."""
    kv_idx = kv_base + cols[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    kv_mask = (cols[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(K + kv_idx, mask=kv_mask, other=0.0)
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale, kv_idx, kv_mask


@triton.jit
def _sra_lse_kernel(
    Q, K, PAD, LSE,  # Q (B,H,R,D), K (B,Hkv,S,D), PAD (B,S) int8, LSE (B,H,R) fp32 out
    qk_scale, H, GROUP, R, S, D,  # qk_scale = scale * log2(e); GROUP = H // Hkv
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # b * H + h, int64 so offsets cannot overflow
    b, h = bh // H, bh % H
    kv_base = (b * (H // GROUP) + h // GROUP) * S * D  # the KV head this query head reads
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (rows[:, None] < R) & (offs_d[None, :] < D)
    q = tl.load(Q + bh * R * D + rows[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)

    m = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # running max (a finite -inf: no NaN)
    l = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m)
    hi = tl.minimum(S, start_m + BLOCK_M + S - R)  # causal: no key after the block's last row
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        s, _, _ = _scores(q, K, kv_base, cols, offs_d, S, D, qk_scale, PRECISION)
        allowed = _allowed(rows, cols, b, R, S, PAD)
        s = tl.where(allowed, s, -1.0e30)
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.where(allowed, tl.exp2(s - m_new[:, None]), 0.0)
        l = l * tl.exp2(m - m_new) + tl.sum(p, 1)
        m = m_new
    # a row that saw no key gets lse = +1e30, so exp2(s - lse) = 0 in pass 2
    lse = tl.where(l > 0.0, m + tl.log2(tl.where(l > 0.0, l, 1.0)), 1.0e30)
    tl.store(LSE + bh * R + rows, lse, mask=rows < R)


@triton.jit
def _sra_out_kernel(
    Q, K, V, PAD, LSE, THETA, LO, HI, O, VALID,  # THETA (B,R) fp32, LO/HI (B,R) int32; O (B,H,R,D), VALID (B,H,R)
    qk_scale, gain, H, GROUP, R, S, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    kv_base = (b * (H // GROUP) + h // GROUP) * S * D
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = bh * R * D + rows[:, None] * D + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    q_mask = (rows[:, None] < R) & (offs_d[None, :] < D)
    q = tl.load(Q + q_idx, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * R + rows, mask=rows < R, other=1.0e30)  # (BLOCK_M,) log2 units
    theta = tl.load(THETA + b * R + rows, mask=rows < R, other=0.0)  # per-row plan (same for all heads)
    lo = tl.load(LO + b * R + rows, mask=rows < R, other=0)
    hi_w = tl.load(HI + b * R + rows, mask=rows < R, other=0)

    kept = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # sum_{p >= theta} p v
    mv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # sum_{j in W} m_j v_j
    kept_mass = tl.zeros((BLOCK_M,), tl.float32)  # sum_{p >= theta} p
    msum = tl.zeros((BLOCK_M,), tl.float32)  # sum_{j in W} m_j
    valid = tl.zeros((BLOCK_M,), tl.int32)  # 1 once some p > theta inside W

    hi = tl.minimum(S, start_m + BLOCK_M + S - R)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        s, kv_idx, kv_mask = _scores(q, K, kv_base, cols, offs_d, S, D, qk_scale, PRECISION)
        v = tl.load(V + kv_idx, mask=kv_mask, other=0.0)  # V is laid out like K
        allowed = _allowed(rows, cols, b, R, S, PAD)
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)  # final softmax probabilities

        keep = p >= theta[:, None]  # the 100/5 weights and the drop rule use >=
        in_w = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi_w[:, None])  # (BLOCK_M, BLOCK_N)
        p_keep = tl.where(keep, p, 0.0)
        m_w = tl.where(in_w, tl.where(keep, 100.0, 5.0), 0.0)

        kept += tl.dot(p_keep.to(v.dtype), v, input_precision=PRECISION)
        mv += tl.dot(m_w.to(v.dtype), v, input_precision=PRECISION)
        kept_mass += tl.sum(p_keep, 1)
        msum += tl.sum(m_w, 1)
        hit = tl.where(in_w & (p > theta[:, None]), 1, 0)  # validity uses >
        valid = tl.maximum(valid, tl.max(hit, 1))

    coef = (1.0 - kept_mass) * gain / tl.maximum(msum, 1.0)  # r g / M, per row
    out = kept + coef[:, None] * mv
    tl.store(O + q_idx, out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(VALID + bh * R + rows, valid.to(tl.int8), mask=rows < R)


def sra_rows(q, k, v, theta, lo, hi, key_real, scale, gain):
    """SRA for R query rows, the last R of S positions: ``(out (B, H, R, D), valid (B, H, R) bool)``.
    q (B, H, R, D); k, v (B, Hkv, S, D); theta, lo, hi (B, R) the plan; key_real (B, S) bool. CUDA
    tensors, or TRITON_INTERPRET=1 (fp32/fp16 only) on CPU; head_dim in [16, 128]."""
    check_kernel_inputs(q, "minimal.triton_sra", 'backend="blocked"')
    (B, H, R, D), (Hkv, S) = q.shape, k.shape[1:3]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    pad = key_real.to(torch.int8).contiguous()  # (B, S)
    theta = theta.to(torch.float32).contiguous()  # (B, R)
    lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
    blocks, launch = launch_settings(D, q.dtype)
    meta = dict(PRECISION=precision(q.dtype), **blocks, **launch)  # meta-parameters and launch settings
    lse = torch.empty(B, H, R, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    valid = torch.empty(B, H, R, device=q.device, dtype=torch.int8)
    grid = (triton.cdiv(R, blocks["BLOCK_M"]), B * H)
    sizes = (H, H // Hkv, R, S, D)
    with on_device(q):
        _sra_lse_kernel[grid](q, k, pad, lse, scale * LOG2E, *sizes, **meta)
        _sra_out_kernel[grid](q, k, v, pad, lse, theta, lo, hi, out, valid, scale * LOG2E, float(gain), *sizes, **meta)
    return out, valid.bool()
