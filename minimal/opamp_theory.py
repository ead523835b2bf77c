"""Notebook 01 (OpAmp theory): synthetic attention maps, their summary, a plot, and a check of the OpAmp reference
(``minimal.attention``, arXiv 2502.12502) against transformers' DiffLlama.

    M = K (M+ - M-) + (M+ + M-)/2 = C + K S
    C = (M+ + M-)/2     common mode      rows sum to 1
    S =  M+ - M-        differential     rows sum to 0

The synthetic maps show that split: both share one noise map N (sink, look-alike documents: "common-mode noise")
and differ on the gold document R. Nothing is trained: a picture of the formula, not of a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import opamp_attention

__all__ = ["SyntheticMaps", "synthetic_maps", "map_summary", "plot_map", "diffllama_vs_opamp"]


@dataclass
class SyntheticMaps:
    """Two attention maps over one synthetic context: m_plus, m_minus, noise (N), signal (R), each (Q, S), rows the
    Q question tokens; doc_spans: the documents' key ranges; gold: the gold one's index; sink: the sink's key index."""

    m_plus: torch.Tensor
    m_minus: torch.Tensor
    noise: torch.Tensor
    signal: torch.Tensor
    doc_spans: list
    gold: int
    sink: int = 0


def _normalise(weights, allowed):  # rows sum to 1 over the allowed keys
    weights = weights * allowed
    return weights / weights.sum(-1, keepdim=True)


def synthetic_maps(num_docs=6, doc_len=6, question_len=8, gold=2, signal_plus=0.3, signal_minus=0.2,
                   mismatch=0.02, seed=0, dtype=torch.float64) -> SyntheticMaps:
    """Two attention maps that share their noise and differ on the gold document. Keys ``[sink, 2 template
    tokens, num_docs documents of doc_len, question_len question tokens]``; rows: the question tokens, causal.
    N (shared noise): a heavy sink, look-alike documents (one random weight each), jitter, recent question tokens;
    R: uniform over the gold document; E1, E2: small independent random maps (two maps never share their noise
    exactly). Every map is a valid one::

        M+ = (1 - a - e) N + a R + e E1,     a = signal_plus
        M- = (1 - b - e) N + b R + e E2,     b = signal_minus,  e = mismatch
        M+ - M- = (a - b)(R - N) + e (E1 - E2)
    """
    if not 0 <= signal_minus < signal_plus:
        raise ValueError(f"need 0 <= signal_minus < signal_plus, got {signal_minus} and {signal_plus}")
    if not (0 <= mismatch and signal_plus + mismatch <= 1):
        raise ValueError(f"mismatch must be >= 0 with signal_plus + mismatch <= 1, got {mismatch}")
    if not 0 <= gold < num_docs:
        raise ValueError(f"gold must be a document index in [0, {num_docs}), got {gold}")
    g = torch.Generator().manual_seed(seed)
    first_doc = 3  # sink + 2 template tokens
    doc_spans = [(first_doc + i * doc_len, first_doc + (i + 1) * doc_len) for i in range(num_docs)]
    S = first_doc + num_docs * doc_len + question_len
    allowed = torch.ones(question_len, S, dtype=dtype).tril(S - question_len)  # (Q, S) causal, row i at position S-Q+i

    rand = lambda *shape: torch.rand(*shape, generator=g, dtype=dtype)  # noqa: E731
    w = 0.2 * rand(question_len, S)  # (Q, S) jitter everywhere
    w[:, 0] += 6.0 * (1 + rand(question_len))  # the sink
    for start, end in doc_spans:  # look-alikes: one weight per document, for every row
        w[:, start:end] += 0.3 + 0.2 * rand(1) + 0.1 * rand(question_len, end - start)
    w[:, S - question_len:] += 0.5  # recent question tokens
    noise = _normalise(w, allowed)  # (Q, S)
    signal = torch.zeros(question_len, S, dtype=dtype)
    signal[:, slice(*doc_spans[gold])] = 1.0 / doc_len  # (Q, S)

    a, b, e = signal_plus, signal_minus, mismatch
    e1, e2 = _normalise(rand(question_len, S), allowed), _normalise(rand(question_len, S), allowed)
    m_plus = (1 - a - e) * noise + a * signal + e * e1
    m_minus = (1 - b - e) * noise + b * signal + e * e2
    return SyntheticMaps(m_plus, m_minus, noise, signal, doc_spans, gold)


def map_summary(m, doc_spans, gold, sink=0) -> dict:
    """Row-averaged numbers for a map ``m`` (Q, S), entries maybe < 0: signed mass on the ``gold`` document,
    on a ``distractor`` (mean), on the ``sink``; ``gold_share_abs`` of sum|m|; the ``negative`` entries
    (count, ``negative_frac``), the ``min`` entry, ``row_sum_error`` = max |row sum - 1|."""
    span_mass = torch.stack([m[:, s:e].sum(-1) for s, e in doc_spans], -1)  # (Q, docs)
    distractors = [i for i in range(len(doc_spans)) if i != gold]
    return dict(gold=span_mass[:, gold].mean().item(), distractor=span_mass[:, distractors].mean().item(),
                sink=m[:, sink].mean().item(),
                gold_share_abs=(m[:, slice(*doc_spans[gold])].abs().sum(-1) / m.abs().sum(-1)).mean().item(),
                negative=int((m < 0).sum()), negative_frac=(m < 0).double().mean().item(), min=m.min().item(),
                row_sum_error=(m.sum(-1) - 1).abs().max().item())


def plot_map(ax, m, title="", doc_spans=(), gold=None):
    """Heat map of a (Q, S) map, diverging at 0 (red > 0, blue < 0); the gold document's edges thick green."""
    from matplotlib.colors import CenteredNorm

    im = ax.imshow(m.detach().cpu().numpy(), aspect="auto", cmap="RdBu_r", norm=CenteredNorm(0.0),
                   interpolation="nearest")
    for i, (start, end) in enumerate(doc_spans):
        for x in (start - 0.5, end - 0.5):
            ax.axvline(x, color="green" if i == gold else "0.6", lw=2.0 if i == gold else 0.5)
    ax.set_title(title, fontsize=9)
    ax.set(xlabel="key position", ylabel="question token")
    ax.figure.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    return ax


def diffllama_vs_opamp(K, batch=2, seq=9, heads=4, kv_heads=2, head_dim=16, keep_norm=False, seed=0):
    """Run transformers' own ``DiffLlamaAttention.forward`` and OpAmp on the same projections: ``(diffllama, opamp)``,
    both (B, T, H * D) float64, equal up to DiffLlama's fp32 softmax (~1e-7 relative) unless ``keep_norm``.
    DiffLlama (transformers 5.x, arXiv 2410.05258): query heads ``i < H/2`` with the first half of the KV heads form
    map 1, the rest map 2, each reading values of width 2D (both V halves), then ``o_proj`` of
        out = (1 - lambda_init) RMSNorm(O1 - lambda_full O2),  lambda_full = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init
    With ``lambda_full = (K - 1/2)/(K + 1/2)``, o_proj, RoPE and (unless keep_norm) the per-head RMSNorm made
    identities, DiffLlama = (1 - lambda_init)/(K + 1/2) x OpAmp, OpAmp run once per V half (it is linear in V).
    The last batch item is right-padded (3 keys) to exercise the mask."""
    from transformers import DiffLlamaConfig
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention

    if not (isinstance(K, (int, float)) and math.isfinite(K) and K > 0):
        raise ValueError(f"K (the CMRR) must be a finite number > 0, got {K!r}")
    B, T, H, Hkv, D, dt = batch, seq, heads, kv_heads, head_dim, torch.float64
    cfg = DiffLlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
                          intermediate_size=32, num_hidden_layers=1, vocab_size=16, attn_implementation="eager")
    torch.manual_seed(seed)
    attn = DiffLlamaAttention(cfg, layer_idx=1).to(dt).eval()

    excess = (K - 0.5) / (K + 0.5) - attn.lambda_init  # = exp(lq1.lk1) - exp(lq2.lk2)
    with torch.no_grad():  # exp(D * x * 1) = 1 + |excess| on one side, exp(0) = 1 on the other
        up, down = (attn.lambda_q1, attn.lambda_q2) if excess >= 0 else (attn.lambda_q2, attn.lambda_q1)
        up.fill_(math.log1p(abs(excess)) / D)
        down.zero_()
        attn.lambda_k1.fill_(1.0)
        attn.lambda_k2.fill_(1.0)
    if not keep_norm:
        attn.groupnorm = torch.nn.Identity()  # the per-head norm that OpAmp does not have
    attn.o_proj = torch.nn.Identity()

    hidden = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(seed + 1), dtype=dt)
    cos, sin = torch.ones(B, T, D, dtype=dt), torch.zeros(B, T, D, dtype=dt)  # RoPE = identity
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[-1, -3:] = False  # right padding on the last item
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & kpm[:, None, None, :]
    additive = torch.zeros(B, 1, T, T, dtype=dt).masked_fill(~allowed, torch.finfo(dt).min)
    with torch.no_grad():
        theirs, _ = attn(hidden, (cos, sin), attention_mask=additive)  # (B, T, H * D)
        q = attn.q_proj(hidden).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(hidden).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(hidden).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        h, hk = H // 2, Hkv // 2
        halves = [opamp_attention(q[:, :h], k[:, :hk], q[:, h:], k[:, hk:], vv, K=K, key_padding_mask=kpm)
                  for vv in (v[:, :hk], v[:, hk:])]  # 2 x (B, H/2, T, D)
        ours = torch.cat(halves, dim=-1).transpose(1, 2).reshape(B, T, H * D)  # (B, T, H/2 * 2D)
    return theirs, ours * (1 - attn.lambda_init) / (K + 0.5)
