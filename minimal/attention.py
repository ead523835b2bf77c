"""Pure-PyTorch attention references: the specs the Triton kernels must match.

Eager and easy to trust: they materialise the ``(T, S)`` map; the kernels (``minimal/triton_*.py``)
compute the same numbers without it. Shapes, in the Hugging Face layout (heads before time)::

    q, q1, q2   (B, H,   T, D)    B batch, H query heads, T queries, D head dim
    k, k1, k2   (B, Hkv, S, D)    Hkv key/value heads (grouped-query attention if Hkv < H)
    v           (B, Hkv, S, D)    out (B, H, T, D)

Conventions of the whole package (kernels included): ``scale`` defaults to ``1/sqrt(D)``; query head ``h``
reads key/value head ``h // (H // Hkv)``; ``causal=True`` is aligned bottom-right (query ``i`` sees keys
``j <= i + S - T``, so ``T == 1`` decoding sees every key); ``key_padding_mask`` is bool ``(B, S)``, True for a
real token; a query row that sees no key has probabilities and output 0 and finite gradients (:func:`masked_softmax`).

OpAmp attention (arXiv 2502.12502, eq. 5-6) runs two softmax maps over the same values and combines them
like an operational amplifier, differential gain ``K`` (the CMRR), common-mode gain 1:

    M+ = softmax(Q1 K1^T s + mask),  M- = softmax(Q2 K2^T s + mask)
    M  = K (M+ - M-) + (M+ + M-) / 2,   out = M V = (K + 1/2) M+ V - (K - 1/2) M- V

That is Differential-Transformer attention (arXiv 2410.05258) ``(M+ - lambda M-) V`` with
``lambda = (K - 1/2) / (K + 1/2)`` and gain ``K + 1/2``, without its per-head normalisation.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_opamp_inputs", "masked_softmax", "grouped_scores", "grouped_apply", "row_blocks",
           "allowed_keys", "softmax_probs", "softmax_attention", "opamp_maps", "opamp_combine", "opamp_attention"]


def check_opamp_inputs(q1, k1, q2, k2, v, K=10.0, key_padding_mask=None):
    """Validate OpAmp inputs (``q2=q1, k2=k1`` for plain attention, ``v=None`` for the maps only), return
    ``(B, H, Hkv, T, S, D)``; raise ``ValueError`` naming the problem."""
    named = {"q1": q1, "k1": k1, "q2": q2, "k2": k2, **({} if v is None else {"v": v})}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a floating-point tensor of rank 4 (B, heads, seq, head_dim), got {got}")
    for what in ("dtype", "device"):
        found = {name: getattr(t, what) for name, t in named.items()}
        if len(set(found.values())) != 1:
            raise ValueError(f"all inputs must share one {what}, got {found}")
    if q1.shape != q2.shape or k1.shape != k2.shape:
        raise ValueError(f"q1 and q2 (and k1 and k2) must have the same shape, got {tuple(q1.shape)}, "
                         f"{tuple(q2.shape)}, {tuple(k1.shape)}, {tuple(k2.shape)}")
    if v is not None and v.shape != k1.shape:
        raise ValueError(f"v must have the shape of k1 (B, Hkv, S, D), got {tuple(v.shape)} and {tuple(k1.shape)}")
    (B, H, T, D), (Bk, Hkv, S, Dk) = q1.shape, k1.shape
    if (Bk, Dk) != (B, D):
        raise ValueError(f"queries have batch {B}, head_dim {D} but keys have batch {Bk}, head_dim {Dk}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if isinstance(K, bool) or not isinstance(K, (int, float)) or not math.isfinite(K) or K <= 0:
        raise ValueError(f"K (the CMRR) must be a finite number > 0, got {K!r}")
    kpm = key_padding_mask
    if kpm is not None and not (isinstance(kpm, torch.Tensor) and kpm.dtype == torch.bool
                                and tuple(kpm.shape) == (B, S) and kpm.device == q1.device):
        got = (kpm.dtype, tuple(kpm.shape), kpm.device) if isinstance(kpm, torch.Tensor) else type(kpm).__name__
        raise ValueError(f"key_padding_mask must be a bool tensor (True = real token) of shape (B, S) = {(B, S)} "
                         f"on {q1.device}, got {got}")
    return B, H, Hkv, T, S, D


def masked_softmax(scores, allowed):
    """The one masked softmax: scores (..., S), allowed bool (broadcastable) -> (..., S). Masked scores get a
    *finite* minimum (``-inf``: NaN in an empty row); ``* allowed`` zeroes an empty row: zeros, finite gradients."""
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * allowed


def grouped_scores(q, k, scale):
    """``q k^T * scale``: q (B, H, R, D), k (B, Hkv, S, D) -> (B, H, R, S), in fp32 (fp64 stays).
    GQA without repeating K: the ``G = H / Hkv`` query heads of a KV head are ``G * R`` rows of one matmul."""
    (B, H, R, D), (Hkv, S) = q.shape, k.shape[1:3]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).reshape(B, Hkv, (H // Hkv) * R, D)  # (B, Hkv, G*R, D): head h = kv * G + g
    return ((qg * scale) @ k.to(acc).transpose(-1, -2)).view(B, H, R, S)


def grouped_apply(p, v):
    """``p @ v`` with GQA: p (B, H, R, S), v (B, Hkv, S, D) -> (B, H, R, D) in p's dtype."""
    (B, H, R, S), Hkv, D = p.shape, v.shape[1], v.shape[3]
    return (p.reshape(B, Hkv, (H // Hkv) * R, S) @ v.to(p.dtype)).view(B, H, R, D)


def row_blocks(R: int, numbers_per_row: int, tile: int = 2**20):
    """``[(r0, r1), ...]`` covering R query rows, each block about ``tile`` score numbers."""
    step = max(1, tile // max(numbers_per_row, 1))
    return [(r0, min(r0 + step, R)) for r0 in range(0, R, step)]


def allowed_keys(T, S, causal=True, key_padding_mask=None, device=None):
    """Bool mask of the keys each query may see: ``(B or 1, 1, T, S)``, True = allowed."""
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril(S - T)  # bottom-right aligned: query i sees keys j <= i + S - T
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
    return allowed


def softmax_probs(q, k, causal=True, key_padding_mask=None, scale=None):
    """``softmax(Q K^T s + mask)`` with bottom-right causality: -> (B, H, T, S) in fp32 (fp64 stays)."""
    scores = grouped_scores(q, k, q.shape[-1] ** -0.5 if scale is None else scale)  # (B, H, T, S)
    return masked_softmax(scores, allowed_keys(q.shape[2], k.shape[2], causal, key_padding_mask, q.device))


def softmax_attention(q, k, v, causal=True, key_padding_mask=None, scale=None):
    """Standard attention ``softmax(Q K^T s + mask) V``: -> (B, H, T, D) in q's dtype."""
    check_opamp_inputs(q, k, q, k, v, key_padding_mask=key_padding_mask)
    return grouped_apply(softmax_probs(q, k, causal, key_padding_mask, scale), v).to(q.dtype)


def opamp_maps(q1, k1, q2, k2, causal=True, key_padding_mask=None, scale=None):
    """The two maps ``(M+, M-)``, each (B, H, T, S) in fp32 (fp64 stays), for inspection and plots."""
    check_opamp_inputs(q1, k1, q2, k2, None, key_padding_mask=key_padding_mask)
    return (softmax_probs(q1, k1, causal, key_padding_mask, scale),
            softmax_probs(q2, k2, causal, key_padding_mask, scale))


def opamp_combine(m_plus, m_minus, K=10.0):
    """The OpAmp map ``K (M+ - M-) + (M+ + M-)/2``: differential gain K, common-mode gain 1."""
    return K * (m_plus - m_minus) + 0.5 * (m_plus + m_minus)


def opamp_attention(q1, k1, q2, k2, v, K=10.0, causal=True, key_padding_mask=None, scale=None):
    """OpAmp attention ``(K + 1/2) M+ V - (K - 1/2) M- V`` -> (B, H, T, D) in the inputs' dtype. K: the CMRR
    (> 0, the paper's default 10); with ``q2 = q1, k2 = k1`` it is plain attention for any K (common-mode gain 1)."""
    check_opamp_inputs(q1, k1, q2, k2, v, K, key_padding_mask)
    m_plus = softmax_probs(q1, k1, causal, key_padding_mask, scale)  # (B, H, T, S)
    m_minus = softmax_probs(q2, k2, causal, key_padding_mask, scale)  # (B, H, T, S)
    return ((K + 0.5) * grouped_apply(m_plus, v) - (K - 0.5) * grouped_apply(m_minus, v)).to(q1.dtype)
