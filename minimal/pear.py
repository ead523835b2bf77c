"""PEAR: find the heads that suppress copying from the context, scale them down, fold the scales.

PEAR (arXiv 2409.19745, "Position-Embedding-Agnostic Attention Re-weighting") works in three steps:

1. **A proxy task.** Random token ids repeated, ``x1..xn x1..xn``, no BOS. In the second half every
   token can be copied from the first half: a model that reads its context well predicts it.
2. **Detection.** For every head, replace its output at the final position by its mean over the
   batch and measure how ``logit(target) - mean logit`` changes (target = the next token of the
   copy). Heads whose removal *raises* the copy logit hold copying back: "suppression heads".
3. **Re-weighting.** Multiply the outputs of the top-k of those heads by learned scalars
   ``tau_h`` (init 1), the model frozen, with cross-entropy on the second half of fresh copy
   sequences. Then ``fold`` the scalars into ``o_proj``: a plain model, zero inference overhead.

Where a head's output lives. In Llama, Qwen2 and Mistral, ``self_attn.o_proj`` receives the heads
concatenated, ``(B, T, H*D)``, head ``h`` in columns ``h*D:(h+1)*D``, and mixes them::

    o_proj(x) = W_O x = sum_h W_O[:, hD:(h+1)D] x_h          W_O (d_model, H*D), x_h (D,)

PEAR acts on that input, not on the attention map, so unlike the other methods it is not a
``minimal.hooks`` calibration: it uses forward pre-hooks on ``o_proj`` (found with the hooks'
layer finder), and scaling head ``h`` by ``tau_h`` folds into the columns ``W_O[:, hD:(h+1)D]``.

>>> data = proxy_dataset(tokenizer, seed=0)                       # [(samples, 2n)] per setting
>>> result = head_scores(model, data, variant="path")             # .scores (layers, heads)
>>> heads = top_heads(result.scores, k=10)                       # [(layer, head), ...]
>>> scales, history = train_coefficients(model, heads, sequences=512)
>>> fold(model, scales.coefficients())                             # plain model again

Tags: [paper] stated in the paper, [code] read in the authors' public code, [choice] this
project's decision.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .hooks import attention_modules
from .models import check_same_model, model_name

# The paper's proxy settings: (n, samples) = (copy length, sequences of length 2n) [paper].
SETTINGS = ((50, 20), (25, 40), (15, 80), (10, 100))
VARIANTS = ("mean", "path")
# Random tokens come from these ids [choice]: in SmolLM2's BPE vocabulary they are ordinary
# sub-words (no special token, no raw byte), common enough that the model has seen them often.
TOKEN_RANGE = (1000, 10000)
FOLD_MARK = "pear_folded"  # config attribute set by fold(); a second fold raises

# ----------------------------------------------------------------------------- the proxy task


def copy_sequences(n: int, samples: int, *, token_range=TOKEN_RANGE, exclude=(), generator=None) -> torch.Tensor:
    """``samples`` sequences ``x1..xn x1..xn`` -> LongTensor ``(samples, 2n)``, no BOS.

    The ``n`` ids of one sequence are distinct [choice], drawn uniformly from ``token_range``
    (``[low, high)``) minus ``exclude`` (e.g. the tokenizer's special ids): then every token of
    the second half has exactly one place to be copied from.
    """
    low, high = token_range
    if n < 2 or samples < 1:
        raise ValueError(f"need n >= 2 and samples >= 1, got n={n}, samples={samples}")
    candidates = torch.arange(low, high)
    if len(exclude):
        candidates = candidates[~torch.isin(candidates, torch.as_tensor(list(exclude)))]
    if len(candidates) < n:
        raise ValueError(f"token_range={token_range} holds {len(candidates)} usable ids, fewer than n={n}")
    pick = torch.rand(samples, len(candidates), generator=generator).argsort(dim=1)[:, :n]  # (samples, n)
    first = candidates[pick]
    return torch.cat([first, first], dim=1)  # (samples, 2n)


def proxy_dataset(tokenizer=None, settings=SETTINGS, *, seed: int = 0, token_range=TOKEN_RANGE) -> list[torch.Tensor]:
    """One ``(samples, 2n)`` batch of copy sequences per ``(n, samples)`` setting, seeded.

    ``tokenizer`` (optional) only supplies the special ids to leave out.
    """
    for setting in settings:
        if len(setting) != 2:
            raise ValueError(f"settings must be (n, samples) pairs, got {setting!r}")
    exclude = tokenizer.all_special_ids if tokenizer is not None else ()
    generator = torch.Generator().manual_seed(seed)
    return [copy_sequences(n, s, token_range=token_range, exclude=exclude, generator=generator) for n, s in settings]


# ----------------------------------------------------------------------------- model geometry


def geometry(model) -> tuple[int, int, int]:
    """``(num_layers, num_heads, head_dim)`` as ``o_proj`` sees them."""
    attn = attention_modules(model)
    num_heads = model.config.num_attention_heads
    return len(attn), num_heads, attn[0].o_proj.in_features // num_heads


def check_coefficients(model, coefficients) -> dict[tuple[int, int], float]:
    """``{(layer, head): tau}`` (or a list of heads, then tau = 1) checked: distinct heads the model
    has, finite taus; else ValueError."""
    if not isinstance(coefficients, dict):
        heads = [tuple(h) if isinstance(h, (tuple, list)) else (h,) for h in coefficients]
        if len(set(heads)) != len(heads):
            raise ValueError(f"heads has duplicates: {heads}")
        coefficients = dict.fromkeys(heads, 1.0)
    if not coefficients:
        raise ValueError("heads/coefficients must name at least one (layer, head)")
    num_layers, num_heads, _ = geometry(model)
    for pair, tau in coefficients.items():
        if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            raise ValueError(f"heads must be (layer, head) pairs of ints, got {pair!r}")
        if not (0 <= pair[0] < num_layers and 0 <= pair[1] < num_heads):
            raise ValueError(f"head {pair} does not exist: the model has layers 0..{num_layers - 1} "
                             f"and heads 0..{num_heads - 1}")
        if not math.isfinite(float(tau)):
            raise ValueError(f"coefficients must be finite numbers, got {tau} for head {pair}")
    return {pair: float(tau) for pair, tau in coefficients.items()}


# ----------------------------------------------------------------------------- detection


@dataclass
class HeadScores:
    """Detection result. ``scores[l, h]``: mean change of ``logit(target) - mean logit`` at the
    final position when head ``(l, h)`` is mean-ablated there (positive = the head suppresses
    copying), averaged over the settings; ``per_setting`` keeps each setting's ``(L, H)``."""

    scores: torch.Tensor  # (L, H)
    per_setting: torch.Tensor  # (S, L, H)
    clean: list[float]  # the clean copy score per setting (mean over samples)
    variant: str
    settings: list[tuple[int, int]] = field(default_factory=list)


def copy_scorer(model):
    """A function ``(hidden (R, d), target (R,)) -> (R,)``: ``logit(target) - mean logit``.

    The unembedding is linear, so this is ``h . (W_U[target] - mean_v W_U[v])`` (+ the bias
    difference): no need to build the ``(R, vocab)`` logits. The mean row is computed once.
    """
    head = model.get_output_embeddings()
    w = head.weight  # (V, d)
    w_mean = w.mean(0)  # (d,)
    bias = getattr(head, "bias", None)

    def score(hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = (hidden.to(w.dtype) * (w[target] - w_mean)).sum(-1)  # (R,)
        if bias is not None:
            out = out + bias[target] - bias.mean()
        return out.float()

    return score


@torch.no_grad()
def head_scores(model, dataset: list[torch.Tensor], *, variant: str = "path", max_rows: int = 72,
                progress: bool = True) -> HeadScores:
    """Mean-ablate every head at the final position and score the change of the copy logit.

    For a batch ``ids (B, 2n)`` of one setting, the input is ``ids[:, :-1]`` and the target the
    last token ``x_n`` of the copy. Head ``(l, h)``'s output at the final position, ``x_h`` in
    ``o_proj``'s input, is replaced by its mean over the batch, and::

        score[l, h] = mean_b [ s_ablated(b) - s_clean(b) ],   s = logit(target) - mean logit

    then averaged over the settings (one batch each). Two variants [choice]:

    - ``"path"`` (path patching, the authors' choice [code]): the q/k/v of every later head are
      frozen to the clean run, so every later attention output at the final position is the
      clean one. The ablated head reaches the logits only through the residual stream and the
      position-wise blocks on it (MLPs, norms): its direct path, not through other heads.
    - ``"mean"``: plain mean ablation; the change propagates everywhere downstream, later
      heads included.

    Ablating at the final position changes nothing at earlier positions (causal attention),
    so only the final position is ever recomputed:

    - ``"path"`` needs no attention at all. With ``h_j`` the clean residual entering layer
      ``j`` and ``a_j`` the clean attention output (both at the final position), ablating
      ``(l, h)`` adds ``W_O[:, hD:(h+1)D] (mean_h - x_h)`` to ``a_l`` (``o_proj`` is linear), and
      then ``m_j = h_j + a_j``, ``h_{j+1} = m_j + MLP_j(norm_j(m_j))`` for ``j >= l`` with the
      clean ``a_j`` for ``j > l``: MLPs and norms only, for all heads and samples at once.
    - ``"mean"`` runs the prefix ``ids[:, :-2]`` once into a KV cache and re-runs the last token
      through the whole model against a copy of that cache, all H heads of one layer in one
      batch (row ``b*H + g`` = sample ``b`` with head ``g`` ablated), at most ``max_rows`` rows
      per forward. It costs ``L * H * samples`` one-token forwards: several times the path
      variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(map(repr, VARIANTS))}")
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: need at least 1")
    num_layers, num_heads, head_dim = geometry(model)
    device = next(model.parameters()).device
    score = copy_scorer(model)
    per_setting, clean_scores = [], []
    bar = tqdm(total=len(dataset) * num_layers, desc=f"head scores ({variant})", disable=not progress)
    for ids in dataset:
        ids = ids.to(device)
        run = _path_scores if variant == "path" else _mean_scores
        scores, clean = run(model, ids, score, max_rows, bar)
        per_setting.append(scores.cpu())
        clean_scores.append(clean.mean().item())
    bar.close()
    per_setting = torch.stack(per_setting)  # (S, L, H)
    settings = [(ids.shape[1] // 2, ids.shape[0]) for ids in dataset]
    return HeadScores(per_setting.mean(0), per_setting, clean_scores, variant, settings)


def _clean_final_position(model, ids, past_key_values=None):
    """One clean forward of ``ids``; at the final position, per layer: the residual entering
    the layer ``h (B, d)``, the heads ``x (B, H*D)`` (o_proj's input), the attention output
    ``a (B, d)``; and the final hidden state ``(B, d)``."""
    layers = model.base_model.layers
    h, x, a = {}, {}, {}

    def layer_in(i):
        def hook(module, args, kwargs):
            h[i] = (args[0] if args else kwargs["hidden_states"])[:, -1]
        return hook

    def heads_in(i):
        def hook(module, args):
            x[i] = args[0][:, -1]
        return hook

    def attn_out(i):
        def hook(module, args, output):
            a[i] = output[0][:, -1]
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(layer_in(i), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(heads_in(i)))
        handles.append(layer.self_attn.register_forward_hook(attn_out(i)))
    try:
        final = model.base_model(ids, past_key_values=past_key_values).last_hidden_state[:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return h, x, a, final


def _path_scores(model, ids, score, max_rows, bar):
    """Path patching at the final position: MLPs and norms recomputed, attention frozen."""
    layers = model.base_model.layers
    for layer in layers:
        if not (hasattr(layer, "post_attention_layernorm") and hasattr(layer, "mlp")):
            raise ValueError("variant='path' needs Llama-style decoder layers (post_attention_layernorm, mlp)")
    num_layers, num_heads, head_dim = geometry(model)
    target = ids[:, -1]
    h, x, a, final = _clean_final_position(model, ids[:, :-1])
    clean = score(final, target)  # (B,)
    batch = ids.shape[0]
    scores = torch.zeros(num_layers, num_heads, device=ids.device)
    for l in range(num_layers):
        heads = x[l].view(batch, num_heads, head_dim)  # (B, H, D)
        change = heads.mean(0) - heads  # (B, H, D): mean_h - x_h
        w = layers[l].self_attn.o_proj.weight.view(-1, num_heads, head_dim)  # (d, H, D)
        delta = torch.einsum("bhe,dhe->bhd", change, w)  # (B, H, d): each head's change through W_O
        resid = (h[l] + a[l])[:, None] + delta  # (B, H, d) residual after layer l's attention
        for j in range(l, num_layers):
            if j > l:
                resid = resid + a[j][:, None]  # later attention: frozen to the clean run
            resid = resid + layers[j].mlp(layers[j].post_attention_layernorm(resid))
        hidden = model.base_model.norm(resid)  # (B, H, d)
        scores[l] = (score(hidden.flatten(0, 1), target.repeat_interleave(num_heads)).view(batch, num_heads)
                     - clean[:, None]).mean(0)
        bar.update(1)
    return scores, clean


def _mean_scores(model, ids, score, max_rows, bar):
    """Mean ablation with full propagation: the last token re-run against the prefix's KV cache."""
    attn = attention_modules(model)
    num_layers, num_heads, head_dim = geometry(model)
    batch = ids.shape[0]
    prefix, last, target = ids[:, :-2], ids[:, -2:-1], ids[:, -1]
    cache = model.base_model(prefix, use_cache=True).past_key_values
    _, x, _, final = _clean_final_position(model, last, past_key_values=copy.deepcopy(cache))
    clean = score(final, target)  # (B,)
    scores = torch.zeros(num_layers, num_heads, device=ids.device)
    chunk = max(1, max_rows // num_heads)  # samples per forward
    eye = torch.eye(num_heads, dtype=torch.bool, device=ids.device)  # eye[g, h]: row g ablates head h
    for l in range(num_layers):
        mean = x[l].mean(0).view(num_heads, head_dim)  # (H, D), the batch mean
        total = torch.zeros(num_heads, device=ids.device)
        for b0 in range(0, batch, chunk):
            rows = torch.arange(b0, min(b0 + chunk, batch), device=ids.device).repeat_interleave(num_heads)
            sub = copy.deepcopy(cache)
            sub.batch_select_indices(rows)  # (R = b*H) copies of the samples' prefix
            handle = attn[l].o_proj.register_forward_pre_hook(_mean_ablation(mean, eye))
            try:
                hidden = model.base_model(last[rows], past_key_values=sub).last_hidden_state[:, -1]
            finally:
                handle.remove()
            total += (score(hidden, target[rows]) - clean[rows]).view(-1, num_heads).sum(0)
        scores[l] = total / batch
        bar.update(1)
    return scores, clean


def _mean_ablation(mean: torch.Tensor, eye: torch.Tensor):
    """o_proj pre-hook: in row ``b*H + g``, head ``g``'s output at the final position := ``mean[g]``."""
    num_heads, head_dim = mean.shape

    def pre(module, args):
        x = args[0]  # (R, 1, H*D)
        heads = x[:, -1].view(-1, num_heads, num_heads, head_dim)  # (b, g, h, D)
        heads = torch.where(eye[None, :, :, None], mean.to(x.dtype), heads)
        return (torch.cat([x[:, :-1], heads.reshape(x.shape[0], 1, -1)], dim=1), *args[1:])

    return pre


def top_heads(scores, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest scores (ablating them raises the copy logit most),
    as ``(layer, head)`` pairs, best first. ``scores``: ``(L, H)`` tensor or a HeadScores."""
    scores = scores.scores if isinstance(scores, HeadScores) else torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (layers, heads), got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.numel():
        raise ValueError(f"k={k!r}: choose an integer from 1 to the number of heads ({scores.numel()})")
    flat = scores.flatten().topk(k).indices
    num_heads = scores.shape[1]
    return [(int(i) // num_heads, int(i) % num_heads) for i in flat]


# ----------------------------------------------------------------------------- re-weighting


class HeadScales(nn.Module):
    """Learnable ``tau_h`` (init 1) for chosen heads, applied before ``o_proj``::

        o_proj(x) = sum_h W_O[:, hD:(h+1)D] (tau_h x_h)       tau_h = 1 for heads not chosen

    ``attach(model)`` registers one forward pre-hook per involved layer; ``detach()`` removes
    them. Also a context manager: ``with HeadScales(heads, init=...).attach(model): ...``.
    """

    def __init__(self, heads, num_heads: int, head_dim: int, init=1.0):
        super().__init__()
        self.heads = [tuple(h) for h in heads]
        self.num_heads, self.head_dim = num_heads, head_dim
        init = torch.as_tensor(init, dtype=torch.float32).expand(len(self.heads)).clone()
        self.tau = nn.Parameter(init)  # (k,)
        self._handles = []

    def layer_scale(self, layer: int) -> torch.Tensor:
        """``(H,)``: tau for the chosen heads of ``layer``, 1 elsewhere (differentiable)."""
        index = [i for i, (l, _) in enumerate(self.heads) if l == layer]
        heads = torch.tensor([self.heads[i][1] for i in index], device=self.tau.device)
        return torch.ones(self.num_heads, device=self.tau.device).scatter(0, heads, self.tau[index])

    def attach(self, model) -> "HeadScales":
        check_coefficients(model, self.heads)
        self.detach()
        attn = attention_modules(model)
        self.to(next(model.parameters()).device)
        for layer in sorted({l for l, _ in self.heads}):
            self._handles.append(attn[layer].o_proj.register_forward_pre_hook(self._pre_hook(layer)))
        return self

    def _pre_hook(self, layer: int):
        def pre(module, args):
            x = args[0]  # (B, T, H*D)
            scale = self.layer_scale(layer).to(x.dtype)  # (H,)
            y = x.view(*x.shape[:-1], self.num_heads, self.head_dim) * scale[:, None]  # (B, T, H, D)
            return (y.reshape(x.shape), *args[1:])

        return pre

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def coefficients(self) -> dict[tuple[int, int], float]:
        return {h: float(t) for h, t in zip(self.heads, self.tau.detach().cpu())}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def apply(model, coefficients) -> HeadScales:
    """Scale the heads by fixed ``{(layer, head): tau}`` with hooks (the un-folded form).
    Returns the attached HeadScales; ``.detach()`` or a ``with`` block removes it."""
    coefficients = check_coefficients(model, coefficients)
    _, num_heads, head_dim = geometry(model)
    scales = HeadScales(list(coefficients), num_heads, head_dim, init=list(coefficients.values()))
    scales.tau.requires_grad_(False)
    return scales.attach(model)


def copy_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the second half of ``x1..xn x1..xn`` ``(B, 2n)``.

    Targets: ``x2..xn`` of the copy, predicted from positions ``n..2n-2``. The copy's first
    token ``x1`` follows ``xn`` and cannot be read from the context, so it is left out [choice].
    """
    n = ids.shape[1] // 2
    logits = model(ids[:, :-1], logits_to_keep=n - 1).logits  # (B, n-1, V): positions n..2n-2
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, n + 1 :].flatten())


@torch.no_grad()
def copy_metrics(model, ids: torch.Tensor, batch_size: int = 16) -> dict:
    """Loss (as :func:`copy_loss`) and greedy top-1 accuracy on the copyable second half."""
    n = ids.shape[1] // 2
    device = next(model.parameters()).device
    losses, hits = [], []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size].to(device)
        logits = model(chunk[:, :-1], logits_to_keep=n - 1).logits.float()  # (b, n-1, V)
        target = chunk[:, n + 1 :]
        losses.append(F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none"))
        hits.append((logits.argmax(-1) == target).flatten())
    return {"loss": torch.cat(losses).mean().item(), "accuracy": torch.cat(hits).float().mean().item()}


def train_coefficients(model, heads, *, sequences: int = 512, n: int = 50, batch_size: int = 8,
                       lr: float = 5e-3, seed: int = 1, tokenizer=None, token_range=TOKEN_RANGE,
                       progress: bool = True) -> tuple[HeadScales, dict]:
    """Learn ``tau_h`` for ``heads`` on fresh copy sequences, the model frozen.

    AdamW, lr 5e-3 [code] (default weight decay), ``sequences`` sequences of length ``2n`` in
    batches of ``batch_size`` (the paper: 50,000 sequences of n = 50 [paper]; size it by the
    profile), loss :func:`copy_loss`. Data are seeded by ``seed``; use another seed than the
    detection data. Returns the HeadScales (detached from the model) and a history
    ``{"step", "loss", "tau"}`` with the loss and the k coefficients after every step.
    """
    heads = list(check_coefficients(model, heads))
    if sequences < 1 or batch_size < 1:
        raise ValueError(f"need sequences >= 1 and batch_size >= 1, got {sequences}, {batch_size}")
    _, num_heads, head_dim = geometry(model)
    device = next(model.parameters()).device
    scales = HeadScales(heads, num_heads, head_dim).attach(model)
    was_trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # the model stays frozen; only tau learns
    optimizer = torch.optim.AdamW(scales.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    exclude = tokenizer.all_special_ids if tokenizer is not None else ()
    steps = math.ceil(sequences / batch_size)
    history = {"step": [0], "loss": [float("nan")], "tau": [scales.tau.tolist()]}
    bar = tqdm(range(steps), desc=f"train tau (k={len(heads)})", disable=not progress)
    try:
        with torch.enable_grad():
            for step in bar:
                size = min(batch_size, sequences - step * batch_size)
                ids = copy_sequences(n, size, token_range=token_range, exclude=exclude, generator=generator).to(device)
                loss = copy_loss(model, ids)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                history["step"].append(step + 1)
                history["loss"].append(loss.item())
                history["tau"].append(scales.tau.tolist())
                bar.set_postfix(loss=f"{loss.item():.3f}", tau=f"{scales.tau.mean().item():.3f}")
    finally:
        scales.detach()
        for p, flag in zip(model.parameters(), was_trainable):
            p.requires_grad_(flag)
    return scales, history


# ----------------------------------------------------------------------------- folding


@torch.no_grad()
def fold(model, coefficients) -> nn.Module:
    """Write ``{(layer, head): tau}`` into ``o_proj``'s input columns, in place::

        W_O[:, hD:(h+1)D]  <-  tau_h * W_O[:, hD:(h+1)D]         (o_proj's bias, if any, untouched)

    The result is a plain model: the same parameter names and shapes, the same logits as the
    hooked model (:func:`apply`), no hooks, no extra cost. Returns the model.

    The model is marked (``model.config.pear_folded``, which also survives ``save_pretrained``);
    folding a marked model again raises ValueError, since scales would multiply silently.
    Coefficients for heads the model does not have raise ValueError.
    """
    if getattr(model.config, FOLD_MARK, None):
        raise ValueError(
            "this model already has PEAR coefficients folded into o_proj (model.config.pear_folded); "
            "folding twice would multiply them: fold into a fresh copy of the base model"
        )
    coefficients = check_coefficients(model, coefficients)
    attn = attention_modules(model)
    _, _, head_dim = geometry(model)
    for (layer, head), tau in coefficients.items():
        attn[layer].o_proj.weight[:, head * head_dim : (head + 1) * head_dim] *= tau
    setattr(model.config, FOLD_MARK, [[l, h, t] for (l, h), t in coefficients.items()])
    return model


# ----------------------------------------------------------------------------- save / load


def save_coefficients(path, model, coefficients, **meta) -> Path:
    """Write the coefficients as JSON with the model's id and shape (and any ``meta``)."""
    coefficients = check_coefficients(model, coefficients)
    num_layers, num_heads, head_dim = geometry(model)
    record = {
        "model": model_name(model), "model_type": model.config.model_type,
        "num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim,
        "coefficients": [{"layer": l, "head": h, "tau": t} for (l, h), t in coefficients.items()],
        **meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    return path


def load_coefficients(path, model) -> dict[tuple[int, int], float]:
    """Read coefficients saved by :func:`save_coefficients`; ValueError if they were saved
    for another model (id, type, layers, heads or head size differ)."""
    record = json.loads(Path(path).read_text())
    num_layers, num_heads, head_dim = geometry(model)
    check_same_model(record.get("model", ""), model, f"PEAR coefficients in {path}")
    expected = {"model_type": model.config.model_type,
                "num_layers": num_layers, "num_heads": num_heads, "head_dim": head_dim}
    differ = {k: (record.get(k), v) for k, v in expected.items() if record.get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: saved {a!r}, this model {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{path}: coefficients were saved for another model ({detail})")
    return check_coefficients(model, {(c["layer"], c["head"]): c["tau"] for c in record["coefficients"]})


# ----------------------------------------------------------------------------- plots


def plot_head_scores(result: HeadScores, heads=(), ax=None, title: str | None = None):
    """Heat map of the head scores (layers x heads); chosen ``heads`` boxed."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    scores = result.scores
    limit = float(scores.abs().max()) or 1.0
    im = ax.imshow(scores.T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower")
    for layer, head in heads:
        ax.add_patch(plt.Rectangle((layer - 0.5, head - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(title or f"head scores ({result.variant}): change of logit(target) - mean logit")
    plt.colorbar(im, ax=ax, label="> 0: ablating raises copying")
    return ax


def plot_coefficients(history: dict, heads, ax=None):
    """The coefficients tau_h during training, one line per head."""
    import matplotlib.pyplot as plt

    ax = ax or plt.gca()
    tau = torch.tensor(history["tau"])  # (steps + 1, k)
    for i, (layer, head) in enumerate(heads):
        ax.plot(history["step"], tau[:, i], lw=1, label=f"L{layer}H{head}")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("tau")
    ax.grid(alpha=0.3)
    if len(heads) <= 10:
        ax.legend(fontsize=7, ncol=2)
    return ax
