"""Pure-PyTorch attention references: the specs the Triton kernels must match.

Everything here is eager and materialises the full ``(T, S)`` score matrix, so it is easy to
read and easy to trust, and slow and memory-hungry at long sequence lengths. The kernels in
``minimal/triton_opamp.py`` compute the same numbers without that matrix and are tested
against these functions.

Shapes (the Hugging Face layout, heads before time)::

    q, q1, q2   (B, H,   T, D)    B batch, H query heads, T queries, D head dim
    k, k1, k2   (B, Hkv, S, D)    Hkv key/value heads (grouped-query attention if Hkv < H),
    v           (B, Hkv, S, D)    S keys
    out         (B, H,   T, D)

Conventions shared by every function here and by the kernels:

- ``scale`` defaults to ``1/sqrt(D)``.
- Grouped-query attention (GQA): query head ``h`` reads key/value head ``h // (H // Hkv)``.
- ``causal=True`` is aligned bottom-right: query ``i`` (of ``T``) sees keys ``j <= i + S - T``.
  With ``T == S`` this is the usual lower-triangular mask; with ``T == 1`` (decoding one token
  against a cache of ``S``) the query sees every key.
- ``key_padding_mask``: bool ``(B, S)``, True for a real token (keep), False for padding.
- A query row that sees no key at all (all its keys padded, or ``T > S`` under causal) has no
  softmax to speak of: its probabilities and its output are defined as 0, never NaN.

OpAmp attention (arXiv 2502.12502) runs two softmax maps over the same values and combines
them like an operational amplifier with differential gain ``K`` (the CMRR) and common-mode
gain 1::

    M+  = softmax(Q1 K1^T s + mask)                 (B, H, T, S)
    M-  = softmax(Q2 K2^T s + mask)                 (B, H, T, S)
    M   = K (M+ - M-) + (M+ + M-) / 2               rows still sum to 1, entries may be < 0
    out = M V = (K + 1/2) M+ V - (K - 1/2) M- V

That is Differential-Transformer attention (arXiv 2410.05258),
``(M+ - lambda M-) V`` with ``lambda = (K - 1/2) / (K + 1/2)``, times a gain ``K + 1/2``, and
without the Differential Transformer's per-head normalisation.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "check_opamp_inputs",
    "attention_probs",
    "softmax_attention",
    "opamp_maps",
    "opamp_combine",
    "opamp_attention",
]


# ----------------------------------------------------------------------------------------
# Input checks (shared with the Triton wrapper)


def check_opamp_inputs(q1, k1, q2, k2, v, K=10.0, key_padding_mask=None):
    """Validate OpAmp inputs and return ``(B, H, Hkv, T, S, D)``; raise ``ValueError`` if bad.

    Pass ``q2=q1, k2=k1`` to check a plain (single-map) attention call, and ``v=None`` when
    only the maps are wanted.
    """
    named = {"q1": q1, "k1": k1, "q2": q2, "k2": k2}
    if v is not None:
        named["v"] = v
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"all inputs must share one dtype, got {dtypes}")
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")
    if q1.shape != q2.shape:
        raise ValueError(f"q1 and q2 must have the same shape, got {tuple(q1.shape)} and {tuple(q2.shape)}")
    if k1.shape != k2.shape:
        raise ValueError(f"k1 and k2 must have the same shape, got {tuple(k1.shape)} and {tuple(k2.shape)}")
    if v is not None and v.shape != k1.shape:
        raise ValueError(f"v must have the shape of k1 (B, Hkv, S, D), got {tuple(v.shape)} and {tuple(k1.shape)}")

    B, H, T, D = q1.shape
    Bk, Hkv, S, Dk = k1.shape
    if Bk != B:
        raise ValueError(f"queries have batch {B} but keys have batch {Bk}")
    if Dk != D:
        raise ValueError(f"queries have head_dim {D} but keys have head_dim {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")

    try:
        K_value = float(K)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"K (the CMRR) must be a number, got {K!r}") from None
    if not math.isfinite(K_value) or K_value <= 0:
        raise ValueError(f"K (the CMRR) must be a finite number > 0, got {K!r}")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = real token)")
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = {(B, S)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q1.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, inputs on {q1.device}")
    return B, H, Hkv, T, S, D


# ----------------------------------------------------------------------------------------
# Building blocks


def allowed_keys(T, S, causal=True, key_padding_mask=None, device=None):
    """Bool mask of the keys each query may see: ``(B or 1, 1, T, S)``, True = allowed."""
    allowed = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(T, device=device)[:, None]  # (T, 1) query index
        j = torch.arange(S, device=device)[None, :]  # (1, S) key index
        allowed = allowed & (j <= i + (S - T))  # bottom-right aligned
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
    return allowed


def attention_probs(q, k, causal=True, key_padding_mask=None, scale=None):
    """``softmax(Q K^T s + mask)``: (B, H, T, D) x (B, Hkv, S, D) -> (B, H, T, S).

    Computed in fp32 (fp64 for fp64 inputs) and returned in that precision. Rows with no
    allowed key are all zeros.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs

    k = k.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, D): query head h reads kv head h // group
    scores = (q.to(acc) @ k.to(acc).transpose(-2, -1)) * scale  # (B, H, T, S)
    allowed = allowed_keys(T, S, causal, key_padding_mask, q.device)  # (B|1, 1, T, S)

    # A finite "minus infinity": a fully masked row becomes a harmless uniform softmax that
    # we then zero out, instead of exp(-inf - (-inf)) = NaN (in the values or the gradients).
    scores = scores.masked_fill(~allowed, torch.finfo(acc).min)
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    return probs * allowed  # zero the masked keys (and whole rows that saw nothing)


def _apply(probs, v, out_dtype):
    """``probs @ v`` with GQA: (B, H, T, S) x (B, Hkv, S, D) -> (B, H, T, D)."""
    H, Hkv = probs.shape[1], v.shape[1]
    v = v.repeat_interleave(H // Hkv, dim=1).to(probs.dtype)  # (B, H, S, D)
    return (probs @ v).to(out_dtype)


# ----------------------------------------------------------------------------------------
# Softmax attention


def softmax_attention(q, k, v, causal=True, key_padding_mask=None, scale=None):
    """Standard attention ``softmax(Q K^T s + mask) V``.

    q (B, H, T, D), k and v (B, Hkv, S, D) -> (B, H, T, D), same dtype as q.
    """
    check_opamp_inputs(q, k, q, k, v, key_padding_mask=key_padding_mask)
    probs = attention_probs(q, k, causal, key_padding_mask, scale)  # (B, H, T, S)
    return _apply(probs, v, q.dtype)


# ----------------------------------------------------------------------------------------
# OpAmp attention


def opamp_maps(q1, k1, q2, k2, causal=True, key_padding_mask=None, scale=None):
    """The two attention maps ``(M+, M-)``, each (B, H, T, S), in fp32 (fp64 for fp64 inputs).

    For inspection and plots; ``opamp_combine(M+, M-, K)`` gives the combined map.
    """
    check_opamp_inputs(q1, k1, q2, k2, None, key_padding_mask=key_padding_mask)
    m_plus = attention_probs(q1, k1, causal, key_padding_mask, scale)  # (B, H, T, S)
    m_minus = attention_probs(q2, k2, causal, key_padding_mask, scale)  # (B, H, T, S)
    return m_plus, m_minus


def opamp_combine(m_plus, m_minus, K=10.0):
    """The OpAmp map ``K (M+ - M-) + (M+ + M-)/2``: differential gain K, common-mode gain 1."""
    return K * (m_plus - m_minus) + 0.5 * (m_plus + m_minus)


def opamp_attention(q1, k1, q2, k2, v, K=10.0, causal=True, key_padding_mask=None, scale=None):
    """OpAmp attention (arXiv 2502.12502): ``(K (M+ - M-) + (M+ + M-)/2) V``.

    q1, q2      (B, H, T, D)    queries of the two maps (e.g. two adapters on one query)
    k1, k2, v   (B, Hkv, S, D)  keys of the two maps, and the shared values
    K           CMRR (differential gain), finite and > 0; the paper's default is 10
    returns     (B, H, T, D)    in the dtype of the inputs

    Computed as ``(K + 1/2) M+ V - (K - 1/2) M- V``, which is the same thing. With
    ``q2 = q1`` and ``k2 = k1`` the maps are equal and this is plain softmax attention, for
    any K: the common-mode gain is 1.
    """
    check_opamp_inputs(q1, k1, q2, k2, v, K, key_padding_mask)
    m_plus, m_minus = opamp_maps(q1, k1, q2, k2, causal, key_padding_mask, scale)  # 2 x (B, H, T, S)
    out_plus = _apply(m_plus, v, m_plus.dtype)  # (B, H, T, D)  M+ V
    out_minus = _apply(m_minus, v, m_minus.dtype)  # (B, H, T, D)  M- V
    return ((K + 0.5) * out_plus - (K - 0.5) * out_minus).to(q1.dtype)
