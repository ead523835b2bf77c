"""Scoring noisy-context QA: greedy answers, two match rules, accuracy grids, attention on gold.

One call does everything a notebook needs::

    records = evaluate(model, tokenizer, examples)           # one dict per example
    grid = accuracy_grid(records, by=("noise_ratio", "gold_position"))
    print(format_grid(grid, rows="noise_ratio", cols="gold_position"))

Records, grids and layer profiles are plain lists/dicts of numbers and strings, so
``save_json`` writes them as they are.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import GOLD_POSITIONS, build_batch
from .hooks import capture_attention

# ----------------------------------------------------------------------------- matching

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Strict: the normalized prediction equals one normalized answer."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def lenient_match(prediction: str, answers: list[str]) -> bool:
    """The containment rule of the OpAmp code: every word of the answer appears in the
    prediction, or every word of the (non-empty) prediction appears in the answer."""
    pred = set(normalize_answer(prediction).split())
    if not pred:
        return False
    for answer in answers:
        ans = set(normalize_answer(answer).split())
        if ans and (ans <= pred or pred <= ans):
            return True
    return False


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z = 1.96).

    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; it stays inside [0, 1]
    and is honest at the small n of our notebooks, unlike the normal approximation.
    """
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    examples: list[dict],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 20,
    attention: bool = True,
    progress: bool = True,
    desc: str = "evaluate",
) -> list[dict]:
    """Greedy-generate an answer for every example and score it.

    Returns one record per example: its metadata, the prediction, ``strict`` and
    ``lenient`` correctness, and (attention=True) the attention mass that the last prompt
    position puts on the gold documents and on the distractors, per layer (averaged over
    heads), read during the same prefill that generates the answer.
    """
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    device = next(model.parameters()).device
    records = []
    bar = tqdm(total=len(examples), desc=desc, disable=not progress)
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        input_ids, attention_mask, spans = build_batch(tokenizer, batch)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if attention:
            with capture_attention(model, spans=spans) as cap:
                out = _greedy(model, tokenizer, input_ids, attention_mask, max_new_tokens)
            mass = cap.stacked_span_mass().mean(dim=2)  # (L, B, n_docs), mean over heads
        else:
            out = _greedy(model, tokenizer, input_ids, attention_mask, max_new_tokens)
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
        for i, (ex, text) in enumerate(zip(batch, texts)):
            prediction = text.strip().split("\n")[0].strip()
            record = {
                **{k: v for k, v in ex.items() if k not in ("documents",)},
                "prediction": prediction,
                "strict": exact_match(prediction, ex["answers"]),
                "lenient": lenient_match(prediction, ex["answers"]),
            }
            if attention:
                record.update(_gold_mass(mass[:, i], ex))
            records.append(record)
        bar.update(len(batch))
    bar.close()
    return records


def _greedy(model, tokenizer, input_ids, attention_mask, max_new_tokens):
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )


def _gold_mass(mass: torch.Tensor, example: dict) -> dict:
    """mass (L, n_docs) -> per layer: total on gold, total on distractors, per-document means."""
    n_docs = len(example["documents"])
    mass = mass[:, :n_docs]
    gold = torch.zeros(n_docs, dtype=torch.bool)
    gold[example["gold"]] = True
    n_distract = int((~gold).sum())
    return {
        "gold_mass": mass[:, gold].sum(-1).tolist(),
        "distractor_mass": mass[:, ~gold].sum(-1).tolist(),
        "gold_mass_per_doc": (mass[:, gold].sum(-1) / gold.sum()).tolist(),
        "distractor_mass_per_doc": (mass[:, ~gold].sum(-1) / n_distract).tolist() if n_distract else None,
    }


# ----------------------------------------------------------------------------- aggregation

# The cell of an example that lacks a grouping field (a user's own file needs only id,
# documents, gold, question and answers). A field present with the value null stays None.
UNKNOWN = "unknown"


def accuracy_grid(records: list[dict], by=("noise_ratio", "gold_position"), metric: str = "lenient") -> list[dict]:
    """Accuracy per cell of the ``by`` fields, with Wilson 95% intervals.

    Each row: the ``by`` values, ``n``, ``correct``, ``accuracy``, ``low``, ``high``,
    and ``gold_mass`` (mean over the cell and over layers) when records carry attention.
    A record without a ``by`` field counts in the cell ``"unknown"`` for it.
    """
    if metric not in ("lenient", "strict"):
        raise ValueError(f"metric={metric!r}: choose 'lenient' or 'strict'")
    by = (by,) if isinstance(by, str) else tuple(by)
    cells = defaultdict(list)
    for r in records:
        cells[tuple(r.get(k, UNKNOWN) for k in by)].append(r)
    rows = []
    for key in sorted(cells, key=lambda k: tuple(_sort_key(v) for v in k)):
        rs = cells[key]
        correct = sum(bool(r[metric]) for r in rs)
        low, high = wilson_interval(correct, len(rs))
        row = dict(zip(by, key), n=len(rs), correct=correct, accuracy=correct / len(rs), low=low, high=high)
        if all("gold_mass" in r for r in rs):
            row["gold_mass"] = sum(sum(r["gold_mass"]) / len(r["gold_mass"]) for r in rs) / len(rs)
        rows.append(row)
    return rows


def _sort_key(value):
    """Numbers in order, gold positions in reading order (first, middle, last), None last."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, str):
        return (1, GOLD_POSITIONS.index(value) if value in GOLD_POSITIONS else len(GOLD_POSITIONS), value)
    return (0, value, "")


def attention_by_layer(records: list[dict]) -> dict:
    """Per layer, the mean attention mass on gold vs distractor documents (over records).

    ``gold`` / ``distractors``: total mass on each group; ``*_per_doc``: per document,
    which is the fair comparison when there are many more distractors than gold documents.
    """
    keys = {"gold": "gold_mass", "distractors": "distractor_mass",
            "gold_per_doc": "gold_mass_per_doc", "distractors_per_doc": "distractor_mass_per_doc"}
    out = {}
    for name, key in keys.items():
        vals = [r[key] for r in records if r.get(key) is not None]
        out[name] = torch.tensor(vals).mean(0).tolist() if vals else None
    return out


def gold_attention_ratio(records: list[dict]) -> float | None:
    """Per document, attention on the gold document over attention on a distractor: the means
    over layers of ``attention_by_layer``'s per-document profiles, on the noisy records. None
    when no record has both (no distractors, or evaluated with attention=False)."""
    noisy = [r for r in records if r.get("distractor_mass_per_doc") is not None]
    if not noisy:
        return None
    layers = attention_by_layer(noisy)
    return float(torch.tensor(layers["gold_per_doc"]).mean() / torch.tensor(layers["distractors_per_doc"]).mean())


def format_grid(grid: list[dict], rows: str = "noise_ratio", cols: str = "gold_position", title: str = "") -> str:
    """A text table: one line per ``rows`` value, one column per ``cols`` value,
    each cell ``accuracy% [low-high] (n)``; a last column with the row's gold attention."""
    row_vals = list(dict.fromkeys(r[rows] for r in grid))
    col_vals = list(dict.fromkeys(r[cols] for r in grid))
    cell = {(r[rows], r[cols]): r for r in grid}
    width = 20
    lines = [title] if title else []
    lines.append(f"{rows:>12} | " + " | ".join(f"{str(c):^{width}}" for c in col_vals) + " | attn on gold")
    lines.append("-" * len(lines[-1]))
    for rv in row_vals:
        parts, masses = [], []
        for cv in col_vals:
            r = cell.get((rv, cv))
            if r is None:
                parts.append(" " * width)
                continue
            parts.append(f"{100 * r['accuracy']:5.1f}% [{100 * r['low']:2.0f}-{100 * r['high']:3.0f}] ({r['n']})".center(width))
            if "gold_mass" in r:
                masses.append((r["gold_mass"], r["n"]))
        mass = sum(m * n for m, n in masses) / sum(n for _, n in masses) if masses else float("nan")
        lines.append(f"{str(rv):>12} | " + " | ".join(parts) + f" | {mass:.3f}")
    return "\n".join(lines)


def select_per_cell(examples: list[dict], n: int, by=("noise_ratio", "gold_position")) -> list[dict]:
    """The first ``n`` examples of every cell (a deterministic, balanced subset); an example
    without a ``by`` field belongs to the cell ``"unknown"`` for it."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one example per cell")
    counts, chosen = defaultdict(int), []
    for ex in examples:
        key = tuple(ex.get(k, UNKNOWN) for k in by)
        if counts[key] < n:
            counts[key] += 1
            chosen.append(ex)
    return chosen


def save_json(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))
    return path
