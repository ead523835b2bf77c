"""Noisy-context QA: a synthetic benchmark with hard distractors, JSONL files, and prompts.

An example is a list of short documents and a question that exactly one of them answers (two, chained, for 2-hop).
Distractors are *hard*: the same template about other people with other answers, so only the name tells the gold
document apart. First names come in two disjoint pools, "train" and "test" (word lists: ``data/phrasings.json``).
Families: "default" (one template per relation), "varied" (three phrasings, two-sentence documents with a filler:
the training recipe's synthetic half) and "heldout" (relations, phrasings and fillers training never sees:
``test_heldout``). Noise ratio r means ``round(1/(1-r)) - 1`` distractors per gold document. Schema: ``data/README.md``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_WORDS = json.loads((DATA_DIR / "phrasings.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Relation:
    """One relation: fact phrasings ({name}, {value}; the first is the default template), questions ({name}), values."""
    name: str
    facts: tuple[str, ...]
    questions: tuple[str, ...]
    values: tuple[str, ...]


def _relations(table: dict, phrasings: int | None = None) -> dict[str, Relation]:
    return {name: Relation(name, tuple(r["facts"][:phrasings]), tuple(r["questions"][:phrasings]),
                           tuple(r["values"])) for name, r in table.items()}


FIRST_NAMES = {split: tuple(names) for split, names in _WORDS["first_names"].items()}
LAST_NAMES = tuple(_WORDS["last_names"])
SPLITS = tuple(FIRST_NAMES)
RELATIONS = _relations(_WORDS["relations"], 1)  # default family: one template each
VARIED_RELATIONS = _relations(_WORDS["relations"])  # the same six, three phrasings each
HELDOUT_RELATIONS = _relations(_WORDS["heldout_relations"])
FILLERS, TRAIN_FILLERS = tuple(_WORDS["fillers"]), tuple(_WORDS["train_fillers"])  # heldout, varied
# 2-hop questions go through a bridge person: "A works with B." + "B lives in Paris."
BRIDGE_FACT, BRIDGE_SUBJECT = _WORDS["bridge"]["fact"], _WORDS["bridge"]["subject"]
FAMILIES, GOLD_POSITIONS = ("default", "heldout", "varied"), ("first", "middle", "last", "random")
HELDOUT_SEED = 4234  # data/test_heldout.jsonl (test first names); a cell's seed adds its distractor count
HELDOUT_VALIDATION_SEED = 14234  # heldout_set("train"): the validation variant


def full_names(split: str) -> list[str]:
    """Every "First Last" name of a split (900 test, 1200 train)."""
    return [f"{first} {last}" for first in FIRST_NAMES[split] for last in LAST_NAMES]


def distractors_for_noise_ratio(noise_ratio: float) -> int:
    """OpAmp's noise ratio r (the noisy fraction of documents) -> ``round(1/(1-r)) - 1`` distractors per gold document
    (``round`` sends halves to even: r = 0.6 gives 1)."""
    if not 0 <= noise_ratio < 1:
        raise ValueError(f"noise_ratio must be in [0, 1), got {noise_ratio!r}")
    return round(1 / (1 - noise_ratio)) - 1


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}")


def generate(n: int, *, num_distractors: int | None = None, noise_ratio: float | None = None,
             gold_position: str = "random", hops: int = 1, split: str = "train", seed: int = 0,
             relations=None, family: str = "default") -> list[dict]:
    """``n`` noisy-context QA examples, the same ones for the same arguments.

    num_distractors per gold document (default 0), or ``noise_ratio`` instead. gold_position: "first", "middle"
    (index ``(n_docs - n_gold) // 2``), "last" or "random". hops: 1, or 2 through a bridge person (the gold chain's
    two documents side by side; phrased families: 1 only). split: the pool of first names. relations: cycled through
    (default: all of the family's)."""
    if num_distractors is not None and noise_ratio is not None:
        raise ValueError("give num_distractors or noise_ratio, not both")
    k = distractors_for_noise_ratio(noise_ratio) if noise_ratio is not None else num_distractors or 0
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"num_distractors must be a non-negative integer, got {k!r}")
    for name, value, allowed in [("gold_position", gold_position, GOLD_POSITIONS), ("hops", hops, (1, 2)),
                                 ("split", split, SPLITS), ("family", family, FAMILIES)]:
        _check_choice(name, value, allowed)
    phrased = family != "default"
    if phrased and hops != 1:
        raise ValueError(f"hops={hops!r}: the {family} family has 1-hop questions only")
    table = {"default": RELATIONS, "varied": VARIED_RELATIONS, "heldout": HELDOUT_RELATIONS}[family]
    relations = [relations] if isinstance(relations, str) else list(table if relations is None else relations)
    if not relations:
        raise ValueError("relations is empty: give at least one of " + ", ".join(table))
    for r in relations:
        _check_choice("relation", r, tuple(table))
    # phrased: distinct first and last names in an example; 2-hop: two names per chain
    names = (len(FIRST_NAMES[split]), len(LAST_NAMES)) if phrased else (len(full_names(split)) // hops,)
    most = min(*names, *(len(table[r].values) for r in relations))
    if k > most - 1:
        raise ValueError(f"num_distractors={k} is more than the lists allow for {family} relations {relations} "
                         f"with hops={hops}: at most {most - 1}")
    rng, fillers, examples = random.Random(seed), FILLERS if family == "heldout" else TRAIN_FILLERS, []
    make = _phrased if phrased else _one_hop if hops == 1 else _two_hop
    for i in range(n):
        relation = table[relations[i % len(relations)]]
        gold_docs, distractors, question, answer = make(rng, relation, split, k, fillers)
        documents, gold = _place(gold_docs, distractors, gold_position, rng)
        examples.append({
            "id": f"{split}-{family + '-' if phrased else ''}{hops}hop-d{k}-{gold_position}-s{seed}-{i}",
            "documents": documents, "gold": gold, "question": question, "answers": [answer], "hops": hops,
            "relation": relation.name, "num_distractors": k,
            "noise_ratio": None if noise_ratio is None else float(noise_ratio), "gold_position": gold_position,
            "split": split, "seed": seed, **({"family": family} if phrased else {})})
    return examples


def _one_hop(rng: random.Random, relation: Relation, split: str, k: int, fillers=None):
    """k + 1 people, k + 1 distinct values, one fact each; the first one is asked about."""
    people, values = rng.sample(full_names(split), k + 1), rng.sample(relation.values, k + 1)
    facts = [relation.facts[0].format(name=p, value=v) for p, v in zip(people, values)]
    return facts[:1], facts[1:], relation.questions[0].format(name=people[0]), values[0]


def _two_hop(rng: random.Random, relation: Relation, split: str, k: int, fillers=None):
    """k + 1 chains "A works with B." + "B <relation> v."; the first is asked about. Every distractor is half of a
    complete chain, so the model has to start from the name asked about."""
    people, values = rng.sample(full_names(split), 2 * (k + 1)), rng.sample(relation.values, k + 1)
    subjects, bridges = people[: k + 1], people[k + 1 :]
    bridge_facts = [BRIDGE_FACT.format(name=s, other=b) for s, b in zip(subjects, bridges)]
    facts = [relation.facts[0].format(name=b, value=v) for b, v in zip(bridges, values)]
    distractors = bridge_facts[1:] + facts[1:]
    rng.shuffle(distractors)
    question = relation.questions[0].format(name=BRIDGE_SUBJECT.format(name=subjects[0]))
    return [bridge_facts[0], facts[0]], distractors, question, values[0]


def _phrased(rng: random.Random, relation: Relation, split: str, k: int, fillers):
    """k + 1 people (distinct first and last names), one two-sentence document each: a fact phrasing and a filler in
    a drawn order (full name first, then first name). The first person is asked about, in a drawn phrasing."""
    firsts, lasts = rng.sample(FIRST_NAMES[split], k + 1), rng.sample(LAST_NAMES, k + 1)
    values = rng.sample(relation.values, k + 1)
    docs = []
    for first, last, value in zip(firsts, lasts, values):
        fact, filler = rng.choice(relation.facts), rng.choice(fillers)
        if rng.random() < 0.5:  # filler first
            docs.append(f"{filler.format(name=f'{first} {last}')} {fact.format(name=first, value=value)}")
        else:
            docs.append(f"{fact.format(name=f'{first} {last}', value=value)} {filler.format(name=first)}")
    question = rng.choice(relation.questions).format(name=f"{firsts[0]} {lasts[0]}")
    return docs[:1], docs[1:], question, values[0]


def _place(gold_docs: list[str], distractors: list[str], position: str, rng: random.Random):
    """Insert the gold documents, as one block, into the distractors: ``(documents, gold)``."""
    slots = len(distractors)  # the block can start at 0 .. slots
    start = rng.randint(0, slots) if position == "random" else dict(first=0, middle=slots // 2, last=slots)[position]
    return distractors[:start] + gold_docs + distractors[start:], list(range(start, start + len(gold_docs)))


def heldout_set(split: str = "test", *, per_cell: int = 30, seed: int | None = None) -> list[dict]:
    """The held-out grid in ``test_1hop``'s layout (noise 0: one "first" cell; 0.5, 0.8, 0.9 x first/middle/last;
    ``per_cell`` each). "test": ``data/test_heldout.jsonl``; "train": its validation variant, for choosing settings."""
    _check_choice("split", split, SPLITS)
    seed = (HELDOUT_SEED if split == "test" else HELDOUT_VALIDATION_SEED) if seed is None else seed
    relations, examples = list(HELDOUT_RELATIONS), []
    for level, r in enumerate((0.0, 0.5, 0.8, 0.9)):
        k, start = distractors_for_noise_ratio(r), level * per_cell % len(relations)  # relations cycle on across levels
        for position in (("first", "middle", "last") if k else ("first",)):
            examples += generate(per_cell, noise_ratio=r, gold_position=position, split=split, seed=seed + k,
                                 relations=relations[start:] + relations[:start], family="heldout")
    return examples


# field -> type(s); id, documents, gold, question, answers are required, the others checked when present
SCHEMA = {"id": str, "documents": list, "gold": list, "question": str, "answers": list, "hops": int,
          "relation": str, "num_distractors": int, "noise_ratio": (float, int, type(None)), "gold_position": str,
          "split": str, "seed": int, "family": str, "source": str}
REQUIRED_FIELDS = ("id", "documents", "gold", "question", "answers")


def validate_example(ex) -> None:
    """Raise ValueError naming the first missing or invalid field of an example dict."""
    if not isinstance(ex, dict):
        raise ValueError(f"expected a JSON object, got {type(ex).__name__}")
    for field, types in SCHEMA.items():
        if field not in ex:
            if field in REQUIRED_FIELDS:
                raise ValueError(f"missing field {field!r} (data/README.md has the schema)")
        elif isinstance(ex[field], bool) or not isinstance(ex[field], types):  # a bool is no count
            raise ValueError(f"field {field!r} must be {getattr(types, '__name__', 'a number or null')}, "
                             f"got {ex[field]!r}")
    docs, gold, hops = ex["documents"], ex["gold"], ex.get("hops")
    strings = "must be a non-empty list of non-empty strings"
    for field, ok, why in [
        ("documents", docs and all(isinstance(d, str) and d.strip() for d in docs), strings),
        ("gold", gold and all(type(g) is int and 0 <= g < len(docs) for g in gold),
         f"must be a non-empty list of indices in [0, {len(docs)})"),
        ("answers", ex["answers"] and all(isinstance(a, str) and a.strip() for a in ex["answers"]), strings),
        ("hops", hops in (None, 1, 2), "must be 1 or 2"),
        ("gold", hops is None or len(gold) == hops, f"must hold one index per hop ({hops})"),
        ("num_distractors", ex.get("num_distractors", 0) >= 0, "must be >= 0"),
        ("noise_ratio", ex.get("noise_ratio") is None or 0 <= ex["noise_ratio"] < 1, "must be in [0, 1) or null"),
        ("gold_position", ex.get("gold_position", "first") in GOLD_POSITIONS, f"must be one of {GOLD_POSITIONS}"),
        ("split", ex.get("split", "test") in SPLITS, f"must be one of {SPLITS}"),
        ("family", ex.get("family", "default") in FAMILIES, f"must be one of {FAMILIES}"),
    ]:
        if not ok:
            raise ValueError(f"field {field!r} {why}, got {ex[field]!r}")


def write_jsonl(examples: list[dict], path) -> Path:
    """Write one example per line (each one validated first)."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    for i, ex in enumerate(examples):
        try:
            validate_example(ex)
        except ValueError as err:
            raise ValueError(f"example {i} ({ex.get('id', '?')}): {err}") from None
    path.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples), encoding="utf-8")
    return path


def read_jsonl(path) -> list[dict]:
    """Read and validate a JSONL test set; errors name the file, the line and the field."""
    path, examples = Path(path), []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():  # blank lines are not examples
                try:
                    examples.append(json.loads(line))
                    validate_example(examples[-1])
                except ValueError as err:  # json.JSONDecodeError is a ValueError too
                    raise ValueError(f"{path}, line {lineno}: {err}") from None
    if not examples:
        raise ValueError(f"{path} is an empty test set")
    return examples


def load_test_set(name_or_path) -> list[dict]:
    """A shipped test set by name (test_1hop, test_2hop, test_distractors, test_heldout, test_nq), or a path."""
    shipped = DATA_DIR / f"{name_or_path}.jsonl"
    if isinstance(name_or_path, str) and "/" not in name_or_path and shipped.exists():
        return read_jsonl(shipped)
    if not Path(name_or_path).exists():
        names = sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))
        raise FileNotFoundError(f"no test set {str(name_or_path)!r}: not a file, nor one of {names}")
    return read_jsonl(name_or_path)


def _words(text: str) -> str:
    """The lower-cased words of a text, space-separated, with a space on either side."""
    return " " + " ".join(re.findall(r"\w+", text.lower())) + " "


def nq_examples(part: str, n: int | None = None, noise_ratios=(0.0, 0.5, 0.8), seed: int = 0) -> list[dict]:
    """Natural Questions of ``data/nq_trainval.jsonl`` with their passage, for training (``part="train"``) or choosing
    hyper-parameters (``"validation"``). Example i takes noise ratio ``noise_ratios[i % len]``; its distractors are the
    passages of the same part that share the most words with the question and mention no answer. Gold position drawn;
    ``n``: default all."""
    _check_choice("part", part, ("train", "validation"))
    rows = read_jsonl(DATA_DIR / "nq_trainval.jsonl")  # one gold passage per question, disjoint from test_nq
    rows = [r for i, r in enumerate(rows) if (i % 6 == 0) == (part == "validation")]  # every 6th: validation
    rng, examples = random.Random(seed), []
    order = rng.sample(range(len(rows)), len(rows))[: n or len(rows)]
    passages = [r["documents"][0] for r in rows]
    texts = [_words(p) for p in passages]
    word_sets = [set(w.split()) for w in texts]
    for i, q in enumerate(order):
        row, ratio = rows[q], noise_ratios[i % len(noise_ratios)]
        answers, asked = [a for a in map(_words, row["answers"]) if a.strip()], set(_words(row["question"]).split())
        candidates = [j for j in range(len(rows)) if j != q and not any(a in texts[j] for a in answers)]
        candidates.sort(key=lambda j: -len(asked & word_sets[j]))
        k = distractors_for_noise_ratio(ratio)
        documents, gold = _place([passages[q]], [passages[j] for j in candidates[:k]], "random", rng)
        examples.append({"id": f"nq-{part}-d{k}-s{seed}-{i}", "documents": documents, "gold": gold,
                         "question": row["question"], "answers": row["answers"], "hops": 1, "num_distractors": k,
                         "noise_ratio": float(ratio), "gold_position": "random", "split": "train",
                         "source": "nq-open"})
    return examples


INSTRUCTION = "Answer the question using the documents. Reply with the answer only."


@dataclass
class Prompt:
    """A tokenized prompt and where its parts are, as token ranges [start, end)."""
    input_ids: torch.Tensor  # (T,) long
    text: str  # the chat-templated string
    doc_spans: list[tuple[int, int]]  # one per document
    question_span: tuple[int, int]


def build_prompt(tokenizer, example: dict, *, system: str | None = None) -> Prompt:
    """Chat-template the example and find each document's tokens: those whose character offsets overlap the document's
    (a token may carry the space before it: ``decode(ids[s:e]).strip() == document``). Needs a fast tokenizer."""
    message, doc_chars = INSTRUCTION + "\n\nDocuments:\n", []  # doc_chars: character spans
    for i, doc in enumerate(example["documents"], start=1):
        message += f"[{i}] "
        doc_chars.append((len(message), len(message) + len(doc)))
        message += doc + "\n"
    message += "\nQuestion: "
    question_chars = (len(message), len(message) + len(example["question"]))
    message += example["question"]
    messages = [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": message}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    shift = text.find(message)
    if shift < 0:
        raise ValueError("the chat template changed the user message; cannot locate the documents")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = []
    for a, b in doc_chars + [question_chars]:  # the tokens whose character offsets overlap [a, b)
        inside = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if s < b + shift and e > a + shift]
        spans.append((inside[0], inside[-1] + 1))
    return Prompt(torch.tensor(enc["input_ids"], dtype=torch.long), text, spans[:-1], spans[-1])


def build_batch(tokenizer, examples: list[dict], *, system: str | None = None):
    """Left-padded batch for generation: ``(input_ids, attention_mask, doc_spans)``; input_ids and
    attention_mask are (B, T), doc_spans[b] row b's document spans shifted by its padding."""
    prompts = [build_prompt(tokenizer, ex, system=system) for ex in examples]
    T = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), T), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
    pads = [T - len(p.input_ids) for p in prompts]
    for b, (p, pad) in enumerate(zip(prompts, pads)):
        input_ids[b, pad:], attention_mask[b, pad:] = p.input_ids, 1
    return input_ids, attention_mask, [[(s + pad, e + pad) for s, e in p.doc_spans] for p, pad in zip(prompts, pads)]
