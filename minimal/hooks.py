"""The one attention function every method plugs into, and attention capture.

transformers lets a project register its own attention function; the model's attention
modules then call it with the projected (and RoPE-rotated) queries and keys::

    fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw)
        query (B, H, T, D), key/value (B, Hkv, S, D)  ->  (out (B, T, H, D), weights or None)

We register one such function, ``"minimal"``, and dispatch per layer:

- ``module.calibration`` (an OpAmp, SRA, ... object, or absent): when absent the layer runs
  plain scaled-dot-product attention, exactly as the stock model does;
- ``module.attention_capture`` (absent unless :func:`capture_attention` is active): records
  the attention probabilities the layer really used, reduced or in full.

A calibration object is a callable with the attention function's signature that returns
``out (B, T, H, D)``. If it changes the attention map it also offers
``probs(module, query, key, attention_mask, scaling, rows) -> (B, H, R, S)`` so capture can
show the map it used. Parameters a method adds live inside ``module.calibration`` (an
``nn.Module``), so ``state_dict``, ``.to(device)`` and PEFT's ``modules_to_save`` see them.

The mask: we register transformers' SDPA mask function under the same name, so
``attention_mask`` is either a boolean ``(B, 1, T, S)`` tensor (True = attend) or ``None``
when SDPA's own ``is_causal`` suffices; :func:`boolean_mask` turns both into a tensor.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "minimal"


# ----------------------------------------------------------------------------- the hook


def minimal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: per-layer dispatch, then optional capture."""
    method = getattr(module, "calibration", None)
    if method is None:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    else:
        out = method(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    capture = getattr(module, "attention_capture", None)
    if capture is not None:
        capture.record(module, query, key, attention_mask, scaling)
    return out, None


AttentionInterface.register(ATTENTION_NAME, minimal_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    """The model's self-attention modules, in layer order.

    We understand the Llama-style module that transformers uses for Llama, Qwen2 and Mistral:
    ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``head_dim`` and ``layer_idx``.
    """
    found = [
        m for m in model.modules()
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx"))
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module the minimal hook understands "
            "(expected Llama-style self_attn with q_proj, k_proj, v_proj, o_proj, head_dim, layer_idx; "
            "supported families: llama, qwen2, mistral)"
        )
    return sorted(found, key=lambda m: m.layer_idx)


def install(model):
    """Route the model's attention through :func:`minimal_attention` (idempotent).

    With no calibration attached, the outputs equal the stock SDPA model's.
    """
    modules = attention_modules(model)  # raises for models we do not understand
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    return modules


def uninstall(model) -> None:
    """Back to stock SDPA attention, detaching every calibration and capture."""
    for m in attention_modules(model):
        for name in ("calibration", "attention_capture"):
            if hasattr(m, name):
                delattr(m, name)
    model.set_attn_implementation("sdpa")


# ----------------------------------------------------------------------------- masks and maps


def boolean_mask(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The mask as a boolean ``(B|1, 1, T, S)`` tensor, True where a query may attend.

    ``None`` means what it means to SDPA in transformers: no mask for a single query
    (decoding), else a causal mask aligned top-left (T == S in ordinary prefill).
    A float mask (0 = attend, very negative = masked) is accepted too.
    """
    if attention_mask is None:
        if q_len == 1:
            return torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=device)
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[..., -q_len:, :kv_len]


def attention_probs(module, query, key, attention_mask, scaling=None, rows=None) -> torch.Tensor:
    """Softmax probabilities of plain attention for the query ``rows`` (default: all).

    ``softmax(Q K^T * s + mask)``: query (B, H, T, D), key (B, Hkv, S, D) -> (B, H, R, S),
    computed in fp32 for the selected rows only, so memory is O(R * S), not O(T * S).
    Rows with no allowed key come out as zeros.
    """
    T, S = query.shape[2], key.shape[2]
    rows = torch.arange(T, device=query.device) if rows is None else rows
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key = repeat_kv(key, query.shape[1] // key.shape[1])  # (B, H, S, D)
    scores = query[:, :, rows].float() @ key.float().transpose(-1, -2) * scaling  # (B, H, R, S)
    allowed = boolean_mask(attention_mask, T, S, query.device)[..., rows, :]  # (B|1, 1, R, S)
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


# ----------------------------------------------------------------------------- capture


class AttentionCapture:
    """Records each layer's attention probabilities during one forward pass (prefill).

    full=True keeps the whole map ``(B, H, T, S)`` per layer (short inputs only).
    spans: per batch item, a list of ``(start, end)`` token spans (e.g. the documents);
    then ``span_mass[layer]`` holds ``(B, H, n_spans)``, the attention mass that the query
    rows put on each span, averaged over those rows. That is O(rows * S) memory, fine for
    long prompts. rows: which query positions to average over; default the last one, the
    position that produces the next token.

    Only the first call per layer is recorded (the prefill), so ``generate()`` may run
    inside the context without recording the decoding steps.
    """

    def __init__(self, spans=None, rows=None, full=False, max_full_tokens=2048):
        self.spans, self.rows, self.full, self.max_full_tokens = spans, rows, full, max_full_tokens
        self.maps: dict[int, torch.Tensor] = {}
        self.span_mass: dict[int, torch.Tensor] = {}

    def _rows(self, T, device):
        if self.rows is None:
            return torch.tensor([T - 1], device=device)
        if isinstance(self.rows, slice):
            return torch.arange(T, device=device)[self.rows]
        return torch.as_tensor(self.rows, device=device)

    @torch.no_grad()
    def record(self, module, query, key, attention_mask, scaling):
        layer = module.layer_idx
        if layer in self.maps or layer in self.span_mass:
            return
        T = query.shape[2]
        method = getattr(module, "calibration", None)
        probs_fn = getattr(method, "probs", None) or attention_probs
        if self.full:
            if T > self.max_full_tokens:
                raise ValueError(
                    f"full attention maps for T={T} tokens would take T x T memory; "
                    f"use spans=... (reduced statistics) or raise max_full_tokens={self.max_full_tokens}"
                )
            self.maps[layer] = probs_fn(module, query, key, attention_mask, scaling, None).cpu()
        if self.spans is not None:
            probs = probs_fn(module, query, key, attention_mask, scaling, self._rows(T, query.device))
            self.span_mass[layer] = span_mass(probs, self.spans).cpu()

    def stacked_span_mass(self) -> torch.Tensor:
        """``(L, B, H, n_spans)`` over the recorded layers, in layer order."""
        return torch.stack([self.span_mass[k] for k in sorted(self.span_mass)])


def span_mass(probs: torch.Tensor, spans) -> torch.Tensor:
    """Attention mass on each span, averaged over query rows.

    probs (B, H, R, S); spans: per batch item a list of (start, end) -> (B, H, n_spans),
    NaN where an item has fewer spans than the longest list.
    """
    B, H = probs.shape[:2]
    n = max(len(s) for s in spans)
    out = torch.full((B, H, n), float("nan"), dtype=torch.float32, device=probs.device)
    for b, item_spans in enumerate(spans):
        for i, (s, e) in enumerate(item_spans):
            out[b, :, i] = probs[b, :, :, s:e].sum(-1).mean(-1)
    return out


@contextmanager
def capture_attention(model, *, spans=None, rows=None, full=False, layers=None, max_full_tokens=2048):
    """Record attention during the forward passes run inside the ``with`` block.

    >>> with capture_attention(model, spans=[doc_spans]) as cap:
    ...     model(input_ids)
    >>> cap.stacked_span_mass()   # (L, B, H, n_docs)

    layers: which layer indices to record (default all).
    """
    if spans is None and not full:
        raise ValueError("capture_attention needs spans=[...] (reduced statistics) or full=True (whole maps)")
    modules = install(model)
    capture = AttentionCapture(spans=spans, rows=rows, full=full, max_full_tokens=max_full_tokens)
    chosen = [m for m in modules if layers is None or m.layer_idx in layers]
    for m in chosen:
        m.attention_capture = capture
    try:
        yield capture
    finally:
        for m in chosen:
            if getattr(m, "attention_capture", None) is capture:
                del m.attention_capture


@contextmanager
def calibrated(model, method):
    """Route every layer's attention through ``method`` inside the ``with`` block.

    >>> with calibrated(model, Eliminate(1e-2)):
    ...     model(input_ids)

    Raises ValueError if a layer already carries another calibration (remove it first).
    """
    modules = install(model)
    for m in modules:
        if getattr(m, "calibration", None) is not None:
            raise ValueError(f"layer {m.layer_idx} already carries a calibration; remove it first")
    for m in modules:
        m.calibration = method
    try:
        yield method
    finally:
        for m in modules:
            if getattr(m, "calibration", None) is method:
                del m.calibration
