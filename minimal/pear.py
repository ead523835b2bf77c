"""PEAR (arXiv 2409.19745): find the heads that suppress copying from the context, scale them down, fold.

1. **Proxy task.** Random token ids repeated, ``x1..xn x1..xn``, no BOS: each second-half token can be copied.
2. **Detection** (``minimal.pear_detect``). Heads whose mean-ablation at the final position *raises*
   ``logit(target) - mean logit`` suppress copying.
3. **Re-weighting.** Scale the top-k heads' outputs by learned ``tau_h`` (init 1), model frozen, cross-entropy
   on fresh copy sequences; then ``fold`` the scalars into ``o_proj``: a plain model.

A head's output is a slice of ``o_proj``'s input (Llama, Qwen2, Mistral), so PEAR acts there, with forward
pre-hooks on ``o_proj`` (not a ``minimal.hooks`` calibration)::

    o_proj(x) = W_O x = sum_h W_O[:, hD:(h+1)D] x_h          W_O (d_model, H*D), x_h (D,)

>>> result = head_scores(model, proxy_dataset(tokenizer, seed=0))   # .scores (layers, heads)
>>> heads = top_heads(result, k=10)                                 # [(layer, head), ...]
>>> scales, history = train_coefficients(model, heads, sequences=512)
>>> fold(model, scales.coefficients())                               # plain model again

Tags: [paper] stated in the paper, [code] the authors' public code, [choice] this project's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hooks import attention_modules
from .models import check_same_model, model_name
from .pear_detect import VARIANTS, HeadScores, check_coefficients, geometry, head_scores, top_heads

__all__ = ["SETTINGS", "VARIANTS", "copy_sequences", "proxy_dataset", "head_scores", "top_heads", "HeadScales",
           "apply", "copy_loss", "copy_metrics", "train_coefficients", "fold", "save_coefficients",
           "load_coefficients", "plot_head_scores", "plot_coefficients"]

SETTINGS = ((50, 20), (25, 40), (15, 80), (10, 100))  # [paper] (n, samples): copy length, sequences of length 2n
TOKEN_RANGE = (1000, 10000)  # [choice] ids of ordinary, frequent sub-words in SmolLM2's BPE (no special, no byte)
SHAPE = ("num_layers", "num_heads", "head_dim")  # saved with the coefficients: geometry(model)


def copy_sequences(n: int, samples: int, *, token_range=TOKEN_RANGE, exclude=(), generator=None) -> torch.Tensor:
    """``samples`` sequences ``x1..xn x1..xn`` -> LongTensor ``(samples, 2n)``, no BOS. The ``n`` ids of one
    sequence are distinct [choice] (every copied token has one source), uniform in ``token_range`` ``[low,
    high)`` minus ``exclude`` (e.g. the tokenizer's special ids)."""
    if n < 2 or samples < 1:
        raise ValueError(f"need n >= 2 and samples >= 1, got n={n}, samples={samples}")
    candidates = torch.arange(*token_range)
    candidates = candidates[~torch.isin(candidates, torch.tensor(list(exclude), dtype=torch.long))]
    if len(candidates) < n:
        raise ValueError(f"token_range={token_range} holds {len(candidates)} usable ids, fewer than n={n}")
    first = candidates[torch.rand(samples, len(candidates), generator=generator).argsort(dim=1)[:, :n]]  # (samples, n)
    return torch.cat([first, first], dim=1)  # (samples, 2n)


def proxy_dataset(tokenizer=None, settings=SETTINGS, *, seed: int = 0, token_range=TOKEN_RANGE) -> list[torch.Tensor]:
    """One ``(samples, 2n)`` batch of copy sequences per ``(n, samples)`` setting, seeded; ``tokenizer``
    (optional) only supplies the special ids to leave out."""
    exclude = tokenizer.all_special_ids if tokenizer is not None else ()
    generator = torch.Generator().manual_seed(seed)
    return [copy_sequences(n, s, token_range=token_range, exclude=exclude, generator=generator) for n, s in settings]


class HeadScales(nn.Module):
    """Learnable ``tau_h`` (init 1) for chosen heads, applied to ``o_proj``'s input::

        o_proj(x) = sum_h W_O[:, hD:(h+1)D] (tau_h x_h)       tau_h = 1 for heads not chosen

    ``attach(model)`` adds a forward pre-hook per involved layer and returns self (a context manager)."""

    def __init__(self, heads, num_heads: int, head_dim: int, init=1.0):
        super().__init__()
        self.heads, self.num_heads, self.head_dim, self._handles = [tuple(h) for h in heads], num_heads, head_dim, []
        self.tau = nn.Parameter(torch.as_tensor(init, dtype=torch.float32).expand(len(self.heads)).clone())  # (k,)

    def layer_scale(self, layer: int) -> torch.Tensor:
        """``(H,)``: tau for the chosen heads of ``layer``, 1 elsewhere (differentiable)."""
        index = [i for i, (l, _) in enumerate(self.heads) if l == layer]
        heads = torch.tensor([self.heads[i][1] for i in index], device=self.tau.device)
        return torch.ones(self.num_heads, device=self.tau.device).scatter(0, heads, self.tau[index])

    def attach(self, model) -> "HeadScales":
        check_coefficients(model, self.heads)
        self.detach()
        self.to(next(model.parameters()).device)
        attn = attention_modules(model)
        for layer in sorted({l for l, _ in self.heads}):
            def pre(module, args, layer=layer):
                x = args[0]  # (B, T, H*D)
                y = x.view(*x.shape[:-1], self.num_heads, self.head_dim) * self.layer_scale(layer).to(x.dtype)[:, None]
                return (y.reshape(x.shape), *args[1:])
            self._handles.append(attn[layer].o_proj.register_forward_pre_hook(pre))
        return self

    def detach(self) -> None:
        """Remove the hooks (tau stays)."""
        while self._handles:
            self._handles.pop().remove()

    def coefficients(self) -> dict[tuple[int, int], float]:
        """``{(layer, head): tau}``, the current values."""
        return {h: float(t) for h, t in zip(self.heads, self.tau.detach().cpu())}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def apply(model, coefficients) -> HeadScales:
    """Scale the heads by fixed ``{(layer, head): tau}`` with hooks (the un-folded form); returns the
    attached HeadScales (``.detach()`` or a ``with`` block removes it)."""
    coefficients = check_coefficients(model, coefficients)
    scales = HeadScales(list(coefficients), *geometry(model)[1:], init=list(coefficients.values()))
    scales.tau.requires_grad_(False)
    return scales.attach(model)


def _copy_logits(model, ids):
    """Logits at positions ``n..2n-2`` of ``x1..xn x1..xn`` and their targets ``x2..xn``; the copy's first
    token ``x1`` follows ``xn`` and cannot be read from the context: left out [choice]."""
    n = ids.shape[1] // 2
    return model(ids[:, :-1], logits_to_keep=n - 1).logits.float(), ids[:, n + 1 :]  # (B, n-1, V), (B, n-1)


def copy_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the copyable second half of ``ids (B, 2n)``."""
    logits, target = _copy_logits(model, ids)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


@torch.no_grad()
def copy_metrics(model, ids: torch.Tensor, batch_size: int = 16) -> dict:
    """Loss (as :func:`copy_loss`) and greedy top-1 accuracy on the copyable second half."""
    device, losses, hits = next(model.parameters()).device, [], []
    for start in range(0, len(ids), batch_size):
        logits, target = _copy_logits(model, ids[start : start + batch_size].to(device))
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none"))
        hits.append((logits.argmax(-1) == target).flatten())
    return {"loss": torch.cat(losses).mean().item(), "accuracy": torch.cat(hits).float().mean().item()}


@torch.enable_grad()
def train_coefficients(model, heads, *, sequences: int = 512, n: int = 50, batch_size: int = 8,
                       lr: float = 5e-3, seed: int = 1, tokenizer=None, token_range=TOKEN_RANGE,
                       progress: bool = True) -> tuple[HeadScales, dict]:
    """Learn ``tau_h`` for ``heads`` on fresh copy sequences (seeded by ``seed``: not the detection's), the
    model frozen: AdamW, lr 5e-3 [code], ``sequences`` sequences of length ``2n`` (the paper: 50,000 of
    n = 50 [paper]; size it by the profile), loss :func:`copy_loss`. Returns the HeadScales (detached) and
    a history ``{"step", "loss", "tau"}``: the loss and the k coefficients after every step."""
    heads = list(check_coefficients(model, heads))
    if sequences < 1 or batch_size < 1:
        raise ValueError(f"need sequences >= 1 and batch_size >= 1, got {sequences}, {batch_size}")
    device = next(model.parameters()).device
    scales = HeadScales(heads, *geometry(model)[1:]).attach(model)
    was_trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the model stays frozen; only tau learns
    optimizer = torch.optim.AdamW(scales.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    exclude = tokenizer.all_special_ids if tokenizer is not None else ()
    history = {"step": [0], "loss": [float("nan")], "tau": [scales.tau.tolist()]}
    bar = tqdm(range(math.ceil(sequences / batch_size)), desc=f"train tau (k={len(heads)})", disable=not progress)
    try:
        for step in bar:
            size = min(batch_size, sequences - step * batch_size)
            ids = copy_sequences(n, size, token_range=token_range, exclude=exclude, generator=generator).to(device)
            loss = copy_loss(model, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for key, value in zip(history, (step + 1, loss.item(), scales.tau.tolist())):  # step, loss, tau
                history[key].append(value)
            bar.set_postfix(loss=f"{loss.item():.3f}", tau=f"{scales.tau.mean().item():.3f}")
    finally:
        scales.detach()
        for p, flag in zip(model.parameters(), was_trainable):
            p.requires_grad_(flag)
    return scales, history


@torch.no_grad()
def fold(model, coefficients) -> nn.Module:
    """Write ``{(layer, head): tau}`` into ``o_proj``'s input columns, in place; returns the model::

        W_O[:, hD:(h+1)D]  <-  tau_h * W_O[:, hD:(h+1)D]         (o_proj's bias, if any, untouched)

    A plain model with the logits of :func:`apply`: same parameters, no hooks, no extra cost. It is marked
    (``model.config.pear_folded``, kept by ``save_pretrained``): folding it again raises ValueError."""
    if getattr(model.config, "pear_folded", None):
        raise ValueError("this model already has PEAR coefficients folded into o_proj (model.config.pear_folded); "
                         "folding twice would multiply them: fold into a fresh copy of the base model")
    coefficients = check_coefficients(model, coefficients)
    attn, head_dim = attention_modules(model), geometry(model)[2]
    for (layer, head), tau in coefficients.items():
        attn[layer].o_proj.weight[:, head * head_dim : (head + 1) * head_dim] *= tau
    setattr(model.config, "pear_folded", [[l, h, t] for (l, h), t in coefficients.items()])
    return model


def save_coefficients(path, model, coefficients, **meta) -> Path:
    """Write the coefficients as JSON with the model's id and shape (and any ``meta``)."""
    coefficients = check_coefficients(model, coefficients)
    record = {"model": model_name(model), "model_type": model.config.model_type,
              **dict(zip(SHAPE, geometry(model))),
              "coefficients": [{"layer": l, "head": h, "tau": t} for (l, h), t in coefficients.items()], **meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def load_coefficients(path, model) -> dict[tuple[int, int], float]:
    """Read coefficients saved by :func:`save_coefficients`; ValueError if they were saved
    for another model (id, type, layers, heads or head size differ)."""
    record = json.loads(Path(path).read_text())
    check_same_model(record.get("model", ""), model, f"PEAR coefficients in {path}")
    expected = {"model_type": model.config.model_type, **dict(zip(SHAPE, geometry(model)))}
    differ = {k: (record.get(k), v) for k, v in expected.items() if record.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: saved {a!r}, this model {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{path}: coefficients were saved for another model ({detail})")
    return check_coefficients(model, {(c["layer"], c["head"]): c["tau"] for c in record["coefficients"]})


def plot_head_scores(result: HeadScores, heads=(), ax=None, title: str | None = None):
    """Heat map of the head scores (layers x heads); chosen ``heads`` boxed."""
    ax = ax or plt.gca()
    limit = float(result.scores.abs().max()) or 1.0
    im = ax.imshow(result.scores.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
    for layer, head in heads:
        ax.add_patch(plt.Rectangle((layer - 0.5, head - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.set(xlabel="layer", ylabel="head",
           title=title or f"head scores ({result.variant}): change of logit(target) - mean logit")
    plt.colorbar(im, ax=ax, label="> 0: ablating raises copying")
    return ax


def plot_coefficients(history: dict, heads, ax=None):
    """The coefficients tau_h during training, one line per head."""
    ax = ax or plt.gca()
    tau = torch.tensor(history["tau"])  # (steps + 1, k)
    for i, (layer, head) in enumerate(heads):
        ax.plot(history["step"], tau[:, i], lw=1, label=f"L{layer}H{head}")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set(xlabel="training step", ylabel="tau")
    ax.grid(alpha=0.3)
    if len(heads) <= 10:
        ax.legend(fontsize=7, ncol=2)
    return ax
