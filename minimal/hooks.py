"""One way to put a method on a model and take it off.

The attention function ``"minimal"``, registered with transformers, gets every layer's RoPE-rotated queries
and keys and dispatches on two attributes of the layer: ``calibration`` changes attention (OpAmp, SRA,
``Eliminate``; absent: transformers' SDPA, the stock model bit for bit), ``capture`` reads the map the
layer used. A method has ``slot = "calibration"`` or ``"capture"`` and::

    method(module, query, key, value, attention_mask, scale) -> (B, H, T, D), or None for plain SDPA
    method.probs(module, query, key, attention_mask, scale, rows) -> (B, H, R, S)   optional: its map
    capture.record(module, query, key, attention_mask, scale)
        query (B, H, T, D), key and value (B, Hkv, S, D), attention_mask bool (B, 1, T, S) or None

``attach(model, method)`` returns a handle (``remove()`` it, or use ``with``); an ``nn.Module`` method
becomes a submodule of its layer. ``minimal/eliminate.py`` is the template method.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import grouped_scores, masked_softmax

ATTENTION_NAME = "minimal"
SLOTS = ("calibration", "capture")


def minimal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: the layer's calibration (or SDPA), then its capture."""
    method = getattr(module, "calibration", None)
    if method is not None and dropout:
        raise ValueError(f"{type(method).__name__} runs without attention dropout; the model asks for {dropout}")
    out = None if method is None else method(module, query, key, value, attention_mask, scaling)
    if out is None:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    else:
        out = out.transpose(1, 2).contiguous()  # (B, H, T, D) -> (B, T, H, D), what the layer expects
    if (capture := getattr(module, "capture", None)) is not None:
        capture.record(module, query, key, attention_mask, scaling)
    return out, None


AttentionInterface.register(ATTENTION_NAME, minimal_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    """The model's self-attention modules in layer order (Llama, Qwen2, Mistral: the layer finder)."""
    found = [m for m in model.modules()
             if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx"))]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module the minimal hook understands (Llama-style "
                         "self_attn with q_proj, k_proj, v_proj, o_proj, head_dim, layer_idx: llama, qwen2, mistral)")
    return sorted(found, key=lambda m: m.layer_idx)


def install(model) -> list[torch.nn.Module]:
    """Route the model's attention through :func:`minimal_attention` (idempotent); returns the modules."""
    modules = attention_modules(model)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
    if not hasattr(model, "_minimal_call"):
        state = SimpleNamespace(mask_given=None)  # shared by the layers: did this call pass a mask?

        def note_mask(_model, args, kwargs):
            # generate() drops the mask when nothing is padded; its calls carry a cache: no mask = no padding
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # "cache" from transformers 5.2x
            state.mask_given = mask is not None or cache is not None
        model._minimal_call = (state, model.register_forward_pre_hook(note_mask, with_kwargs=True))
        for m in modules:
            m._minimal_call = state
    return modules


def mask_given(module) -> bool | None:
    """Whether the model call now running passed an attention mask (None: not known)."""
    return getattr(getattr(module, "_minimal_call", None), "mask_given", None)


def uninstall(model) -> None:
    """Back to stock SDPA attention: every method detached, the pre-hook removed."""
    for m in attention_modules(model):
        for name in [n for n in (*SLOTS, "_minimal_call") if hasattr(m, n)]:
            delattr(m, name)
    if (call := vars(model).pop("_minimal_call", None)) is not None:
        call[1].remove()  # the pre-hook
    model.set_attn_implementation("sdpa")


class Attached:
    """What :func:`attach` returns: ``remove()`` it, or use it in a ``with`` block (yields the method)."""

    def __init__(self, model, placed: dict[torch.nn.Module, object], method):
        self.model, self.placed, self.method = model, placed, method

    def remove(self) -> None:
        for m, method in self.placed.items():
            if getattr(m, method.slot, None) is method:
                delattr(m, method.slot)

    def __enter__(self):
        return self.method

    def __exit__(self, *exc):
        self.remove()


def attach(model, method, layers=None) -> Attached:
    """Put ``method`` on the attention layers: all, the indices in ``layers``, or ``{layer: method}``.
    Installs the hook; ValueError for a layer the model lacks or whose slot is taken."""
    modules = install(model)
    per_layer = method if isinstance(method, dict) else dict.fromkeys(check_layers(layers, len(modules)), method)
    placed = {modules[i]: per_layer[i] for i in check_layers(list(per_layer), len(modules))}
    for m, meth in placed.items():
        if (old := getattr(m, meth.slot, None)) is not None:
            raise ValueError(f"layer {m.layer_idx} already carries {type(old).__name__} as its {meth.slot}; remove it")
    for m, meth in placed.items():
        setattr(m, meth.slot, meth)
    return Attached(model, placed, method)


def check_layers(layers, n: int) -> list[int]:
    """``layers`` (None = all ``n``) as sorted distinct indices; ValueError for anything else."""
    if layers is None:
        return list(range(n))
    chosen = sorted(set(layers))
    if not chosen or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n for i in chosen):
        raise ValueError(f"layers must be a non-empty list of layer indices in [0, {n}), got {layers!r}")
    return chosen


def detach(model, kind) -> None:
    """Take every method of class ``kind`` off the model (the hook stays installed)."""
    for m in attention_modules(model):
        for slot in [s for s in SLOTS if isinstance(getattr(m, s, None), kind)]:
            delattr(m, slot)


def attached(model, kind) -> dict[int, object]:
    """``{layer index: method}`` for the layers carrying a method of class ``kind``."""
    return {m.layer_idx: getattr(m, slot) for m in attention_modules(model) for slot in SLOTS
            if isinstance(getattr(m, slot, None), kind)}


def boolean_mask(attention_mask, q_len: int, kv_len: int, device) -> torch.Tensor:
    """The HF mask as bool ``(B|1, 1, T, S)``, True = attend; ``None`` means what it means to transformers'
    SDPA: all keys for one query (decoding), else causal aligned top-left. Float masks (0 = attend) too."""
    if attention_mask is None:  # one query sees every key; else SDPA's is_causal (top-left)
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(0 if q_len > 1 else kv_len)[None, None]
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask[..., -q_len:, :kv_len]


def layer_probs(module, query, key, attention_mask, scale=None, rows=None) -> torch.Tensor:
    """The plain softmax map of query ``rows`` (default all) under the HF mask: (B, H, R, S) fp32, O(R * S) memory."""
    T, S = query.shape[2], key.shape[2]
    rows = torch.arange(T, device=query.device) if rows is None else rows
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    allowed = boolean_mask(attention_mask, T, S, query.device)[..., rows, :]  # (B|1, 1, R, S)
    return masked_softmax(grouped_scores(query[:, :, rows], key, scale), allowed)


class AttentionCapture:
    """Records each layer's attention during its first call (the prefill, not decoding): full=True keeps
    ``maps[layer]`` (B, H, T, S); ``spans`` (per batch item a list of ``(start, end)``) gives ``span_mass[layer]``
    (B, H, n_spans), the mass the query ``rows`` (default the last) put on each span, in O(rows * S) memory."""

    slot = "capture"

    def __init__(self, spans=None, rows=None, full=False, max_full_tokens=2048):
        if spans is None and not full:
            raise ValueError("capture_attention needs spans=[...] (reduced statistics) or full=True (whole maps)")
        self.spans, self.rows, self.full, self.max_full_tokens = spans, rows, full, max_full_tokens
        self.maps, self.span_mass = {}, {}  # {layer: tensor}

    @torch.no_grad()
    def record(self, module, query, key, attention_mask, scale):
        layer, T = module.layer_idx, query.shape[2]
        if layer in self.maps or layer in self.span_mass:
            return
        probs = getattr(getattr(module, "calibration", None), "probs", None) or layer_probs
        if self.full:
            if T > self.max_full_tokens:
                raise ValueError(f"full attention maps for T={T} tokens would take T x T memory; use spans=... "
                                 f"(reduced statistics) or raise max_full_tokens={self.max_full_tokens}")
            self.maps[layer] = probs(module, query, key, attention_mask, scale, None).cpu()
        if self.spans is not None:
            rows = torch.arange(T, device=query.device)[self.rows if self.rows is not None else slice(-1, None)]
            self.span_mass[layer] = span_mass(probs(module, query, key, attention_mask, scale, rows),
                                              self.spans).cpu()

    def stacked_span_mass(self) -> torch.Tensor:
        """``(L, B, H, n_spans)`` over the recorded layers, in layer order."""
        return torch.stack([self.span_mass[k] for k in sorted(self.span_mass)])


def span_mass(probs: torch.Tensor, spans) -> torch.Tensor:
    """Mass on each span, averaged over query rows: probs (B, H, R, S), spans per batch item a list
    of (start, end) -> (B, H, n_spans), NaN where an item has fewer spans than the longest list."""
    out = torch.full((*probs.shape[:2], max(map(len, spans))), float("nan"), device=probs.device)  # (B, H, n)
    for b, item_spans in enumerate(spans):
        for i, (s, e) in enumerate(item_spans):
            out[b, :, i] = probs[b, :, :, s:e].sum(-1).mean(-1)
    return out


def capture_attention(model, *, spans=None, rows=None, full=False, layers=None, max_full_tokens=2048) -> Attached:
    """Record attention in the ``with`` block's forward passes: ``with capture_attention(model, spans=[doc_spans])
    as cap: model(input_ids)``, then ``cap.stacked_span_mass()`` is (L, B, H, n_docs)."""
    return attach(model, AttentionCapture(spans, rows, full, max_full_tokens), layers)
