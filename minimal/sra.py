"""Scaled ReAttention (SRA): drop the tiny attention probabilities, hand their mass, amplified, to a window of
context tokens. At prefill, with no training. Paper: Gao et al., "Pay Attention to What You Need", arXiv
2307.13365 (v3). We follow the authors' public code, which works on the softmax probabilities ``A[b, h, i, j]``
of every layer but the last, in two passes (``l`` the layer, ``L`` the layers, ``n`` the real tokens)::

    inner pass (layers 0 .. L-2), skipped when n <= b + t + 3;   c = ceil((n - b - t - 3) / (L + 3))
        rows    [s, e),          s = (l + 3) c + b + 3,   e = min(s + c, n - t),   w = e - s
        window  W = [s - 3w, s - 2w)        threshold theta = f_inner / (s - b)
    outer pass (layers 1 .. L-2), skipped when n <= t + 3;   c = ceil((n - t - 3) / (L + 3))
        rows    [n - t, n)   (the last t tokens: the question)
        window  W = [(l + 2) c + 3, (l + 3) c + 3) clipped to [0, n - t)    threshold theta = f_outer / (n - t)
    in each pass, for every (head, row i) with some A[i, j] > theta for j in W ("valid"):
        A[i, j] = 0                    wherever A[i, j] < theta            (drop the small ones)
        r = 1 - sum_j A[i, j]          the mass just removed
        m_j = 100 if A[i, j] >= theta else 5,  for j in W
        A[i, j] += r * g * m_j / sum(m),  for j in W                       (hand it to W, times g)

Rows are NOT renormalised: a valid row sums to ``1 + (g - 1) r`` (the "scaled" part). Inner rows end at ``n - t``
where outer rows start: the passes never share a row. Unlike the authors' code (batch 1, eager, in place, outer
pass reading item 0 for every item), each item of a left-padded batch gets windows from its own length.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import hooks, sra_linear
from .attention import check_opamp_inputs, grouped_apply, softmax_probs
from .data import build_prompt
from .profiles import triton_available

BACKENDS = ("eager", "blocked", "triton")


@dataclass(frozen=True)
class SRAConfig:
    """SRA's five numbers (authors' defaults, which skip prompts under 304 tokens: see ``config_for_prompts``):
    begin b (instruction, untouched), tail t (question), f_inner, f_outer in (0, 1], gain g > 0 (> 1 amplifies)."""

    begin: int = 100
    tail: int = 200
    f_inner: float = 0.5
    f_outer: float = 0.3
    gain: float = 4.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if name in ("begin", "tail") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer (a number of tokens), got {value!r}")
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if name in ("f_inner", "f_outer") and not (number and 0 < value <= 1):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
            if name == "gain" and not (number and value > 0):
                raise ValueError(f"gain (g) must be a finite number > 0, got {value!r}")

    @property
    def min_tokens(self) -> tuple[int, int]:
        """Shortest sequences the (inner, outer) passes apply to: n > b + t + 3, n > t + 3."""
        return self.begin + self.tail + 4, self.tail + 4


def _config(config) -> SRAConfig:
    if config is not None and not isinstance(config, SRAConfig):
        raise ValueError(f"config must be an SRAConfig, got {type(config).__name__}")
    return config or SRAConfig()


class Pass(NamedTuple):
    """One pass on one sequence. Positions are counted within the n real tokens."""

    name: str  # "inner" or "outer"
    rows: tuple[int, int]  # [start, end) query rows it re-weights
    window: tuple[int, int]  # [start, end) keys W that receive the removed mass
    theta: float  # the threshold


def inner_pass(n: int, layer_idx: int, num_layers: int, config: SRAConfig) -> Pass | None:
    """The inner pass of layer ``layer_idx`` on a sequence of ``n`` tokens, or None."""
    L, b, t = num_layers, config.begin, config.tail
    if not 0 <= layer_idx <= L - 2 or n <= b + t + 3:
        return None
    c = -(-(n - b - t - 3) // (L + 3))  # ceil: the rows between b and n - t, spread over layers
    s = (layer_idx + 3) * c + b + 3
    w = min(s + c, n - t) - s  # w <= 0: this layer's chunk starts past n - t
    return Pass("inner", (s, s + w), (s - 3 * w, s - 2 * w), config.f_inner / (s - b)) if w > 0 else None


def outer_pass(n: int, layer_idx: int, num_layers: int, config: SRAConfig) -> Pass | None:
    """The outer pass of layer ``layer_idx`` on a sequence of ``n`` tokens, or None."""
    L, t = num_layers, config.tail
    if not 1 <= layer_idx <= L - 2 or n <= t + 3 or t == 0:
        return None
    c = -(-(n - t - 3) // (L + 3))  # ceil: the context before the tail, spread over layers
    start = (layer_idx + 2) * c + 3
    end = min(start + c, n - t)  # start >= end: the window lies past the context
    return Pass("outer", (n - t, n), (start, end), config.f_outer / (n - t)) if start < end else None


def passes(n: int, layer_idx: int, num_layers: int, config: SRAConfig) -> list[Pass]:
    """The passes that act on a sequence of ``n`` real tokens in this layer, inner first."""
    return [p for f in (inner_pass, outer_pass) if (p := f(n, layer_idx, num_layers, config)) is not None]


def row_plan(layer_idx, num_layers, config, lengths, T, device=None):
    """One layer's plan per (batch item, query position), ``(theta, lo, hi)``, each (B, T): the threshold (float64)
    and the window [lo, hi) in padded positions (untouched rows: lo = hi = 0, theta 0). Item b holds its n_b =
    ``lengths[b]`` tokens at ``T - n_b .. T - 1``; its passes come from n_b (not item 0's: the authors' bug)."""
    theta, lo, hi = torch.zeros(3, len(lengths), T, dtype=torch.float64)  # lo, hi: whole numbers, exact
    for b, n in enumerate(lengths):
        for p in passes(n, layer_idx, num_layers, config):
            rows = slice(T - n + p.rows[0], T - n + p.rows[1])
            theta[b, rows], lo[b, rows], hi[b, rows] = p.theta, T - n + p.window[0], T - n + p.window[1]
    return theta.to(device), lo.long().to(device), hi.long().to(device)


def reattend(A, layer_idx, num_layers, config=None, lengths=None, rows=None):
    """SRA on causal prefill probabilities: ``A (B, H, R, T) -> A' (B, H, R, T)``, a new tensor.

    lengths: real tokens per item, left padding (default none); rows: the query positions of A's R rows (default
    all T); invalid rows come back unchanged. (The authors' inner pass zeroes keys ``< e`` only: causally the same.)"""
    (B, _, _, T), config = A.shape, config or SRAConfig()
    theta, lo, hi = row_plan(layer_idx, num_layers, config, [T] * B if lengths is None else lengths, T, A.device)
    rows = torch.arange(T, device=A.device) if rows is None else rows
    theta = theta[:, rows][:, None, :, None].to(A.dtype)  # (B, 1, R, 1)
    j = torch.arange(T, device=A.device)  # key positions
    in_w = ((j >= lo[:, rows, None]) & (j < hi[:, rows, None]))[:, None]  # (B, 1, R, T): W
    valid = ((A > theta) & in_w).any(-1, keepdim=True)  # (B, H, R, 1): some A > theta in W
    kept = A.masked_fill(A < theta, 0.0)  # drop the small probabilities
    removed = 1 - kept.sum(-1, keepdim=True)  # r, (B, H, R, 1)
    m = torch.where(A >= theta, 100.0, 5.0).to(A.dtype) * in_w  # (B, H, R, T), zero outside W
    return torch.where(valid, kept + removed * config.gain * m / m.sum(-1, keepdim=True).clamp_min(1.0), A)


def sra_attention_eager(q, k, v, layer_idx, num_layers, config=None, lengths=None, scale=None):
    """The spec: ``reattend(softmax(Q K^T s + causal mask)) V``, with the (T, T) maps in memory.
    q (B, H, T, D); k, v (B, Hkv, T, D) -> (B, H, T, D) in q's dtype; padding rows are 0."""
    T, lengths = q.shape[2], [q.shape[2]] * q.shape[0] if lengths is None else lengths
    probs = softmax_probs(q, k, True, sra_linear.real_tokens(lengths, T, q.device), scale)  # (B, H, T, T)
    return grouped_apply(reattend(probs, layer_idx, num_layers, config, lengths), v).to(q.dtype)


def sra_attention(q, k, v, layer_idx, num_layers, config=None, lengths=None, scale=None, backend="blocked"):
    """SRA attention for one layer's prefill, ``reattend(softmax(Q K^T s)) V``: (B, H, T, D) in q's dtype.
    q (B, H, T, D); k, v (B, Hkv, T, D), Hkv dividing H; lengths: real tokens per item (left padding); scale
    default 1/sqrt(D). backend, the same output up to rounding: "eager" (the spec, (T, T) memory), "blocked"
    (linear memory, PyTorch), "triton" (the kernel: CUDA, or CPU under TRITON_INTERPRET=1)."""
    B, H, Hkv, T, S, D = check_opamp_inputs(q, k, q, k, v)
    if T != S:
        raise ValueError(f"SRA is defined on the prefill (T == S, causal); got T={T} queries and S={S} keys")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    lengths = [T] * B if lengths is None else lengths.tolist() if torch.is_tensor(lengths) else list(lengths)
    if len(lengths) != B or not all(type(n) is int and 0 <= n <= T for n in lengths):
        raise ValueError(f"lengths must be {B} integers in [0, T={T}] (real tokens, left padding), got {lengths}")
    return _sra_attention(q, k, v, layer_idx, num_layers, _config(config), lengths,
                          D**-0.5 if scale is None else float(scale), backend)


def _sra_attention(q, k, v, layer_idx, num_layers, config, lengths, scale, backend):
    """``sra_attention`` on inputs already checked (the calibration calls this once per layer)."""
    if backend == "eager":
        return sra_attention_eager(q, k, v, layer_idx, num_layers, config, lengths, scale)
    rows_fn = sra_linear.blocked_rows
    if backend == "triton":  # imported here: Triton is optional; inputs checked up front, even if no row is touched
        from .triton_common import check_kernel_inputs
        from .triton_sra import sra_rows as rows_fn
        check_kernel_inputs(q, "minimal.triton_sra", 'backend="blocked"')
    plan = row_plan(layer_idx, num_layers, config, lengths, q.shape[2], q.device)
    return sra_linear.sra_output(q, k, v, *plan, lengths, scale, float(config.gain), rows_fn)


class SRA:
    """The calibration ``apply_sra`` attaches to every attention layer (``minimal.hooks``). Prefill only (decoding
    and calls with a cache run plain attention); batches left-padded (lengths from the mask). backend: as in
    ``sra_attention``; None picks "triton" on CUDA tensors, else "blocked"."""

    slot = "calibration"

    def __init__(self, config: SRAConfig | None, num_layers: int, backend: str | None = None):
        self.config = _config(config)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {', '.join(BACKENDS)} (or None for automatic)")
        self.num_layers, self.backend, self._warned = num_layers, backend, set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def lengths(self, module, attention_mask, B: int, T: int) -> list[int]:
        """Real tokens per sequence from the mask (B, 1, T, T); checks left padding and causality."""
        if attention_mask is None:
            if B > 1 and not hooks.mask_given(module):
                self._warn_once("no-mask", f"SRA: batched input (B={B}) without attention_mask: SRA assumes no "
                                f"padding (n = T = {T} for every sequence); pass it for left-padded batches.")
            return [T] * B
        mask = hooks.boolean_mask(attention_mask, T, T, attention_mask.device).expand(B, 1, T, T)
        if T > 1 and mask[:, 0, -2, -1].any():
            raise ValueError("SRA needs a causal model: the attention mask lets a token see a later one")
        real = mask[:, 0, -1, :]  # (B, T): the last row sees every real token
        bad = (real[:, :-1] & ~real[:, 1:]).any(-1).nonzero()  # items with a real token before padding
        if len(bad):
            raise ValueError(f"SRA needs left-padded batches (real tokens last, as build_batch and the "
                             f"tokenizer here do); batch item {bad[0].item()} has padding after its first real token")
        return real.sum(-1).tolist()

    def __call__(self, module, query, key, value, attention_mask, scale):
        """query (B, H, T, D), key, value (B, Hkv, S, D) -> (B, H, T, D), or None for plain attention."""
        B, H, T, D = query.shape
        if T == 1 or T != key.shape[2]:  # decoding, or a prefill continuing a cache
            if T != 1:
                self._warn_once("cache", "SRA: a multi-token call with a cache (T != S): ran plain attention")
            return None
        L, layer, (inner_min, outer_min) = self.num_layers, module.layer_idx, self.config.min_tokens
        lengths = self.lengths(module, attention_mask, B, T)
        for name, need, rule, acts in (("inner", inner_min, "begin + tail + 3", layer <= L - 2),
                                       ("outer", outer_min, "tail + 3", 1 <= layer <= L - 2 and self.config.tail)):
            if acts and min(lengths) < need:
                self._warn_once(name, f"SRA: a sequence of {min(lengths)} real tokens is too short for the {name} pass "
                                f"(needs n > {rule} = {need - 1}), skipped there; short prompts: config_for_prompts.")
        if not any(passes(n, layer, L, self.config) for n in lengths):
            return None
        backend = self.backend or ("triton" if query.is_cuda and triton_available() else "blocked")
        return _sra_attention(query, key, value, layer, L, self.config, lengths, scale, backend)

    def probs(self, module, query, key, attention_mask, scale, rows):
        """The map SRA really uses for the query ``rows`` (default all): (B, H, R, S)."""
        probs = hooks.layer_probs(module, query, key, attention_mask, scale, rows)
        if query.shape[2] == 1 or query.shape[2] != key.shape[2]:  # decoding or a cache: plain
            return probs
        lengths = self.lengths(module, attention_mask, query.shape[0], query.shape[2])
        return reattend(probs, module.layer_idx, self.num_layers, self.config, lengths, rows)


def remove_sra(model) -> None:
    """Detach SRA from every layer (other methods stay; the hook stays installed)."""
    hooks.detach(model, SRA)


def sra(model, config: SRAConfig | None = None, backend: str | None = None) -> hooks.Attached:
    """``with sra(model, SRAConfig(begin=30, tail=20)) as method: model.generate(...)``, or ``.remove()``.
    Raises ValueError for a non-causal model or a layer that already carries another calibration."""
    modules = hooks.attention_modules(model)
    bad = [m.layer_idx for m in modules if not getattr(m, "is_causal", True)]
    if bad:
        raise ValueError(f"SRA needs a causal (decoder) model; layer {bad[0]} of {type(model).__name__} is not causal")
    method = SRA(config, num_layers=len(modules), backend=backend)
    remove_sra(model)
    return hooks.attach(model, method)


def apply_sra(model, config: SRAConfig | None = None, backend: str | None = None) -> SRA:
    """Attach SRA to every attention layer of ``model``, replacing an SRA already there; returns it."""
    return sra(model, config, backend).method


def config_for_prompts(tokenizer, examples, **factors) -> SRAConfig:
    """b = the fewest tokens before the first document (system prompt + instruction), t = the most from
    the question's start to the end, over ``data.build_prompt`` of ``examples``; factors: f_inner, f_outer, gain."""
    if not examples:
        raise ValueError("examples is empty: need prompts to read b and t from")
    prompts = [build_prompt(tokenizer, ex) for ex in examples]
    return SRAConfig(begin=min(p.doc_spans[0][0] for p in prompts),
                     tail=max(len(p.input_ids) - p.question_span[0] for p in prompts), **factors)


def window_table(n: int, num_layers: int, config: SRAConfig | None = None) -> list[dict]:
    """Per layer, the passes on a sequence of n tokens (rows, window, theta), for tables and plots."""
    return [{"layer": layer, **{p.name: {"rows": p.rows, "window": p.window, "theta": p.theta}
                                for p in passes(n, layer, num_layers, _config(config))}} for layer in range(num_layers)]
