"""Scaled ReAttention (SRA): drop the tiny attention probabilities, hand their mass, amplified,
to a window of context tokens. At inference, during prefill, with no training.

Paper: Gao et al., "Pay Attention to What You Need", arXiv 2307.13365 (v3). We follow the
authors' public code, which works on the softmax probabilities ``A[b, h, i, j]`` of every
layer but the last, in two passes per layer (``l`` the layer index, ``L`` the number of
layers, ``n`` the number of real tokens of the sequence, positions counted within them)::

    inner pass (layers 0 .. L-2), skipped when n <= b + t + 3
        c = ceil((n - b - t - 3) / (L + 3))
        rows    [s, e),          s = (l + 3) c + b + 3,   e = min(s + c, n - t),   w = e - s
        window  W = [s - 3w, s - 2w)        threshold theta = f_inner / (s - b)

    outer pass (layers 1 .. L-2), skipped when n <= t + 3
        c = ceil((n - t - 3) / (L + 3))
        rows    [n - t, n)   (the last t tokens: the question)
        window  W = [(l + 2) c + 3, (l + 2) c + 3 + c), clipped to [0, n - t)
        threshold theta = f_outer / (n - t)

    in each pass, for every (head, row i) with some A[i, j] > theta for j in W ("valid"):
        A[i, j] = 0                    wherever A[i, j] < theta            (drop the small ones)
        r = 1 - sum_j A[i, j]          the mass just removed
        m_j = 100 if A[i, j] >= theta else 5,  for j in W
        A[i, j] += r * g * m_j / sum(m),  for j in W                       (hand it to W, times g)

Rows are NOT renormalised: a valid row sums to ``1 + (g - 1) r``; that is the "scaled" part.
Validity uses ``> theta``, the 100/5 weights ``>= theta``. The inner rows end at ``n - t``,
where the outer rows start, so the two passes never touch the same row. The inner pass of
the authors' code only touches keys ``< e``; in a causal map a row ``i < e`` has zero
probability on keys ``>= e`` anyway, so zeroing over the whole row is the same thing.

Defaults (``SRAConfig``): b = 100, t = 200, f_inner = 0.5, f_outer = 0.3, g = 4. With them a
prompt under 304 tokens is left untouched; for short prompts choose b (the instruction
prefix) and t (the question and the generation prompt) from the prompt's structure.

Differences from the authors' code, on purpose: it is batch 1, eager and in place, and its
outer pass reads batch item 0 for every item (a bug batch 1 hides). Here every sequence of a
left-padded batch gets its own windows from its own length, and there are three ways to
compute the same output:

- ``sra_attention_eager``: ``reattend(softmax(Q K^T s)) V``, the (T, T) map in memory (the spec);
- ``sra_attention``: linear memory, pure PyTorch. Every row first gets plain (flash)
  attention; the few rows a pass touches are then recomputed a block of rows at a time:
  pass 1 finds each row's log-sum-exp (its softmax), pass 2 accumulates what the output
  needs (see ``_sra_rows``); memory O(T D) plus one bounded score tile, never (T, T);
- ``minimal.triton_sra.sra_attention``: the same, with key blocks too: two passes over them.

In a model: ``apply_sra(model, config)`` / ``remove_sra(model)``, or ``with sra(model, config):``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import hooks
from .attention import attention_probs, check_opamp_inputs
from .profiles import triton_available

__all__ = [
    "SRAConfig",
    "Pass",
    "inner_pass",
    "outer_pass",
    "passes",
    "row_plan",
    "reattend",
    "sra_attention_eager",
    "sra_attention",
    "SRA",
    "apply_sra",
    "remove_sra",
    "sra",
    "config_for_prompts",
    "window_table",
    "plot_windows",
]

IMPLS = ("eager", "blocked", "triton")


# ----------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SRAConfig:
    """SRA's five numbers, with the authors' defaults.

    begin    b: tokens at the start that the inner pass never re-weights (the instruction)
    tail     t: tokens at the end that the outer pass re-weights (the question)
    f_inner  inner threshold factor, theta = f_inner / (s - b), in (0, 1]
    f_outer  outer threshold factor, theta = f_outer / (n - t), in (0, 1]
    gain     g > 0: the removed mass r is handed back as g * r (g > 1 amplifies)
    """

    begin: int = 100
    tail: int = 200
    f_inner: float = 0.5
    f_outer: float = 0.3
    gain: float = 4.0

    def __post_init__(self):
        for name in ("begin", "tail"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (a number of tokens), got {value!r}")
        for name in ("f_inner", "f_outer"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value <= 1:
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        if not _is_number(self.gain) or not math.isfinite(self.gain) or self.gain <= 0:
            raise ValueError(f"gain (g) must be a finite number > 0, got {self.gain!r}")

    @property
    def min_tokens(self) -> tuple[int, int]:
        """Shortest sequences the (inner, outer) passes apply to: n > b + t + 3, n > t + 3."""
        return self.begin + self.tail + 4, self.tail + 4


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


# ----------------------------------------------------------------------------------------
# Where each pass acts: rows, window, threshold (one sequence of n real tokens)


class Pass(NamedTuple):
    """One pass on one sequence. Positions are counted within the n real tokens."""

    name: str  # "inner" or "outer"
    rows: tuple[int, int]  # [start, end) query rows it re-weights
    window: tuple[int, int]  # [start, end) keys W that receive the removed mass
    theta: float  # the threshold


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def inner_pass(n: int, layer_idx: int, num_layers: int, config: SRAConfig) -> Pass | None:
    """The inner pass of layer ``layer_idx`` on a sequence of ``n`` tokens, or None."""
    L, b, t = num_layers, config.begin, config.tail
    if not 0 <= layer_idx <= L - 2 or n <= b + t + 3:
        return None
    c = _ceil_div(n - b - t - 3, L + 3)  # chunk: the rows between b and n - t, spread over layers
    s = (layer_idx + 3) * c + b + 3
    e = min(s + c, n - t)
    w = e - s
    if w <= 0:  # this layer's chunk starts past n - t
        return None
    return Pass("inner", (s, e), (s - 3 * w, s - 2 * w), config.f_inner / (s - b))


def outer_pass(n: int, layer_idx: int, num_layers: int, config: SRAConfig) -> Pass | None:
    """The outer pass of layer ``layer_idx`` on a sequence of ``n`` tokens, or None."""
    L, t = num_layers, config.tail
    if not 1 <= layer_idx <= L - 2 or n <= t + 3 or t == 0:
        return None
    c = _ceil_div(n - t - 3, L + 3)  # chunk: the context before the tail, spread over layers
    start = (layer_idx + 2) * c + 3
    end = min(start + c, n - t)
    if start >= end:  # the window lies past the context
        return None
    return Pass("outer", (n - t, n), (start, end), config.f_outer / (n - t))


def passes(n: int, layer_idx: int, num_layers: int, config: SRAConfig) -> list[Pass]:
    """The passes that act on a sequence of ``n`` real tokens in this layer, inner first."""
    found = (inner_pass(n, layer_idx, num_layers, config), outer_pass(n, layer_idx, num_layers, config))
    return [p for p in found if p is not None]


class RowPlan(NamedTuple):
    """Per (batch item, query position) of a left-padded (B, T) batch: the pass parameters.

    theta (B, T) threshold; lo, hi (B, T) the window [lo, hi) in padded positions. Rows that
    no pass touches have lo = hi = 0 (an empty window: never valid) and theta = 0.
    """

    theta: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @property
    def touched(self) -> torch.Tensor:
        """(B, T) bool: rows some pass re-weights (if valid)."""
        return self.lo < self.hi


def row_plan(layer_idx, num_layers, config, lengths, T, device=None, dtype=torch.float32) -> RowPlan:
    """The ``RowPlan`` of one layer for a left-padded batch with ``lengths[b]`` real tokens.

    Sequence b occupies positions ``T - n_b .. T - 1``; its passes are computed from n_b
    alone (not from item 0's length, the authors' batch bug) and shifted by its padding.
    """
    B = len(lengths)
    theta = torch.zeros(B, T, dtype=dtype)
    lo = torch.zeros(B, T, dtype=torch.long)
    hi = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        pad = T - n
        for p in passes(n, layer_idx, num_layers, config):
            rows = slice(pad + p.rows[0], pad + p.rows[1])
            theta[b, rows] = p.theta
            lo[b, rows] = pad + p.window[0]
            hi[b, rows] = pad + p.window[1]
    return RowPlan(theta.to(device), lo.to(device), hi.to(device))


def _lengths(lengths, B: int, T: int) -> list[int]:
    """Real-token counts as a list of ints, checked; None means no padding (n = T)."""
    if lengths is None:
        return [T] * B
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    lengths = list(lengths)
    if len(lengths) != B:
        raise ValueError(f"lengths must hold one count per batch item ({B}), got {len(lengths)}")
    for n in lengths:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= T:
            raise ValueError(f"lengths must be integers in [0, T={T}] (real tokens, left padding), got {n!r}")
    return lengths


# ----------------------------------------------------------------------------------------
# The spec: re-weighting a probability map


def reattend(A, layer_idx, num_layers, config, lengths=None, rows=None):
    """SRA on softmax probabilities: ``A (B, H, R, T) -> A' (B, H, R, T)``, a new tensor.

    A        causal prefill probabilities of one layer, left-padded: sequence b holds its
             ``lengths[b]`` real tokens at positions ``T - n_b .. T - 1`` (default: no padding)
    rows     the query positions of A's R rows (default all T: A is (B, H, T, T))

    Exactly the passes in the module docstring. Rows no pass touches, and rows with no
    ``A[i, j] > theta`` in their window, come back unchanged; valid rows sum to ``1 + (g-1) r``.
    """
    B, H, R, T = A.shape
    config = _check_config(config)
    lengths = _lengths(lengths, B, T)
    rows = torch.arange(T, device=A.device) if rows is None else torch.as_tensor(rows, device=A.device)
    if rows.shape != (R,):
        raise ValueError(f"rows must list the query position of each of A's {R} rows, got shape {tuple(rows.shape)}")
    plan = row_plan(layer_idx, num_layers, config, lengths, T, A.device, A.dtype)
    theta = plan.theta[:, rows][:, None, :, None]  # (B, 1, R, 1)
    lo, hi = plan.lo[:, rows, None], plan.hi[:, rows, None]  # (B, R, 1)

    j = torch.arange(T, device=A.device)  # key positions
    in_w = ((j >= lo) & (j < hi))[:, None]  # (B, 1, R, T): the window W of each row
    valid = ((A > theta) & in_w).any(-1, keepdim=True)  # (B, H, R, 1): some A > theta in W

    kept = torch.where(A < theta, torch.zeros_like(A), A)  # drop the small probabilities
    removed = 1 - kept.sum(-1, keepdim=True)  # r, (B, H, R, 1)
    m = torch.where(A >= theta, 100.0, 5.0).to(A.dtype) * in_w  # (B, H, R, T), zero outside W
    scaled = kept + removed * config.gain * m / m.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.where(valid, scaled, A)


def _check_config(config) -> SRAConfig:
    if config is None:
        return SRAConfig()
    if not isinstance(config, SRAConfig):
        raise ValueError(f"config must be an SRAConfig, got {type(config).__name__}")
    return config


# ----------------------------------------------------------------------------------------
# Attention with SRA: the eager spec and the linear-memory form


def _check_inputs(q, k, v, lengths, scale):
    B, H, Hkv, T, S, D = check_opamp_inputs(q, k, q, k, v)
    if T != S:
        raise ValueError(f"SRA is defined on the prefill (T == S, causal); got T={T} queries and S={S} keys")
    lengths = _lengths(lengths, B, T)
    scale = D**-0.5 if scale is None else float(scale)
    return B, H, Hkv, T, D, lengths, scale


def _key_real(lengths, T, device) -> torch.Tensor:
    """(B, T) bool, True on the real tokens of a left-padded batch."""
    n = torch.tensor(lengths, device=device)[:, None]
    return torch.arange(T, device=device)[None, :] >= T - n


def sra_attention_eager(q, k, v, layer_idx, num_layers, config=None, lengths=None, scale=None):
    """The spec: ``reattend(softmax(Q K^T s + causal mask)) V``, with the (T, T) maps in memory.

    q (B, H, T, D); k, v (B, Hkv, T, D) (GQA: Hkv divides H); lengths: real tokens per
    sequence (left padding; default none). Returns (B, H, T, D) in q's dtype; padding rows are 0.
    """
    B, H, Hkv, T, D, lengths, scale = _check_inputs(q, k, v, lengths, scale)
    probs = attention_probs(q, k, causal=True, key_padding_mask=_key_real(lengths, T, q.device), scale=scale)
    probs = reattend(probs, layer_idx, num_layers, config, lengths)  # (B, H, T, T)
    v = v.repeat_interleave(H // Hkv, dim=1).to(probs.dtype)  # (B, H, T, D)
    return (probs @ v).to(q.dtype)


def plain_attention(q, k, v, lengths, scale):
    """Causal softmax attention, one sequence at a time on its real tokens (flash attention
    inside, linear memory); padding rows are 0. q (B, H, T, D), k, v (B, Hkv, T, D)."""
    T = q.shape[2]
    if all(n == T for n in lengths):  # no padding: one batched call
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        real = slice(T - n, T)
        out[b : b + 1, :, real] = F.scaled_dot_product_attention(
            q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real],
            is_causal=True, scale=scale, enable_gqa=True,
        )
    return out


def touched_spans(plan: RowPlan) -> list[tuple[int, int]]:
    """Maximal runs [r0, r1) of query positions that some sequence's pass touches."""
    touched = plan.touched.any(0).tolist() + [False]
    spans, start = [], None
    for i, t in enumerate(touched):
        if t and start is None:
            start = i
        elif not t and start is not None:
            spans.append((start, i))
            start = None
    return spans


def sra_output(q, k, v, layer_idx, num_layers, config, lengths, scale, rows_fn):
    """Plain attention for every row, then ``rows_fn`` for the rows SRA touches.

    ``rows_fn(q_rows, k, v, theta, lo, hi, key_real, scale, gain) -> (out, valid)`` computes
    SRA for the last R of S positions (q_rows (B, H, R, D), k and v (B, Hkv, S, D), the plan's
    rows (B, R), key_real (B, S)): out (B, H, R, D) is the re-weighted output, used where
    valid (B, H, R) is True; elsewhere the plain output stays. Shared by the PyTorch and the
    Triton forms.
    """
    config = _check_config(config)
    B, H, Hkv, T, D, lengths, scale = _check_inputs(q, k, v, lengths, scale)
    out = plain_attention(q, k, v, lengths, scale)  # (B, H, T, D)
    plan = row_plan(layer_idx, num_layers, config, lengths, T, q.device)
    key_real = _key_real(lengths, T, q.device)  # (B, T)
    for r0, r1 in touched_spans(plan):
        # the span's rows are the last r1 - r0 of the first r1 positions: keys beyond are causal zeros
        rows_out, valid = rows_fn(
            q[:, :, r0:r1], k[:, :, :r1], v[:, :, :r1],
            plan.theta[:, r0:r1], plan.lo[:, r0:r1], plan.hi[:, r0:r1], key_real[:, :r1],
            scale, float(config.gain),
        )
        out[:, :, r0:r1] = torch.where(valid[..., None], rows_out.to(q.dtype), out[:, :, r0:r1])
    return out


def sra_attention(q, k, v, layer_idx, num_layers, config=None, lengths=None, scale=None, *, tile=2**20):
    """SRA attention in linear memory: equals ``sra_attention_eager`` without any (T, T) tensor.

    q (B, H, T, D); k, v (B, Hkv, T, D); lengths: real tokens per sequence (left padding).
    Returns (B, H, T, D) in q's dtype. Every row first gets plain (flash) attention; the rows a
    pass touches (one chunk of c rows and the t tail rows, per layer) are then recomputed by
    ``_sra_rows``, a block of rows at a time against all keys: a score tile of about ``tile``
    numbers, so memory is O(T D) plus a bounded tile.
    """
    def rows_fn(*args):
        return _sra_rows(*args, tile=tile)

    return sra_output(q, k, v, layer_idx, num_layers, config, lengths, scale, rows_fn)


def _sra_rows(q, k, v, theta, lo, hi, key_real, scale, gain, *, tile=2**20):
    """SRA for R query rows that are the last R of S positions: ``(out (B, H, R, D), valid (B, H, R))``.

    q (B, H, R, D); k, v (B, Hkv, S, D); theta, lo, hi (B, R); key_real (B, S). Per block of
    rows, with s = q k^T * scale (causal and padding masked) against all S keys:

        pass 1   p_ij    = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)   (torch.softmax)
        pass 2   kept_i  = sum_{p_j >= theta} p_j v_j,   r_i = 1 - sum_{p_j >= theta} p_j
                 mv_i    = sum_{j in W} m_j v_j,   M_i = sum_{j in W} m_j   (m_j = 100 or 5)
                 valid_i = any_{j in W} p_j > theta
        output   kept_i + r_i g mv_i / M_i,  where valid_i

    A block holds its rows against all keys, so the log-sum-exp of pass 1 is one softmax
    here; the Triton kernel also splits the keys into blocks and needs pass 1 as a loop of
    its own. The window terms only read the columns [min lo, max hi) the block's rows use.
    """
    B, H, R, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G, offset = H // Hkv, S - R  # G query heads per KV head; row r sits at position offset + r
    acc = torch.promote_types(q.dtype, torch.float32)
    kt = k.to(acc).transpose(-1, -2).contiguous()  # (B, Hkv, D, S), laid out once for the matmuls
    v = v.to(acc)  # (B, Hkv, S, D)
    padded = not bool(key_real.all())
    out = torch.zeros(B, H, R, D, dtype=acc, device=q.device)
    valid = torch.zeros(B, H, R, dtype=torch.bool, device=q.device)
    cols = torch.arange(S, device=q.device)
    step = max(1, tile // (B * H * S))  # rows per block: a tile of about `tile` numbers
    for m0 in range(0, R, step):
        m1 = min(m0 + step, R)
        Mb = m1 - m0
        pos = offset + torch.arange(m0, m1, device=q.device)  # (Mb,) query positions
        # GQA without repeating K and V: the G query heads of one KV head share a matmul
        qb = (q[:, :, m0:m1].to(acc) * scale).reshape(B, Hkv, G * Mb, D)
        s = (qb @ kt).view(B, H, Mb, S)  # (B, H, Mb, S) scores
        masked = (cols[None, :] > pos[:, None])[None]  # (1, Mb, S) causal: keys after the row
        if padded:
            masked = masked | ~key_real[:, None, :]  # (B, Mb, S)
        p = torch.softmax(s.masked_fill_(masked[:, None], -math.inf), -1).nan_to_num_(0.0)  # pass 1

        b_lo, b_hi = lo[:, m0:m1], hi[:, m0:m1]  # (B, Mb)
        used = b_lo < b_hi
        if not used.any():
            continue
        w0, w1 = int(b_lo[used].min()), int(b_hi[used].max())  # the columns any window uses
        wc = torch.arange(w0, w1, device=q.device)
        in_w = ((wc >= b_lo[..., None]) & (wc < b_hi[..., None]))[:, None]  # (B, 1, Mb, w1 - w0)
        th = theta[:, None, m0:m1, None].to(acc)  # (B, 1, Mb, 1)
        pw = p[..., w0:w1]  # (B, H, Mb, w1 - w0), read before p is changed in place
        m = torch.where(pw >= th, 100.0, 5.0).to(acc) * in_w  # the 100/5 weights, 0 outside W
        valid[:, :, m0:m1] = ((pw > th) & in_w).any(-1)
        mv = (m.view(B, Hkv, G * Mb, w1 - w0) @ v[:, :, w0:w1]).view(B, H, Mb, D)

        p_keep = p.masked_fill_(p < th, 0.0)  # pass 2: drop the small probabilities (in place)
        kept = (p_keep.view(B, Hkv, G * Mb, S) @ v).view(B, H, Mb, D)
        removed = 1 - p_keep.sum(-1)  # r, (B, H, Mb)
        out[:, :, m0:m1] = kept + (removed * gain / m.sum(-1).clamp_min(1.0))[..., None] * mv
    return out, valid


# ----------------------------------------------------------------------------------------
# In a model: the calibration object and apply / remove


class SRA:
    """The calibration object ``apply_sra`` attaches to every attention layer.

    Prefill only: a call with one query (decoding) or with a cache (T != S) runs plain SDPA,
    so ``generate()`` re-weights the prompt's attention and decodes as usual.

    Batches must be left-padded (the tokenizer's default here); each sequence's windows come
    from its own real length n, read from the attention mask. transformers drops the mask
    when no sequence is padded, so a missing mask means "no padding": if you call the model on
    a padded batch *without* ``attention_mask``, SRA cannot know, treats every sequence as
    n = T, and warns once (it sees whether the model was called with a mask; ``generate()``
    builds the mask from the pad token itself, so its calls are trusted).

    impl: "eager" (the (T, T) spec), "blocked" (linear-memory PyTorch) or "triton" (the
    kernel; CUDA, or CPU under TRITON_INTERPRET=1); None picks "triton" on CUDA tensors and
    "blocked" otherwise. All three give the same output up to rounding.
    """

    def __init__(self, config: SRAConfig | None = None, num_layers: int | None = None, impl: str | None = None):
        self.config = _check_config(config)
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"impl={impl!r}: choose one of {', '.join(IMPLS)} (or None for automatic)")
        bad_layers = isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1
        if num_layers is not None and bad_layers:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        self.num_layers, self.impl = num_layers, impl
        self.mask_given: bool | None = None  # set by a pre-hook on the model (None: unknown)
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _num_layers(self, module) -> int:
        if self.num_layers is None:
            raise ValueError("SRA needs num_layers (apply_sra sets it from model.config.num_hidden_layers)")
        return self.num_layers

    def lengths(self, attention_mask, B: int, T: int, S: int, device) -> list[int]:
        """Real tokens per sequence from the mask; checks left padding and causality."""
        if attention_mask is None:
            if B > 1 and not self.mask_given:
                self._warn_once(
                    "no-mask",
                    f"SRA: batched input (B={B}) without attention_mask: SRA cannot see padding and "
                    f"assumes none (n = T = {T} real tokens for every sequence). Pass attention_mask "
                    "for left-padded batches.",
                )
            return [T] * B
        mask = hooks.boolean_mask(attention_mask, T, S, device).expand(B, 1, T, S)
        if T > 1 and mask[:, 0, -2, -1].any():
            raise ValueError("SRA needs a causal model: the attention mask lets a token see a later one")
        real = mask[:, 0, -1, :]  # (B, S): the last row sees every real token
        lengths = real.sum(-1).tolist()
        for b, n in enumerate(lengths):
            if not bool(real[b, S - n :].all()):
                raise ValueError(
                    f"SRA needs left-padded batches (real tokens last, as build_batch and the tokenizer "
                    f"here do); batch item {b} has padding after its first real token"
                )
        return lengths

    def _check(self, module, dropout):
        if not getattr(module, "is_causal", True):
            raise ValueError(f"SRA needs a causal (decoder) model; layer {module.layer_idx} is not causal")
        if dropout:
            raise ValueError(f"SRA is an inference-time method: attention dropout must be 0, got {dropout}")

    def _warn_short(self, lengths, layer_idx: int, L: int) -> None:
        inner_min, outer_min = self.config.min_tokens
        c = self.config
        if any(n < inner_min for n in lengths) and layer_idx <= L - 2:
            self._warn_once(
                "short-inner",
                f"SRA: a sequence of {min(lengths)} real tokens is too short for the inner pass "
                f"(needs n > begin + tail + 3 = {inner_min - 1}); it is skipped for such sequences. "
                "For short prompts choose begin and tail from the prompt's structure.",
            )
        if any(n < outer_min for n in lengths) and 1 <= layer_idx <= L - 2 and c.tail > 0:
            self._warn_once(
                "short-outer",
                f"SRA: a sequence of {min(lengths)} real tokens is too short for the outer pass "
                f"(needs n > tail + 3 = {outer_min - 1}); it is skipped for such sequences.",
            )

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        self._check(module, dropout)
        B, H, T, D = query.shape
        S = key.shape[2]
        if T == 1 or T != S:  # decoding, or a prefill continuing a cache: SRA leaves it alone
            if T != 1:
                self._warn_once("cache", "SRA: a multi-token call with a cache (T != S) is not a prefill; "
                                "ran plain attention")
            return self._plain(module, query, key, value, attention_mask, scaling, **kwargs)
        L, layer = self._num_layers(module), module.layer_idx
        lengths = self.lengths(attention_mask, B, T, S, query.device)
        self._warn_short(lengths, layer, L)
        if not any(passes(n, layer, L, self.config) for n in lengths):
            return self._plain(module, query, key, value, attention_mask, scaling, **kwargs)
        impl = self.impl or ("triton" if query.is_cuda and triton_available() else "blocked")
        if impl == "eager":
            fn = sra_attention_eager
        elif impl == "blocked":
            fn = sra_attention
        else:
            from .triton_sra import sra_attention as fn  # imported here: Triton is optional
        out = fn(query, key, value, layer, L, self.config, lengths=lengths, scale=scaling)  # (B, H, T, D)
        return out.transpose(1, 2).contiguous()  # (B, T, H, D)

    @staticmethod
    def _plain(module, query, key, value, attention_mask, scaling, **kwargs):
        out, _ = hooks.sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        return out

    def probs(self, module, query, key, attention_mask, scaling=None, rows=None):
        """The attention map SRA really uses for the query ``rows``: (B, H, R, S)."""
        T, S = query.shape[2], key.shape[2]
        probs = hooks.attention_probs(module, query, key, attention_mask, scaling, rows)
        if T == 1 or T != S:
            return probs
        lengths = self.lengths(attention_mask, query.shape[0], T, S, query.device)
        rows = torch.arange(T, device=query.device) if rows is None else rows
        return reattend(probs, module.layer_idx, self._num_layers(module), self.config, lengths, rows=rows)

    def __repr__(self):
        return f"SRA({self.config}, num_layers={self.num_layers}, impl={self.impl or 'auto'})"


def apply_sra(model, config: SRAConfig | None = None, impl: str | None = None) -> SRA:
    """Attach SRA to every attention layer of ``model`` (through ``minimal.hooks``); returns it.

    Raises ValueError for a non-causal model or a layer that already carries a calibration.
    """
    config = _check_config(config)
    modules = hooks.install(model)
    for m in modules:
        if not getattr(m, "is_causal", True):
            raise ValueError(
                f"SRA needs a causal (decoder) model; layer {m.layer_idx} of {type(model).__name__} is not causal"
            )
        other = getattr(m, "calibration", None)
        if other is not None and not isinstance(other, SRA):
            raise ValueError(
                f"layer {m.layer_idx} already carries a calibration ({type(other).__name__}); remove it first"
            )
    method = SRA(config, num_layers=len(modules), impl=impl)

    def note_mask(_module, args, kwargs):  # does the caller know about padding?
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        # generate() builds the mask from the pad token itself and drops it when nothing is
        # padded; its calls carry a cache, so a missing mask there really means "no padding"
        method.mask_given = mask is not None or kwargs.get("past_key_values") is not None

    remove_sra(model)
    model._sra_pre_hook = model.register_forward_pre_hook(note_mask, with_kwargs=True)
    for m in modules:
        m.calibration = method
    return method


def remove_sra(model) -> None:
    """Detach SRA from every layer (other calibrations stay); the hook stays installed."""
    for m in hooks.attention_modules(model):
        if isinstance(getattr(m, "calibration", None), SRA):
            del m.calibration
    handle = getattr(model, "_sra_pre_hook", None)
    if handle is not None:
        handle.remove()
        del model._sra_pre_hook


@contextmanager
def sra(model, config: SRAConfig | None = None, impl: str | None = None):
    """``with sra(model, SRAConfig(begin=30, tail=20)): model.generate(...)``."""
    method = apply_sra(model, config, impl)
    try:
        yield method
    finally:
        remove_sra(model)


def config_for_prompts(tokenizer, examples, **factors) -> SRAConfig:
    """b and t read off the benchmark prompts' structure (``minimal.data.build_prompt``).

    begin = the fewest tokens before the first document (system prompt + instruction), so the
    inner pass never re-weights into the instruction; tail = the most tokens from the start of
    the question to the end of the prompt (question + generation prompt), so the outer rows are
    the question. ``factors``: f_inner, f_outer, gain (defaults: the authors').
    """
    from .data import build_prompt

    if not examples:
        raise ValueError("examples is empty: need prompts to read b and t from")
    prompts = [build_prompt(tokenizer, ex) for ex in examples]
    begin = min(p.doc_spans[0][0] for p in prompts)
    tail = max(len(p.input_ids) - p.question_span[0] for p in prompts)
    return SRAConfig(begin=begin, tail=tail, **factors)


# ----------------------------------------------------------------------------------------
# Pictures


def window_table(n: int, num_layers: int, config: SRAConfig | None = None) -> list[dict]:
    """Per layer, the passes on a sequence of n tokens (rows, window, theta), for tables and plots."""
    config = _check_config(config)
    table = []
    for layer in range(num_layers):
        row = {"layer": layer}
        for p in passes(n, layer, num_layers, config):
            row[p.name] = {"rows": p.rows, "window": p.window, "theta": p.theta}
        table.append(row)
    return table


def plot_windows(n: int, num_layers: int, config: SRAConfig | None = None, ax=None, title: str = "",
                 spans=None, gold=()):
    """Which keys each layer hands the removed mass to (bars), and from which rows (thin lines).

    spans: optional token spans (e.g. a prompt's documents) shaded in the background; the
    indices in ``gold`` shaded green.
    """
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    config = _check_config(config)
    for i, (s0, s1) in enumerate(spans or []):
        ax.axvspan(s0, s1, color="tab:green" if i in gold else "0.85", alpha=0.35 if i in gold else 0.5, lw=0)
    labelled = set()
    for row in window_table(n, num_layers, config):
        y = row["layer"]
        for name, color, dy in (("inner", "tab:blue", -0.18), ("outer", "tab:orange", 0.18)):
            if name in row:
                (w0, w1), (r0, r1) = row[name]["window"], row[name]["rows"]
                label = None if name in labelled else f"{name} pass: window W (bar), rows (line)"
                labelled.add(name)
                ax.barh(y + dy, w1 - w0, left=w0, height=0.32, color=color, label=label)
                ax.plot([r0, r1], [y + dy, y + dy], color=color, lw=0.8, alpha=0.6)
    ax.axvline(config.begin, color="gray", ls=":", lw=1)
    ax.axvline(n - config.tail, color="gray", ls="--", lw=1)
    ax.set_xlim(0, n)
    ax.set_xlabel(f"token position (n = {n}; dotted: b = {config.begin}, dashed: n - t = {n - config.tail})")
    ax.set_ylabel("layer")
    ax.set_title(title or "SRA windows per layer (bars: W; thin lines: the rows re-weighted)")
    if labelled:
        ax.legend(fontsize=8, loc="lower right")
    return ax
