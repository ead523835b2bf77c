"""Scaled ReAttention in linear memory: the same output as ``minimal.sra.sra_attention_eager`` without any (T, T)
tensor. Every row first gets plain (flash) attention. SRA touches few rows per layer (one chunk of c rows and the
t tail rows), and those are recomputed by a *rows function* that needs only sums over keys once a row's
log-sum-exp is known (per row i, window W = [lo, hi), p_j = exp(s_j - lse)):

    pass 1   lse_i = log sum_j exp(s_ij)
    pass 2   kept  = sum_{p_j >= theta} p_j v_j        r = 1 - sum_{p_j >= theta} p_j
             mv    = sum_{j in W} m_j v_j              M = sum_{j in W} m_j,  m_j = 100 or 5
             valid = any_{j in W} p_j > theta
    output   kept + r g mv / M where valid, else the plain row

Rows functions: ``blocked_rows`` here (PyTorch, a block of rows against all keys) and ``minimal.triton_sra.sra_rows``
(Triton). The plan (theta, lo, hi) comes from ``minimal.sra.row_plan``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import allowed_keys, grouped_apply, grouped_scores, masked_softmax, row_blocks


def real_tokens(lengths, T: int, device=None) -> torch.Tensor:
    """(B, T) bool, True on the real tokens of a left-padded batch with ``lengths[b]`` of them."""
    n = torch.tensor(lengths, device=device)[:, None]
    return torch.arange(T, device=device)[None, :] >= T - n


def plain_attention(q, k, v, lengths, scale):
    """Causal attention, one sequence at a time on its real tokens (SDPA: flash, linear memory).
    q (B, H, T, D), k, v (B, Hkv, T, D) -> (B, H, T, D); padding rows are 0."""
    T, causal = q.shape[2], dict(is_causal=True, scale=scale, enable_gqa=True)
    if all(n == T for n in lengths):  # no padding: one batched call
        return F.scaled_dot_product_attention(q, k, v, **causal)
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        if n:
            real = (slice(b, b + 1), slice(None), slice(T - n, T))  # item b, its real positions
            out[real] = F.scaled_dot_product_attention(q[real], k[real], v[real], **causal)
    return out


def touched_spans(touched) -> list[tuple[int, int]]:
    """Maximal runs [r0, r1) of query positions where some sequence is touched; touched (B, T) bool."""
    t = F.pad(touched.any(0).int(), (1, 1))  # (T + 2,)
    edges = (t[1:] - t[:-1]).nonzero().flatten().tolist()  # where runs start and end, alternating
    return list(zip(edges[::2], edges[1::2]))


def sra_output(q, k, v, theta, lo, hi, lengths, scale, gain, rows_fn):
    """Plain attention for every row, then ``rows_fn`` for the rows the plan touches: (B, H, T, D). q (B, H, T, D);
    k, v (B, Hkv, T, D); theta, lo, hi (B, T) the plan (lo = hi: untouched); lengths: real tokens per item.
    ``rows_fn``: as ``blocked_rows`` (same arguments and returns); its output replaces the plain one where valid."""
    T = q.shape[2]
    out = plain_attention(q, k, v, lengths, scale)  # (B, H, T, D)
    key_real = real_tokens(lengths, T, q.device)  # (B, T)
    for r0, r1 in touched_spans(lo < hi):
        # the span's rows are the last r1 - r0 of the first r1 positions: later keys are causal zeros
        rows, valid = rows_fn(q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1], theta[:, r0:r1], lo[:, r0:r1],
                              hi[:, r0:r1], key_real[:, :r1], scale, gain)
        out[:, :, r0:r1] = torch.where(valid[..., None], rows.to(q.dtype), out[:, :, r0:r1])
    return out


def blocked_rows(q, k, v, theta, lo, hi, key_real, scale, gain, tile=2**20):
    """SRA for R query rows, the last R of S positions: ``(out (B, H, R, D), valid (B, H, R))``. q (B, H, R, D);
    k, v (B, Hkv, S, D); theta, lo, hi (B, R); key_real (B, S). A block of rows (about ``tile`` scores) against
    all keys: pass 1 is one softmax, pass 2 one matmul; memory O(tile)."""
    (B, H, R, D), S = q.shape, k.shape[2]
    out = torch.zeros(B, H, R, D, dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    valid = torch.zeros(B, H, R, dtype=torch.bool, device=q.device)
    for r0, r1 in row_blocks(R, B * H * S, tile):
        Sb = S - R + r1  # keys after the block's last row are causal zeros
        allowed = allowed_keys(r1 - r0, Sb, True, key_real[:, :Sb], q.device)  # (B, 1, Rb, Sb)
        p = masked_softmax(grouped_scores(q[:, :, r0:r1], k[:, :, :Sb], scale), allowed)  # (B, H, Rb, Sb)
        th = theta[:, None, r0:r1, None].to(p.dtype)  # (B, 1, Rb, 1)
        j = torch.arange(Sb, device=q.device)
        in_w = (j >= lo[:, None, r0:r1, None]) & (j < hi[:, None, r0:r1, None])  # (B, 1, Rb, Sb): W
        m = torch.where(p >= th, 100.0, 5.0).to(p.dtype) * in_w  # the 100/5 weights, 0 outside W
        valid[:, :, r0:r1] = ((p > th) & in_w).any(-1)
        kept = p.masked_fill(p < th, 0.0)  # drop the small probabilities
        r = 1 - kept.sum(-1, keepdim=True)  # (B, H, Rb, 1) the removed mass
        out[:, :, r0:r1] = grouped_apply(kept + r * gain * m / m.sum(-1, keepdim=True).clamp_min(1.0), v[:, :, :Sb])
    return out, valid
