"""Fused OpAmp attention in Triton: forward and backward, never building the (T, S) maps.

The spec is ``minimal.attention.opamp_attention`` (same signature, masks and numbers up to
rounding; read it first)::

    M+ = softmax(Q1 K1^T s + mask),  M- = softmax(Q2 K2^T s + mask)          (B, H, T, S)
    O  = (K (M+ - M-) + (M+ + M-)/2) V = a M+ V - b M- V,   a = K + 1/2,  b = K - 1/2

The kernels follow FlashAttention-2 (Dao, 2023) and Triton's fused-attention tutorial. Forward: one program
per (query block, batch*head) streams over key blocks keeping TWO online-softmax states (as in
``minimal/triton_flash.py``), one per map; each V tile is loaded once for both. It saves each map's log-sum-exp
and own output O1 = M+ V, O2 = M- V for the backward: two kernels that recompute the probabilities, one per
(key block, batch*KV head) for dK1, dK2, dV (looping over its GQA group: K/V never repeated, no atomics), one
per (query block, batch*head) for dQ1, dQ2. Backward math, per query row i (dO is the gradient of O; c1 = a, c2 = -b):

    O      = c1 P1 V + c2 P2 V                      P1 = M+, P2 = M-
    dV     = (c1 P1 + c2 P2)^T dO                   one matmul for both maps
    dPk    = ck dO V^T                              dO V^T is shared by both maps
    dSk    = Pk * (dPk - rowsum(Pk * dPk))          the softmax backward
           = ck Pk * (dO V^T - Dk),  Dk = rowsum(dO * Ok),  Ok = Pk V   (this map's own output)
    dQk    = s dSk Kk,   dKk = s dSk^T Qk           s = the softmax scale

Dk needs each map's own output Ok, not the combined O: rowsum(dO * O) only gives c1 D1 + c2 D2.
Conventions as in the reference; dtypes and (untuned) block sizes in ``minimal.triton_common``.
"""

import torch

from .triton_common import (  # the import guard: without Triton, an ImportError saying how to install it
    LOG2E, check_kernel_inputs, interpreter_active, launch_settings, on_device, precision, tl, triton,
)
from .attention import check_opamp_inputs

__all__ = ["opamp_attention", "interpreter_active"]


@triton.jit
def _allowed(rows, cols, b, T, S, PAD, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr):
    """Which (query row, key column) pairs may attend: bool (BLOCK_M, BLOCK_N)."""
    ok = (rows[:, None] < T) & (cols[None, :] < S)  # inside the tensors (tails are masked)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (S - T))  # bottom-right alignment
    if HAS_PAD:
        keep = tl.load(PAD + b * S + cols, mask=cols < S, other=0)  # (BLOCK_N,) 1 = real token
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def _online_softmax_step(q, k, v, m, l, acc, allowed, qk_scale, PRECISION: tl.constexpr):
    """Fold one key block into a map's running (m, l, acc), scores in log2 units; returns the new state.
    q (BLOCK_M, BLOCK_D), k and v (BLOCK_N, BLOCK_D), m and l (BLOCK_M,), acc (BLOCK_M, BLOCK_D).
    Masked scores get -1e30 (a finite -inf) and probability 0: a row with no key yet keeps l = acc = 0."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
    s = tl.where(allowed, s, -1.0e30)
    m_new = tl.maximum(m, tl.max(s, 1))  # (BLOCK_M,) new running max
    alpha = tl.exp2(m - m_new)  # rescales what was accumulated under the old max
    p = tl.where(allowed, tl.exp2(s - m_new[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _probs(q, k, lse, allowed, qk_scale, PRECISION: tl.constexpr):
    """Recompute a map's probabilities from its log-sum-exp: (BLOCK_M, BLOCK_N), fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
    s = tl.where(allowed, s, -1.0e30)
    return tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _opamp_fwd_kernel(
    Q1, K1, Q2, K2, V, PAD,  # inputs: (B,H,T,D) x2, (B,Hkv,S,D) x3, (B,S) int8 or unused
    O, O1, O2, LSE1, LSE2,  # outputs: (B,H,T,D) x3, (B,H,T) fp32 x2 (O1.. only if SAVE)
    qk_scale, gain_plus, gain_minus, H, GROUP, T, S, D,  # scale*log2(e), a = K + 1/2, b = K - 1/2, GROUP = H // Hkv
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # b * H + h, int64 so offsets cannot overflow
    b, h = bh // H, bh % H
    bkv = b * (H // GROUP) + h // GROUP  # b * Hkv + (the KV head this query head reads)

    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,) head-dim lanes, >= D are padding
    q_idx = bh * T * D + rows[:, None] * D + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    q_mask = (rows[:, None] < T) & (offs_d[None, :] < D)
    q1 = tl.load(Q1 + q_idx, mask=q_mask, other=0.0)  # (BLOCK_M, BLOCK_D)
    q2 = tl.load(Q2 + q_idx, mask=q_mask, other=0.0)

    m1 = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # two online-softmax states, one per map: running max
    l1 = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(score - m)
    acc1 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # running sum of exp2(score - m) * v
    m2, l2, acc2 = m1, l1, acc1

    # causal: the last row of this block sees keys up to (start_m + BLOCK_M - 1) + S - T
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + S - T)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        kv_idx = bkv * S * D + cols[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        kv_mask = (cols[:, None] < S) & (offs_d[None, :] < D)
        k1 = tl.load(K1 + kv_idx, mask=kv_mask, other=0.0)
        k2 = tl.load(K2 + kv_idx, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_idx, mask=kv_mask, other=0.0)  # loaded once, used by both maps
        allowed = _allowed(rows, cols, b, T, S, PAD, CAUSAL, HAS_PAD)
        m1, l1, acc1 = _online_softmax_step(q1, k1, v, m1, l1, acc1, allowed, qk_scale, PRECISION)
        m2, l2, acc2 = _online_softmax_step(q2, k2, v, m2, l2, acc2, allowed, qk_scale, PRECISION)

    # normalise each map; a row that saw no key has l = 0 and acc = 0, and outputs 0
    l1 = tl.where(l1 == 0.0, 1.0, l1)
    l2 = tl.where(l2 == 0.0, 1.0, l2)
    o1 = acc1 / l1[:, None]  # (BLOCK_M, BLOCK_D) = M+ V
    o2 = acc2 / l2[:, None]  # (BLOCK_M, BLOCK_D) = M- V
    tl.store(O + q_idx, (gain_plus * o1 - gain_minus * o2).to(O.dtype.element_ty), mask=q_mask)
    if SAVE:  # what the backward needs
        tl.store(O1 + q_idx, o1.to(O1.dtype.element_ty), mask=q_mask)
        tl.store(O2 + q_idx, o2.to(O2.dtype.element_ty), mask=q_mask)
        tl.store(LSE1 + bh * T + rows, m1 + tl.log2(l1), mask=rows < T)  # log2 units
        tl.store(LSE2 + bh * T + rows, m2 + tl.log2(l2), mask=rows < T)


@triton.jit
def _opamp_bwd_dkdv_kernel(  # dK1, dK2, dV: one program per (key block, batch*KV head)
    Q1, K1, Q2, K2, V, PAD, DO, LSE1, LSE2, D1, D2,  # D1, D2: (B,H,T) fp32 rowsum(dO * Ok)
    DK1, DK2, DV,  # outputs (B,Hkv,S,D)
    qk_scale, sm_scale, gain_plus, gain_minus, H, GROUP, T, S, D,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1).to(tl.int64)  # b * Hkv + kv head
    Hkv = H // GROUP
    b, kvh = bkv // Hkv, bkv % Hkv

    cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
    offs_d = tl.arange(0, BLOCK_D)
    kv_idx = bkv * S * D + cols[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    kv_mask = (cols[:, None] < S) & (offs_d[None, :] < D)
    k1 = tl.load(K1 + kv_idx, mask=kv_mask, other=0.0)
    k2 = tl.load(K2 + kv_idx, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_idx, mask=kv_mask, other=0.0)
    dk1 = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # fp32 accumulators
    dk2, dv = dk1, dk1

    # causal: query i sees key j iff i >= j - (S - T), so earlier rows can be skipped
    lo = 0
    if CAUSAL:
        lo = tl.maximum(0, start_n - (S - T))
    for g in range(0, GROUP):  # every query head that reads this KV head (GQA)
        bh = b * H + kvh * GROUP + g
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            q_idx = bh * T * D + rows[:, None] * D + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
            q_mask = (rows[:, None] < T) & (offs_d[None, :] < D)
            q1 = tl.load(Q1 + q_idx, mask=q_mask, other=0.0)
            q2 = tl.load(Q2 + q_idx, mask=q_mask, other=0.0)
            do = tl.load(DO + q_idx, mask=q_mask, other=0.0)
            lse1 = tl.load(LSE1 + bh * T + rows, mask=rows < T, other=0.0)  # (BLOCK_M,)
            lse2 = tl.load(LSE2 + bh * T + rows, mask=rows < T, other=0.0)
            d1 = tl.load(D1 + bh * T + rows, mask=rows < T, other=0.0)
            d2 = tl.load(D2 + bh * T + rows, mask=rows < T, other=0.0)

            allowed = _allowed(rows, cols, b, T, S, PAD, CAUSAL, HAS_PAD)
            p1 = _probs(q1, k1, lse1, allowed, qk_scale, PRECISION)  # (BLOCK_M, BLOCK_N)
            p2 = _probs(q2, k2, lse2, allowed, qk_scale, PRECISION)
            dov = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dO V^T, shared

            p = gain_plus * p1 - gain_minus * p2  # dV += (a P1 - b P2)^T dO
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            # dS1 = a P1 (dO V^T - D1),  dS2 = -b P2 (dO V^T - D2);  dK += dS^T Q
            ds1 = gain_plus * p1 * (dov - d1[:, None])
            ds2 = -gain_minus * p2 * (dov - d2[:, None])
            dk1 += tl.dot(tl.trans(ds1.to(q1.dtype)), q1, input_precision=PRECISION)
            dk2 += tl.dot(tl.trans(ds2.to(q2.dtype)), q2, input_precision=PRECISION)

    tl.store(DK1 + kv_idx, (dk1 * sm_scale).to(DK1.dtype.element_ty), mask=kv_mask)
    tl.store(DK2 + kv_idx, (dk2 * sm_scale).to(DK2.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_idx, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _opamp_bwd_dq_kernel(  # dQ1, dQ2: one program per (query block, batch*head), like the forward
    Q1, K1, Q2, K2, V, PAD, DO, LSE1, LSE2, D1, D2,
    DQ1, DQ2,  # outputs (B,H,T,D)
    qk_scale, sm_scale, gain_plus, gain_minus, H, GROUP, T, S, D,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    bkv = b * (H // GROUP) + h // GROUP

    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = bh * T * D + rows[:, None] * D + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    q_mask = (rows[:, None] < T) & (offs_d[None, :] < D)
    q1 = tl.load(Q1 + q_idx, mask=q_mask, other=0.0)
    q2 = tl.load(Q2 + q_idx, mask=q_mask, other=0.0)
    do = tl.load(DO + q_idx, mask=q_mask, other=0.0)
    lse1 = tl.load(LSE1 + bh * T + rows, mask=rows < T, other=0.0)
    lse2 = tl.load(LSE2 + bh * T + rows, mask=rows < T, other=0.0)
    d1 = tl.load(D1 + bh * T + rows, mask=rows < T, other=0.0)
    d2 = tl.load(D2 + bh * T + rows, mask=rows < T, other=0.0)
    dq1 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dq2 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    hi = S
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + S - T)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_idx = bkv * S * D + cols[:, None] * D + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        kv_mask = (cols[:, None] < S) & (offs_d[None, :] < D)
        k1 = tl.load(K1 + kv_idx, mask=kv_mask, other=0.0)
        k2 = tl.load(K2 + kv_idx, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_idx, mask=kv_mask, other=0.0)

        allowed = _allowed(rows, cols, b, T, S, PAD, CAUSAL, HAS_PAD)
        p1 = _probs(q1, k1, lse1, allowed, qk_scale, PRECISION)
        p2 = _probs(q2, k2, lse2, allowed, qk_scale, PRECISION)
        dov = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds1 = gain_plus * p1 * (dov - d1[:, None])
        ds2 = -gain_minus * p2 * (dov - d2[:, None])
        dq1 += tl.dot(ds1.to(k1.dtype), k1, input_precision=PRECISION)  # dQ += dS K
        dq2 += tl.dot(ds2.to(k2.dtype), k2, input_precision=PRECISION)

    tl.store(DQ1 + q_idx, (dq1 * sm_scale).to(DQ1.dtype.element_ty), mask=q_mask)
    tl.store(DQ2 + q_idx, (dq2 * sm_scale).to(DQ2.dtype.element_ty), mask=q_mask)


class _OpAmpAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q1, k1, q2, k2, v, K, causal, key_padding_mask, scale, save):
        (B, H, T, D), (Hkv, S) = q1.shape, k1.shape[1:3]
        q1, k1, q2, k2, v = (t.contiguous() for t in (q1, k1, q2, k2, v))
        pad = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else None
        scale = D**-0.5 if scale is None else float(scale)
        a, b = float(K) + 0.5, float(K) - 0.5
        blocks, launch = launch_settings(D, q1.dtype)

        o = torch.empty_like(q1)  # (B, H, T, D)
        o1, o2 = torch.empty(2, *q1.shape, device=q1.device, dtype=q1.dtype) if save else (o, o)  # M+ V, M- V
        lse1, lse2 = torch.empty(2, B, H, T, device=q1.device, dtype=torch.float32) if save else (o, o)
        grid = (triton.cdiv(T, blocks["BLOCK_M"]), B * H)
        with on_device(q1):
            _opamp_fwd_kernel[grid](q1, k1, q2, k2, v, pad if pad is not None else q1, o, o1, o2, lse1, lse2,
                                    scale * LOG2E, a, b, H, H // Hkv, T, S, D,
                                    CAUSAL=bool(causal), HAS_PAD=pad is not None, SAVE=bool(save),
                                    PRECISION=precision(q1.dtype), **blocks, **launch)
        if save:
            ctx.save_for_backward(q1, k1, q2, k2, v, o1, o2, lse1, lse2, pad)
            ctx.args = (scale, a, b, bool(causal), blocks, launch, precision(q1.dtype))
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward
    def backward(ctx, do):
        q1, k1, q2, k2, v, o1, o2, lse1, lse2, pad = ctx.saved_tensors
        scale, a, b, causal, blocks, launch, precision = ctx.args
        (B, H, T, D), (Hkv, S) = q1.shape, k1.shape[1:3]
        do = do.contiguous()

        d1, d2 = ((do.float() * o.float()).sum(-1) for o in (o1, o2))  # per-map delta Dk = rowsum(dO * Ok), (B, H, T)
        dq1, dq2 = torch.empty_like(q1), torch.empty_like(q2)
        dk1, dk2, dv = torch.empty_like(k1), torch.empty_like(k2), torch.empty_like(v)
        args = (q1, k1, q2, k2, v, pad if pad is not None else q1, do, lse1, lse2, d1, d2)
        consts = dict(CAUSAL=causal, HAS_PAD=pad is not None, PRECISION=precision, **blocks, **launch)
        sizes = (scale * LOG2E, scale, a, b, H, H // Hkv, T, S, D)
        with on_device(q1):  # one program per key block, then one per query block
            _opamp_bwd_dkdv_kernel[(triton.cdiv(S, blocks["BLOCK_N"]), B * Hkv)](*args, dk1, dk2, dv, *sizes, **consts)
            _opamp_bwd_dq_kernel[(triton.cdiv(T, blocks["BLOCK_M"]), B * H)](*args, dq1, dq2, *sizes, **consts)
        return dq1, dk1, dq2, dk2, dv, None, None, None, None, None


def opamp_attention(q1, k1, q2, k2, v, K=10.0, causal=True, key_padding_mask=None, scale=None):
    """Fused ``minimal.attention.opamp_attention`` (same signature), differentiable in q1, k1, q2, k2, v:
    q1, q2 (B, H, T, D); k1, k2, v (B, Hkv, S, D) -> (B, H, T, D) in the input dtype."""
    check_opamp_inputs(q1, k1, q2, k2, v, K, key_padding_mask)
    check_kernel_inputs(q1, "minimal.triton_opamp", "minimal.attention.opamp_attention")
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (q1, k1, q2, k2, v))
    return _OpAmpAttention.apply(q1, k1, q2, k2, v, float(K), causal, key_padding_mask, scale, save)
