"""Scoring noisy-context QA: greedy answers, two match rules, accuracy grids, attention on gold.

    records = evaluate(model, tokenizer, examples)           # one dict per example (plain, for save_json)
    print(format_grid(accuracy_grid(records, by=("noise_ratio", "gold_position"))))
"""

from __future__ import annotations

import contextlib
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

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
UNKNOWN = "unknown"  # the cell of a record that lacks a grouping field (a field present as null stays None)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD style)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    """Strict: the normalized prediction equals one normalized answer."""
    return any(normalize_answer(prediction) == normalize_answer(a) for a in answers)


def lenient_match(prediction: str, answers: list[str]) -> bool:
    """The containment rule of the OpAmp code: every word of an answer appears in the prediction,
    or every word of the (non-empty) prediction appears in the answer."""
    pred = set(normalize_answer(prediction).split())
    return bool(pred) and any((ans := set(normalize_answer(a).split())) and (ans <= pred or pred <= ans)
                              for a in answers)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for z = 1.96):
    ``(p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``, inside [0, 1] and honest at small n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p, denom = successes / n, 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def percent(row: dict) -> str:
    """An accuracy row and its Wilson interval: ``" 61.3% [52- 70]"``."""
    return f"{100 * row['accuracy']:5.1f}% [{100 * row['low']:2.0f}-{100 * row['high']:3.0f}]"


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[dict], *, batch_size: int = 8, max_new_tokens: int = 20,
             attention: bool = True, progress: bool = True, desc: str = "evaluate") -> list[dict]:
    """Greedy-generate an answer for every example and score it: one record per example, its fields (not the
    documents), the prediction, ``strict``, ``lenient`` and (attention=True) the attention mass the last prompt position
    puts on the gold documents and on the distractors, per layer (mean over heads), read during the same prefill."""
    if not examples:
        raise ValueError("examples is empty: nothing to evaluate")
    device, records = next(model.parameters()).device, []
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress):
        batch = examples[start : start + batch_size]
        input_ids, attention_mask, spans = build_batch(tokenizer, batch)
        generate = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=False,
                        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        with capture_attention(model, spans=spans) if attention else contextlib.nullcontext() as cap:
            out = model.generate(**generate)
        mass = cap.stacked_span_mass().mean(dim=2) if attention else None  # (L, B, n_docs), mean over heads
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
        for i, (ex, text) in enumerate(zip(batch, texts)):
            prediction = text.strip().split("\n")[0].strip()
            records.append({**{k: v for k, v in ex.items() if k != "documents"}, "prediction": prediction,
                            "strict": exact_match(prediction, ex["answers"]),
                            "lenient": lenient_match(prediction, ex["answers"]),
                            **(_gold_mass(mass[:, i], ex) if attention else {})})
    return records


def _gold_mass(mass: torch.Tensor, example: dict) -> dict:
    """mass (L, n_docs) -> per layer: total on gold, total on distractors, per-document means."""
    mass = mass[:, : len(example["documents"])]
    gold = torch.zeros(mass.shape[1], dtype=torch.bool)
    gold[example["gold"]] = True
    on_gold, on_rest, n_rest = mass[:, gold].sum(-1), mass[:, ~gold].sum(-1), int((~gold).sum())
    return {"gold_mass": on_gold.tolist(), "distractor_mass": on_rest.tolist(),
            "gold_mass_per_doc": (on_gold / gold.sum()).tolist(),
            "distractor_mass_per_doc": (on_rest / n_rest).tolist() if n_rest else None}


def accuracy_grid(records: list[dict], by=("noise_ratio", "gold_position"), metric: str = "lenient") -> list[dict]:
    """Accuracy per cell of the ``by`` fields: rows of the ``by`` values, ``n``, ``correct``, ``accuracy``, Wilson 95%
    ``low``, ``high``, and ``gold_mass`` (mean over cell and layers) with attention; a missing field is "unknown"."""
    if metric not in ("lenient", "strict"):
        raise ValueError(f"metric={metric!r}: choose 'lenient' or 'strict'")
    by = (by,) if isinstance(by, str) else tuple(by)
    cells = defaultdict(list)
    for r in records:
        cells[tuple(r.get(k, UNKNOWN) for k in by)].append(r)
    rows = []
    for key, rs in sorted(cells.items(), key=lambda item: tuple(map(_sort_key, item[0]))):
        correct = sum(bool(r[metric]) for r in rs)
        low, high = wilson_interval(correct, len(rs))
        rows.append(dict(zip(by, key), n=len(rs), correct=correct, accuracy=correct / len(rs), low=low, high=high))
        if all("gold_mass" in r for r in rs):
            rows[-1]["gold_mass"] = sum(sum(r["gold_mass"]) / len(r["gold_mass"]) for r in rs) / len(rs)
    return rows


def _sort_key(value):
    """Numbers in order, gold positions in reading order (first, middle, last), then strings, None last."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, str):
        return (1, GOLD_POSITIONS.index(value) if value in GOLD_POSITIONS else len(GOLD_POSITIONS), value)
    return (0, value, "")


def attention_by_layer(records: list[dict]) -> dict:
    """Per layer, the mean over records of the attention mass on gold and on distractor documents:
    in total (``gold``, ``distractors``) and per document (``*_per_doc``, the fair comparison)."""
    keys = {"gold": "gold_mass", "distractors": "distractor_mass",
            "gold_per_doc": "gold_mass_per_doc", "distractors_per_doc": "distractor_mass_per_doc"}
    vals = {name: [r[key] for r in records if r.get(key) is not None] for name, key in keys.items()}
    return {name: torch.tensor(v).mean(0).tolist() if v else None for name, v in vals.items()}


def gold_attention_ratio(records: list[dict]) -> float | None:
    """Per document, attention on gold over on a distractor (layer means, noisy records); None without noisy ones."""
    noisy = [r for r in records if r.get("distractor_mass_per_doc") is not None]
    if not noisy:
        return None
    layers = attention_by_layer(noisy)
    return float(torch.tensor(layers["gold_per_doc"]).mean() / torch.tensor(layers["distractors_per_doc"]).mean())


def format_grid(grid: list[dict], rows: str = "noise_ratio", cols: str = "gold_position", title: str = "") -> str:
    """A text table: a line per ``rows`` value, a column per ``cols`` value (``acc% [low-high] (n)``), attn on gold."""
    row_vals, col_vals = (list(dict.fromkeys(r[k] for r in grid)) for k in (rows, cols))
    cell = {(r[rows], r[cols]): r for r in grid}
    lines = [title] * bool(title) + [f"{rows:>12} | " + " | ".join(f"{c!s:^20}" for c in col_vals) + " | attn on gold"]
    lines.append("-" * len(lines[-1]))
    for rv in row_vals:
        found = [cell.get((rv, cv)) for cv in col_vals]
        parts = [f"{percent(r)} ({r['n']})".center(20) if r else " " * 20 for r in found]
        masses = [(r["gold_mass"], r["n"]) for r in found if r and "gold_mass" in r]
        mass = sum(m * n for m, n in masses) / sum(n for _, n in masses) if masses else float("nan")
        lines.append(f"{str(rv):>12} | " + " | ".join(parts) + f" | {mass:.3f}")
    return "\n".join(lines)


def select_per_cell(examples: list[dict], n: int, by=("noise_ratio", "gold_position")) -> list[dict]:
    """The first ``n`` examples of every cell (deterministic, balanced); a missing field is "unknown"."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one example per cell")
    counts, chosen = defaultdict(int), []
    for ex in examples:
        key = tuple(ex.get(k, UNKNOWN) for k in by)
        if counts[key] < n:
            counts[key] += 1
            chosen.append(ex)
    return chosen


def paired(base_records: list[dict], other_records: list[dict], metric: str = "lenient") -> dict:
    """Question by question against base (same questions, same order): how many a method fixes and
    breaks, and ``p_value``, the exact two-sided sign test (McNemar) on those discordant questions."""
    if [r["id"] for r in base_records] != [r["id"] for r in other_records]:
        raise ValueError("paired() needs the same questions in the same order for both methods")
    fixed = sum(bool(o[metric]) and not b[metric] for b, o in zip(base_records, other_records))
    broken = sum(bool(b[metric]) and not o[metric] for b, o in zip(base_records, other_records))
    n, k = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail)}


def save_json(obj, path) -> Path:
    """Write ``obj`` as indented JSON (other numbers, e.g. numpy's, as floats), creating the folder."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=float))
    return path
