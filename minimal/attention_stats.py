"""How attention mass is spread, and perplexity on a text.

Scaled ReAttention (Gao et al., arXiv 2307.13365) sorts a row's probabilities into bands: a few "linchpins"
(p > 0.05) carry most of the mass, "hidden gems" (0.01 <= p <= 0.05) useful signal, and the many "small potatoes"
(p < 0.01) can be dropped with little loss. We measure that on a small model (``attention_statistics``), drop
them (``elimination_curve``, ``minimal.eliminate``), and score perplexity on the shipped text (``load_text``):
facts about people, then questions and answers about them, so the answer tokens measure retrieval from far back.
"""

from __future__ import annotations

import math
import re

import torch

from . import data, hooks
from .attention import row_blocks
from .eliminate import eliminate

__all__ = ["BANDS", "AttentionStatistics", "attention_statistics", "elimination_curve", "token_nll", "perplexity",
           "make_fact_text", "load_text", "answer_token_mask"]

TEXT_DIR = data.DATA_DIR / "text"
BANDS = {"small potatoes": "p < 0.01", "hidden gems": "0.01 <= p <= 0.05", "linchpins": "p > 0.05"}
GEM_LOW, GEM_HIGH = 0.01, 0.05


class AttentionStatistics:
    """A capture: per layer, counts and mass of the probabilities in each band, over the causal entries
    of real tokens of the map the layer used (a calibration's ``probs``), first call (prefill) only."""

    slot = "capture"

    def __init__(self, thresholds=(1e-3,), block_rows: int = 128):
        self.thresholds = tuple(float(t) for t in thresholds)
        if any(not 0 < t < 1 for t in self.thresholds):
            raise ValueError(f"thresholds must lie in (0, 1), got {thresholds!r}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows, self.counts = block_rows, {}  # counts: {layer: {selection: [entries, mass]}}

    @torch.no_grad()
    def record(self, module, query, key, attention_mask, scale):
        layer, T, S = module.layer_idx, query.shape[2], key.shape[2]
        if layer in self.counts or T == 1:
            return
        probs_fn = getattr(getattr(module, "calibration", None), "probs", None) or hooks.layer_probs
        allowed_all = hooks.boolean_mask(attention_mask, T, S, query.device)  # (B|1, 1, T, S)
        selections = {"all": lambda p: torch.ones_like(p, dtype=torch.bool), "potatoes": lambda p: p < GEM_LOW,
                      "gems": lambda p: (p >= GEM_LOW) & (p <= GEM_HIGH), "linchpins": lambda p: p > GEM_HIGH,
                      **{t: (lambda p, t=t: p < t) for t in self.thresholds}}
        c = {name: [0, 0.0] for name in selections}  # [entries, mass] per selection
        for r0, r1 in row_blocks(T, 1, self.block_rows):
            rows = torch.arange(r0, r1, device=query.device)
            p = probs_fn(module, query, key, attention_mask, scale, rows).float()  # (B, H, R, S)
            vals = p[allowed_all[..., r0:r1, :].expand_as(p)]  # the causal entries of real tokens, flattened
            for name, select in selections.items():
                chosen = vals[select(vals)]
                c[name][0] += chosen.numel()
                c[name][1] += chosen.sum().item()
        self.counts[layer] = c

    def table(self) -> list[dict]:
        """One dict per layer: shares of entries and of mass per band, sparsity per threshold."""
        rows = []
        for layer in sorted(self.counts):
            c = self.counts[layer]
            n, mass = max(c["all"][0], 1), max(c["all"][1], 1e-12)
            row = {"layer": layer, "entries": c["all"][0]}
            for band in ("potatoes", "gems", "linchpins"):
                row[f"{band}_share"], row[f"{band}_mass"] = c[band][0] / n, c[band][1] / mass
            for t in self.thresholds:
                row[f"sparsity@{t:g}"], row[f"mass_below@{t:g}"] = c[t][0] / n, c[t][1] / mass
            rows.append(row)
        return rows


@torch.no_grad()
def attention_statistics(model, input_ids, attention_mask=None, thresholds=(1e-3,), block_rows: int = 128):
    """One forward pass of input_ids (B, T) (left-padded, with attention_mask, if B > 1) -> one dict per layer
    (``AttentionStatistics.table()``), a block of query rows at a time; the layers' calibrations are measured."""
    with hooks.attach(model, AttentionStatistics(thresholds, block_rows)) as stats:
        model(input_ids=input_ids, attention_mask=attention_mask)
    return stats.table()


def elimination_curve(model, tokenizer, taus, *, text_ids, answer_mask=None, examples=(), renormalize: bool = False,
                      batch_size: int = 8, max_new_tokens: int = 20, progress: bool = True) -> list[dict]:
    """For each tau, perplexity on text_ids (T,) (also on the answer_mask (T-1,) tokens alone) and lenient
    QA accuracy on ``examples`` with probabilities below tau zeroed: one dict per tau (ppl, answer_ppl, n,
    correct, accuracy, low, high: Wilson 95%, by_noise: ``evaluate.accuracy_grid`` by noise ratio)."""
    from tqdm.auto import tqdm

    from .evaluate import accuracy_grid, evaluate, wilson_interval

    rows = []
    for tau in tqdm(list(taus), desc="elimination" + " (renormalised)" * renormalize, disable=not progress):
        with eliminate(model, tau, renormalize):
            nll = token_nll(model, text_ids)
            records = evaluate(model, tokenizer, list(examples), batch_size=batch_size, max_new_tokens=max_new_tokens,
                               attention=False, progress=False) if examples else []
        correct = sum(bool(r["lenient"]) for r in records)
        low, high = wilson_interval(correct, len(records))
        rows.append({
            "tau": tau, "ppl": perplexity(nll),
            "answer_ppl": perplexity(nll, answer_mask) if answer_mask is not None and answer_mask.any() else math.nan,
            "n": len(records), "correct": correct, "accuracy": correct / len(records) if records else math.nan,
            "low": low, "high": high, "by_noise": accuracy_grid(records, by=("noise_ratio",)) if records else []})
    return rows


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of tokens 1..T-1 given the tokens before: input_ids (T,) or (1, T) -> (T-1,)."""
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, :-1].float()  # (T-1, V)
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()


def perplexity(nll: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """exp(mean NLL) over the tokens where ``mask`` (aligned with ``nll``) is True."""
    nll = nll if mask is None else nll[mask]
    if nll.numel() == 0:
        raise ValueError("no token selected: the perplexity of nothing is undefined")
    return math.exp(nll.mean().item())


def make_fact_text(n_examples: int = 24, num_distractors: int = 7, seed: int = 0) -> str:
    """Every ``data.generate`` (train) example's documents as one list of facts, then each question and
    answer ("Q: ...", "A: ..."), leaving out questions whose person has facts in two examples."""
    examples = data.generate(n_examples, num_distractors=num_distractors, split="train", seed=seed)
    facts = [doc for ex in examples for doc in ex["documents"]]
    qa = []
    for ex in examples:
        name = max((n for n in data.full_names("train") if re.search(rf"\b{n}\b", ex["question"])), key=len)
        if sum(bool(re.match(rf"{name}\b", doc)) for doc in facts) == 1:
            qa.append(f"Q: {ex['question']}\nA: {ex['answers'][0]}")
    return "Facts.\n" + "\n".join(facts) + "\n\nQuestions and answers.\n" + "\n".join(qa) + "\n"


def load_text(name: str = "facts_qa") -> str:
    """A shipped text from ``data/text/`` (see its README for source and licence)."""
    path = TEXT_DIR / f"{name}.txt"
    if not path.exists():
        names = sorted(p.stem for p in TEXT_DIR.glob("*.txt"))
        raise FileNotFoundError(f"no text {name!r} in {TEXT_DIR}; shipped: {names}")
    return path.read_text(encoding="utf-8")


def answer_token_mask(tokenizer, text: str, last_tokens: int | None = None):
    """Tokenize ``text`` (its ``last_tokens`` only, if given) -> (input_ids (T,), mask (T-1,)), mask[i] True
    when token i+1 (predicted at position i, as in ``token_nll``) is in an answer (after "A: ")."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if last_tokens is not None:
        ids, offsets = ids[-last_tokens:], offsets[-last_tokens:]
    spans = [m.span(1) for m in re.finditer(r"\nA: ([^\n]*)", text)]
    is_answer = [any(s < e_ and e > s_ for s_, e_ in spans) for s, e in offsets]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(is_answer[1:], dtype=torch.bool)
