"""OpAmp adaptation (arXiv 2502.12502): adapters that turn each attention layer into an amplifier.

A chosen layer adapts its queries and keys, then runs OpAmp attention (``minimal.attention``; kernel
``minimal.triton_opamp``)::

    q1 = Eq1(q),  q2 = Eq2(q)          q (B, T, H*D): the query heads, concatenated, after RoPE
    k1 = Ek1(k),  k2 = Ek2(k)          k (B, S, Hkv*D): the KV heads, before GQA repetition
    M+ = softmax(q1 k1^T s + mask),  M- = softmax(q2 k2^T s + mask)          (B, H, T, S)
    M  = K (M+ - M-) + (M+ + M-)/2,  out = M V                               V untouched

Each adapter is a residual bottleneck ``E(x) = x + W_up(GELU(W_down(dropout(x))))``, ``W_up`` zero at init: right
after :func:`add_opamp` the model computes exactly what it did before. Placed as in the authors' code (after RoPE,
on all heads concatenated; the paper's equations read as if before RoPE), so the result depends on absolute
positions: left-padded batches need ``position_ids = cumsum(mask) - 1``, as ``generate()`` builds them.

>>> add_opamp(model, K=10)                        # {layer: OpAmpCalibration}, identity at init
>>> save_opamp(model, "results/opamp")           # adapters.safetensors + opamp_config.json
>>> load_opamp(other_model, "results/opamp")     # checks the model matches, then loads
>>> remove_opamp(model)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import hooks
from .attention import opamp_combine
from .models import check_same_model, model_name
from .profiles import triton_available

__all__ = ["Adapter", "OpAmpCalibration", "add_opamp", "remove_opamp", "opamp_layers", "opamp_parameters",
           "save_opamp", "load_opamp", "mask_to_causal_padding"]

CONFIG_FILE, WEIGHTS_FILE = "opamp_config.json", "adapters.safetensors"
BACKENDS = ("auto", "triton", "reference")


class Adapter(nn.Module):
    """``E(x) = x + W_up(GELU(W_down(dropout(x))))``: (..., dim) -> (..., dim), the identity at init.
    No biases; the weights keep their own dtype (fp32): a bf16 model can carry fp32 adapters."""

    def __init__(self, dim: int, hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.w_down = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(hidden, dim, bias=False)
        nn.init.kaiming_uniform_(self.w_down.weight, a=math.sqrt(5))  # drawn after w_up: seeds give the shipped weights
        nn.init.zeros_(self.w_up.weight)

    def forward(self, x):
        return x + self.w_up(F.gelu(self.w_down(self.dropout(x.to(self.w_down.weight.dtype))))).to(x.dtype)


def mask_to_causal_padding(allowed: torch.Tensor, T: int, S: int):
    """A bool HF mask (B|1, 1, T, S) as ``causal & key_padding_mask`` (B|1, S), the only mask the kernel
    takes; None when a real query's row differs (sliding window, packing). Padding queries' rows are ignored."""
    keep = allowed[:, 0].any(dim=1)  # (B|1, S): a key someone may see is a real token
    expected = allowed.new_ones(T, S).tril(S - T) & keep[:, None, :]  # (B|1, T, S) bottom-right causal
    real_query = keep[:, S - T:, None]  # (B|1, T, 1): the queries are the last T positions
    return keep if bool(((expected == allowed[:, 0]) | ~real_query).all()) else None


class OpAmpCalibration(nn.Module):
    """OpAmp for one attention layer (a hooks calibration), in the model's ``state_dict`` as ``...self_attn.
    calibration.{q1,q2,k1,k2}.w_{down,up}.weight``: q1, q2 Adapter(H * D) on all query heads, k1, k2 Adapter(Hkv * D)
    on the KV heads; K the CMRR; backend "auto" (Triton on CUDA, else PyTorch), "triton", "reference" (PyTorch)."""

    slot = "calibration"

    def __init__(self, num_heads, num_kv_heads, head_dim, K=10.0, adapter_dim=64, dropout=0.1, backend="auto"):
        super().__init__()
        self.K, self.backend = float(K), backend
        self.q1, self.q2 = (Adapter(num_heads * head_dim, adapter_dim, dropout) for _ in range(2))  # seeds: this order
        self.k1, self.k2 = (Adapter(num_kv_heads * head_dim, adapter_dim, dropout) for _ in range(2))

    def extra_repr(self):
        return f"K={self.K}, backend={self.backend}"

    @staticmethod
    def _heads(x, adapter):  # (B, H, T, D) -> (B, T, H*D) -> adapter -> (B, H, T, D)
        B, H, T, D = x.shape
        return adapter(x.transpose(1, 2).reshape(B, T, H * D)).reshape(B, T, H, D).transpose(1, 2)

    def adapt(self, query, key):
        """(q1, k1, q2, k2) from query (B, H, T, D) and key (B, Hkv, S, D)."""
        k1, k2 = self.adapt_keys(key)
        return self._heads(query, self.q1), k1, self._heads(query, self.q2), k2

    def adapt_keys(self, key):
        """(k1, k2) from key (B, Hkv, S, D). Adapters act per position, so in inference (eval, no grad),
        when the first keys equal the last call's (a KV cache), only the new positions are adapted."""
        raw, k1, k2 = getattr(self, "_seen", None) or (None, None, None)  # the last call's key, k1, k2
        inference = not self.training and not torch.is_grad_enabled()
        n = 0 if raw is None else raw.shape[2]
        if inference and n and key.shape[:2] == raw.shape[:2] and key.shape[2] > n and torch.equal(key[:, :, :n], raw):
            new = key[:, :, n:]  # (B, Hkv, S - n, D)
            k1, k2 = torch.cat([k1, self._heads(new, self.k1)], 2), torch.cat([k2, self._heads(new, self.k2)], 2)
        else:
            k1, k2 = self._heads(key, self.k1), self._heads(key, self.k2)
        self._seen = (key, k1, k2) if inference else None  # a reference, not a copy
        return k1, k2

    def forward(self, module, query, key, value, attention_mask, scale):
        """OpAmp attention: query (B, H, T, D), key/value (B, Hkv, S, D) -> (B, H, T, D)."""
        T, S = query.shape[2], key.shape[2]
        q1, k1, q2, k2 = self.adapt(query, key)
        use_triton = self.backend == "triton" or (self.backend == "auto" and query.is_cuda and triton_available())
        plain = attention_mask is None and (T == S or T == 1)  # causal prefill, or one decoding query
        allowed = None if plain else hooks.boolean_mask(attention_mask, T, S, query.device)  # (B|1, 1, T, S)
        padding = mask_to_causal_padding(allowed, T, S) if use_triton and not plain else None
        if use_triton and (allowed is None or padding is not None):
            from . import triton_opamp  # imported on first use: CPU runs never need Triton
            q1, k1, q2, k2 = (t.to(value.dtype) for t in (q1, k1, q2, k2))
            padding = None if padding is None else padding.expand(query.shape[0], S).contiguous()
            return triton_opamp.opamp_attention(q1, k1, q2, k2, value, self.K, key_padding_mask=padding, scale=scale)
        kw = dict(attn_mask=allowed, is_causal=allowed is None and T > 1, scale=scale, enable_gqa=True)
        with torch.autocast(query.device.type, enabled=False):  # any mask: PyTorch's fused attention, in fp32
            out_plus = F.scaled_dot_product_attention(q1.float(), k1.float(), value.float(), **kw)  # M+ V
            out_minus = F.scaled_dot_product_attention(q2.float(), k2.float(), value.float(), **kw)  # M- V
        # (K + 1/2) M+V - (K - 1/2) M-V, written so that equal maps give M+V exactly (no amplified rounding)
        return (out_plus + (self.K - 0.5) * (out_plus - out_minus)).to(value.dtype)  # (B, H, T, D)

    @torch.no_grad()
    def probs(self, module, query, key, attention_mask, scale, rows=None):
        """The map ``K (M+ - M-) + (M+ + M-)/2`` for query ``rows``: (B, H, R, S) fp32 (entries may be < 0)."""
        q1, k1, q2, k2 = self.adapt(query, key)
        m_plus = hooks.layer_probs(module, q1, k1, attention_mask, scale, rows)  # (B, H, R, S)
        m_minus = hooks.layer_probs(module, q2, k2, attention_mask, scale, rows)
        return opamp_combine(m_plus, m_minus, self.K)


def _geometry(model) -> dict:
    """The attention geometry that adapters depend on (saved with them, checked on load)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError(f"{type(model).__name__} has no config with num_attention_heads: OpAmp needs a "
                         "Hugging Face causal LM of the llama, qwen2 or mistral family")
    H = config.num_attention_heads
    return dict(model_type=getattr(config, "model_type", None), num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=H, num_key_value_heads=getattr(config, "num_key_value_heads", None) or H,
                head_dim=getattr(config, "head_dim", None) or config.hidden_size // H)


def opamp_layers(model) -> dict[int, OpAmpCalibration]:
    """``{layer index: OpAmpCalibration}`` for the layers that carry OpAmp."""
    return hooks.attached(model, OpAmpCalibration)


def opamp_parameters(model) -> list[nn.Parameter]:
    """The adapters' parameters (to train, or to count)."""
    return [p for cal in opamp_layers(model).values() for p in cal.parameters()]


def add_opamp(model, K=10.0, adapter_dim: int = 64, stride: int = 1, layers=None, dropout: float = 0.1,
              backend: str = "auto") -> dict[int, OpAmpCalibration]:
    """Attach OpAmp to every ``stride``-th layer (0, stride, 2*stride, ...) or to ``layers``: ``{layer: calibration}``.
    K: the CMRR (> 0). stride: the authors use 2 for Llama, 3 for Qwen, 1 in their evaluation. Adapters are fp32
    on each layer's device, added after any quantisation, so never quantised."""
    if isinstance(K, bool) or not isinstance(K, (int, float)) or not math.isfinite(K) or K <= 0:
        raise ValueError(f"K (the CMRR) must be a finite number > 0, got {K!r}")
    for name, value in (("adapter_dim", adapter_dim), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if layers is not None and stride != 1:
        raise ValueError("give layers=[...] or stride, not both")
    g = _geometry(model)
    modules = hooks.install(model)  # raises ValueError for attention modules it does not understand
    if opamp_layers(model):
        raise ValueError("the model already carries OpAmp adapters: call remove_opamp(model) first")
    chosen = range(0, len(modules), stride) if layers is None else hooks.check_layers(layers, len(modules))
    cals = {i: OpAmpCalibration(g["num_attention_heads"], g["num_key_value_heads"], g["head_dim"], K, adapter_dim,
                                dropout, backend).to(modules[i].q_proj.weight.device).train(modules[i].training)
            for i in chosen}  # on the layer's device; an eval model -> no dropout
    hooks.attach(model, cals)
    model._opamp_config = dict(K=float(K), adapter_dim=adapter_dim, stride=stride, layers=sorted(cals), dropout=dropout)
    return cals


def remove_opamp(model) -> None:
    """Detach every OpAmp adapter; the layers go back to plain attention."""
    hooks.detach(model, OpAmpCalibration)
    vars(model).pop("_opamp_config", None)


def save_opamp(model, directory) -> Path:
    """Write ``adapters.safetensors`` (the adapters only) and ``opamp_config.json``."""
    from safetensors.torch import save_file
    layers = opamp_layers(model)
    if not layers:
        raise ValueError("the model carries no OpAmp adapters: call add_opamp(model) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{i}.{name}": t.detach().cpu().contiguous()
               for i, cal in layers.items() for name, t in cal.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    config = dict(getattr(model, "_opamp_config", {}), layers=sorted(layers), model=model_name(model),
                  K=next(iter(layers.values())).K, **_geometry(model))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    return directory


def load_opamp(model, directory) -> dict[int, OpAmpCalibration]:
    """Load adapters saved by :func:`save_opamp` into ``model``, adding OpAmp if it has none. ValueError if the
    geometry, the model's name or an OpAmp already on the model differ from the saved config, or a tensor is
    missing, unexpected or misshapen: never random weights silently."""
    from safetensors.torch import load_file
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
        raise ValueError(f"{directory} has no {CONFIG_FILE} and {WEIGHTS_FILE} (written by save_opamp)")
    saved = json.loads((directory / CONFIG_FILE).read_text())
    for key, value in _geometry(model).items():
        if saved.get(key) != value:
            raise ValueError(f"adapters in {directory} were saved for {key}={saved.get(key)!r}, "
                             f"this model has {key}={value!r}")
    check_same_model(saved.get("model", ""), model, f"OpAmp adapters in {directory}")
    layers = opamp_layers(model) or add_opamp(model, K=saved["K"], adapter_dim=saved["adapter_dim"],
                                              layers=saved["layers"], dropout=saved.get("dropout", 0.1))
    cal = next(iter(layers.values()))
    have = dict(K=cal.K, adapter_dim=cal.q1.w_down.out_features, layers=sorted(layers))
    for key, value in have.items():
        if saved[key] != value:
            raise ValueError(f"the model carries OpAmp with {key}={value!r}, the saved adapters have "
                             f"{key}={saved[key]!r}: call remove_opamp(model) first")
    adapters = nn.ModuleDict({str(i): cal for i, cal in layers.items()})
    weights = {k.removeprefix("layers."): t for k, t in load_file(str(directory / WEIGHTS_FILE)).items()}
    try:  # strict: every tensor present, none unexpected, every shape right
        adapters.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"saved adapters in {directory} do not match the model: {err}") from None
    return layers
