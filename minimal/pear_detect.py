"""PEAR's detection (arXiv 2409.19745): which heads hold copying back? Mean-ablate a head's output ``x_h`` (its
slice of ``o_proj``'s input, see ``minimal.pear``) at the final position of ``x1..xn x1..xn`` and measure the
change of ``logit(target) - mean logit``: heads whose removal *raises* it suppress copying.
Tags: [paper] stated in the paper, [code] the authors' public code, [choice] this project's.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .hooks import attention_modules

VARIANTS = ("mean", "path")


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


@dataclass
class HeadScores:
    """Detection result. ``scores[l, h]``: mean change of ``logit(target) - mean logit`` when head ``(l, h)`` is
    mean-ablated at the final position (> 0: it suppresses copying), averaged over the settings."""

    scores: torch.Tensor  # (L, H)
    per_setting: torch.Tensor  # (S, L, H): each setting's scores
    clean: list[float]  # the clean copy score per setting (mean over samples)
    variant: str
    settings: list[tuple[int, int]] = field(default_factory=list)


def copy_scorer(model):
    """A function ``(hidden (R, d), target (R,)) -> (R,)``: ``logit(target) - mean logit``, which for a linear
    unembedding is ``h . (W_U[target] - mean_v W_U[v])`` (+ the bias difference): no ``(R, vocab)`` logits."""
    head = model.get_output_embeddings()
    w, bias = head.weight, getattr(head, "bias", None)  # (V, d), (V,) or None
    w_mean = w.mean(0)  # (d,)

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

    For a batch ``ids (B, 2n)`` the input is ``ids[:, :-1]``, the target ``x_n``; head ``(l, h)``'s output at the
    final position (``x_h`` in ``o_proj``'s input) becomes its batch mean, and::

        score[l, h] = mean_b [ s_ablated(b) - s_clean(b) ],   s = logit(target) - mean logit

    averaged over settings; only the final position is recomputed (causal: nothing earlier changes). Variants [choice]:

    - ``"path"`` (path patching, the authors' choice [code]): later heads frozen to the clean run, the head reaches
      the logits only via the residual stream, MLPs and norms (no attention). With ``h_j``, ``a_j`` the clean
      residual into layer ``j`` and its attention output, ablating ``(l, h)`` adds ``W_O[:, hD:(h+1)D] (mean_h - x_h)``
      to ``a_l``, then ``h_{j+1} = m_j + MLP_j(norm_j(m_j))``, ``m_j = h_j + a_j`` (j >= l): all heads, samples at once.
    - ``"mean"``: plain mean ablation, propagated everywhere. The prefix runs once into a KV cache; the last
      token re-runs against copies of it, row ``b*H + g`` = sample ``b`` with head ``g`` ablated, ``max_rows``
      rows a forward: ``L * H * samples`` one-token forwards."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: choose one of {', '.join(map(repr, VARIANTS))}")
    if max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: need at least 1")
    device = next(model.parameters()).device
    score, run = copy_scorer(model), _path_scores if variant == "path" else _mean_scores
    per_setting, clean_scores = [], []
    bar = tqdm(total=len(dataset) * geometry(model)[0], desc=f"head scores ({variant})", disable=not progress)
    for ids in dataset:
        scores, clean = run(model, ids.to(device), score, max_rows, bar)
        per_setting.append(scores.cpu())
        clean_scores.append(clean.mean().item())
    bar.close()
    per_setting = torch.stack(per_setting)  # (S, L, H)
    settings = [(ids.shape[1] // 2, ids.shape[0]) for ids in dataset]
    return HeadScores(per_setting.mean(0), per_setting, clean_scores, variant, settings)


def _run_with_cache(model, ids, cache=None):
    """``model.base_model(ids)`` continuing ``cache`` -> (last hidden state, cache). transformers 5.2x renamed
    ``past_key_values`` to ``cache`` (the old name warns, then goes in 5.40); 4.x knows only the old one."""
    name = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    out = model.base_model(ids, use_cache=True, **{name: cache})
    return out.last_hidden_state, out["cache" if "cache" in out else "past_key_values"]


def _clean_final_position(model, ids, cache=None):
    """One clean forward of ``ids``; at the final position, per layer: the residual entering it ``h (B, d)``
    and the heads ``x (B, H*D)`` (o_proj's input; o_proj(x) is the attention output); and the final state."""
    h, x = {}, {}

    def keep(store, i):
        def hook(module, args, kwargs=None):
            store[i] = (args[0] if args else kwargs["hidden_states"])[:, -1]
        return hook

    handles = []
    for i, layer in enumerate(model.base_model.layers):
        handles.append(layer.register_forward_pre_hook(keep(h, i), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep(x, i)))
    try:
        final = _run_with_cache(model, ids, cache)[0][:, -1]
    finally:
        for handle in handles:
            handle.remove()
    return h, x, final


def _path_scores(model, ids, score, max_rows, bar):
    """Path patching at the final position: MLPs and norms recomputed, attention frozen."""
    layers = model.base_model.layers
    if not all(hasattr(layer, "post_attention_layernorm") and hasattr(layer, "mlp") for layer in layers):
        raise ValueError("variant='path' needs Llama-style decoder layers (post_attention_layernorm, mlp)")
    num_layers, num_heads, head_dim = geometry(model)
    batch, target = ids.shape[0], ids[:, -1]
    h, x, final = _clean_final_position(model, ids[:, :-1])
    a = [layer.self_attn.o_proj(x[j]) for j, layer in enumerate(layers)]  # (B, d) the attention outputs
    clean = score(final, target)  # (B,)
    scores = torch.zeros(num_layers, num_heads, device=ids.device)
    for l in range(num_layers):
        heads = x[l].view(batch, num_heads, head_dim)  # (B, H, D)
        change = heads.mean(0) - heads  # (B, H, D): mean_h - x_h
        w = layers[l].self_attn.o_proj.weight.view(-1, num_heads, head_dim)  # (d, H, D)
        delta = torch.einsum("bhe,dhe->bhd", change, w)  # (B, H, d): each head's change through W_O
        resid = h[l][:, None] + delta  # (B, H, d): the residual into layer l, plus the head's change
        for j in range(l, num_layers):
            resid = resid + a[j][:, None]  # m_j: attention frozen to the clean run
            resid = resid + layers[j].mlp(layers[j].post_attention_layernorm(resid))  # h_{j+1}
        hidden = model.base_model.norm(resid)  # (B, H, d)
        scores[l] = (score(hidden.flatten(0, 1), target.repeat_interleave(num_heads)).view(batch, num_heads)
                     - clean[:, None]).mean(0)
        bar.update(1)
    return scores, clean


def _mean_scores(model, ids, score, max_rows, bar):
    """Mean ablation with full propagation: the last token re-run against the prefix's KV cache."""
    attn = attention_modules(model)
    num_layers, num_heads, head_dim = geometry(model)
    batch, prefix, last, target = ids.shape[0], ids[:, :-2], ids[:, -2:-1], ids[:, -1]
    cache = _run_with_cache(model, prefix)[1]
    _, x, final = _clean_final_position(model, last, copy.deepcopy(cache))
    clean = score(final, target)  # (B,)
    scores = torch.zeros(num_layers, num_heads, device=ids.device)
    chunk = max(1, max_rows // num_heads)  # samples per forward
    eye = torch.eye(num_heads, dtype=torch.bool, device=ids.device)  # eye[g, h]: row g ablates head h
    for l in range(num_layers):
        mean = x[l].mean(0).view(num_heads, head_dim)  # (H, D), the batch mean

        def ablate(module, args):  # o_proj's input (b*H, 1, H*D): in row b*H + g, head g := its mean
            heads = args[0].view(-1, num_heads, num_heads, head_dim)  # (b, g, h, D)
            return (torch.where(eye[None, :, :, None], mean.to(heads.dtype), heads).view(args[0].shape),)
        total = torch.zeros(num_heads, device=ids.device)
        for b0 in range(0, batch, chunk):
            rows = torch.arange(b0, min(b0 + chunk, batch), device=ids.device).repeat_interleave(num_heads)
            sub = copy.deepcopy(cache)
            sub.batch_select_indices(rows)  # (R = b*H) copies of the samples' prefix
            handle = attn[l].o_proj.register_forward_pre_hook(ablate)
            try:
                hidden = _run_with_cache(model, last[rows], sub)[0][:, -1]
            finally:
                handle.remove()
            total += (score(hidden, target[rows]) - clean[rows]).view(-1, num_heads).sum(0)
        scores[l] = total / batch
        bar.update(1)
    return scores, clean


def top_heads(scores, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest scores (ablating them raises the copy logit most),
    as ``(layer, head)`` pairs, best first. ``scores``: ``(L, H)`` tensor or a HeadScores."""
    scores = scores.scores if isinstance(scores, HeadScores) else torch.as_tensor(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (layers, heads), got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= scores.numel():
        raise ValueError(f"k={k!r}: choose an integer from 1 to the number of heads ({scores.numel()})")
    num_heads = scores.shape[1]
    return [(int(i) // num_heads, int(i) % num_heads) for i in scores.flatten().topk(k).indices]
