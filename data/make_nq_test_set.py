"""Write data/test_nq.jsonl (real text) and data/nq_trainval.jsonl from nq-open-oracle.

    python data/make_nq_test_set.py [--source PATH] [--out DIR]

The source is nq-open-oracle (dev half) from the Lost in the Middle repository
(github.com/nelson-liu/lost-in-the-middle, MIT): 1,325 Natural Questions (Kwiatkowski et al.,
2019, CC BY-SA 3.0) with the Wikipedia passage (CC BY-SA) that answers each, one JSON object
per line, ``{"question", "answers", "ctxs": [{"title", "text", ...}], ...}``, gzipped.
The files written from it are under CC BY-SA (see data/README.md).

Everything is deterministic (seed ``SEED``):

* A document is ``"Title: text"`` with the text cut to its first ``MAX_WORDS`` words.
* "Contains an answer": after the scorer's normalisation (``normalize_answer``; the text is
  also split at every non-word character), some answer is a run of whole words of the text.
* The split: the questions whose gold document contains one of their answers and whose
  passage no other question shares are shuffled with
  ``random.Random(SEED)``; the first 30 go to noise ratio 0, the next 30 to 0.5, then 0.8,
  then 0.9 (120 test questions). Every other question (1,205) is the train/validation part.
* Distractors (retrieval-like, hard): the gold passages of *other* questions, ranked by the
  summed IDF of the question's words (lower-cased, stop words removed) that they contain,
  ties to the lower source line; a passage that contains any of the question's answers
  (in its title or anywhere in its full text), or repeats a passage already taken, is skipped.
  They keep their rank order in the document list (most similar first); the gold document
  goes first, in the middle (index k // 2) or last.
* test_nq.jsonl: test_1hop's layout: noise ratio 0 (0 distractors, one "first" cell) and
  0.5, 0.8, 0.9 (1, 4, 9 distractors) x first/middle/last, 30 per cell, 300 examples; the
  first/middle/last cells of one ratio hold the same 30 questions and documents, reordered.
  Test distractors come from all 1,325 passages.
* nq_trainval.jsonl: the 1,205 other questions, each with its gold document only
  (noise ratio 0), split "train". Their distractors, when wanted, come from this part alone
  (``trainval_examples(rows, num_distractors=k)``), so no test passage ever reaches training.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from minimal.data import write_jsonl  # noqa: E402
from minimal.evaluate import normalize_answer  # noqa: E402

# The source file: nq-open-oracle (dev half) from the Lost in the Middle repository. Give its path with
# --source, or in $NQ_OPEN_ORACLE (the test that regenerates the shipped files reads it from there).
SOURCE_ENV = "NQ_OPEN_ORACLE"
SEED = 5234
MAX_WORDS = 100
PER_CELL = 30
NOISE_RATIOS = {0.0: 0, 0.5: 1, 0.8: 4, 0.9: 9}  # noise ratio -> distractors (OpAmp's rule)
POSITIONS = ("first", "middle", "last")

STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he her here hers him his how i if in into is it its itself just me more
most my no nor not now of off on once only or other our out over own same she should so some
such than that the their them then there these they this those through to too under until up
very was we were what when where which while who whom whose why will with would you your
s t get got gets also much many one first last name called
""".split())


# ----------------------------------------------------------------------------- the source


def load_source(path) -> list[dict]:
    """One row per source line: question, answers, title, text (the gold passage, in full)."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                ctx = r["ctxs"][0]
                rows.append(dict(question=r["question"], answers=list(r["answers"]),
                                 title=ctx["title"], text=ctx["text"]))
    return rows


def answer_words(text: str) -> str:
    """The scorer's ``normalize_answer``, then split at every non-word character too (so
    "1998–99" holds "1998"), as one string with a space on either side."""
    return " " + " ".join(re.split(r"\W+", normalize_answer(text))).strip() + " "


def contains_answer(text: str, answers: list[str]) -> bool:
    """A normalised answer is a run of whole words of the normalised text. (Whole words: a
    plain substring test would find the answer "S" in nearly every passage.)"""
    text = answer_words(text)
    return any((a := answer_words(answer)).strip() and a in text for answer in answers)


def document(row: dict, max_words: int = MAX_WORDS) -> str:
    """``"Title: text"``, the text cut to its first ``max_words`` words."""
    return f"{row['title']}: {' '.join(row['text'].split()[:max_words])}"


def words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP_WORDS}


class Retriever:
    """Ranks passages (title + full text) by the summed IDF of the query words they contain."""

    def __init__(self, rows: list[dict], pool: list[int]):
        self.pool = list(pool)
        self.words = {i: words(rows[i]["title"] + " " + rows[i]["text"]) for i in self.pool}
        df = Counter(w for i in self.pool for w in self.words[i])
        self.idf = {w: math.log(len(self.pool) / n) for w, n in df.items()}

    def rank(self, query: str) -> list[int]:
        q = words(query)
        scores = {i: sum(self.idf[w] for w in q & self.words[i]) for i in self.pool}
        return sorted(self.pool, key=lambda i: (-scores[i], i))


def distractors(rows: list[dict], i: int, k: int, retriever: Retriever) -> list[int]:
    """The k best-ranked other passages that hold none of question i's answers, no repeats."""
    gold = rows[i]
    seen, chosen = {(gold["title"], gold["text"])}, []
    for j in retriever.rank(gold["question"]):
        if len(chosen) == k:
            break
        key = (rows[j]["title"], rows[j]["text"])
        if j == i or key in seen or contains_answer(rows[j]["title"] + " " + rows[j]["text"], gold["answers"]):
            continue
        seen.add(key)
        chosen.append(j)
    if len(chosen) < k:
        raise ValueError(f"question {i}: only {len(chosen)} distractors, {k} wanted")
    return chosen


def example(rows, i, distractor_ids, position, *, id, split, noise_ratio=None) -> dict:
    """One example in the schema of data/README.md (no relation, no seed)."""
    docs = [document(rows[j]) for j in distractor_ids]
    start = {"first": 0, "middle": len(docs) // 2, "last": len(docs)}[position]
    docs.insert(start, document(rows[i]))
    return {
        "id": id, "documents": docs, "gold": [start], "question": rows[i]["question"],
        "answers": rows[i]["answers"], "hops": 1, "num_distractors": len(distractor_ids),
        "noise_ratio": noise_ratio, "gold_position": position, "split": split, "source": "nq-open",
    }


# ----------------------------------------------------------------------------- the split and the files


def split_questions(rows: list[dict], seed: int = SEED, per_cell: int = PER_CELL):
    """(test, trainval): test maps each noise ratio to its ``per_cell`` source indices;
    trainval lists every other index, in source order. Disjoint, deterministic."""
    passages = Counter((r["title"], r["text"]) for r in rows)
    eligible = [i for i, r in enumerate(rows)
                if passages[(r["title"], r["text"])] == 1 and contains_answer(document(r), r["answers"])]
    random.Random(seed).shuffle(eligible)
    test = {r: eligible[n * per_cell:(n + 1) * per_cell] for n, r in enumerate(NOISE_RATIOS)}
    taken = {i for ids in test.values() for i in ids}
    return test, [i for i in range(len(rows)) if i not in taken]


def test_examples(rows: list[dict], seed: int = SEED, per_cell: int = PER_CELL) -> list[dict]:
    """test_nq.jsonl: test_1hop's cell layout, distractors drawn from every passage."""
    test, _ = split_questions(rows, seed, per_cell)
    retriever = Retriever(rows, range(len(rows)))
    examples = []
    for ratio, ids in test.items():
        k = NOISE_RATIOS[ratio]
        chosen = {i: distractors(rows, i, k, retriever) for i in ids}
        for position in POSITIONS if k else ("first",):
            examples += [example(rows, i, chosen[i], position, id=f"nq-test-d{k}-{position}-q{i}",
                                 split="test", noise_ratio=ratio) for i in ids]
    return examples


def trainval_examples(rows: list[dict], seed: int = SEED, num_distractors: int = 0,
                      gold_position: str = "first") -> list[dict]:
    """The train/validation part, one example per question; distractors (if any) from this
    part's passages only. gold_position "random" draws with ``random.Random(seed)``."""
    _, ids = split_questions(rows, seed)
    retriever = Retriever(rows, ids) if num_distractors else None
    rng, examples = random.Random(seed), []
    for i in ids:
        chosen = distractors(rows, i, num_distractors, retriever) if num_distractors else []
        position = rng.choice(POSITIONS) if gold_position == "random" else gold_position
        ex = example(rows, i, chosen, position, id=f"nq-trainval-d{num_distractors}-q{i}", split="train",
                     noise_ratio=0.0 if num_distractors == 0 else None)
        if gold_position == "random":
            ex["gold_position"] = "random"
        examples.append(ex)
    return examples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=os.environ.get(SOURCE_ENV), required=SOURCE_ENV not in os.environ,
                        help=f"nq-open-oracle (dev half) .jsonl.gz (default: ${SOURCE_ENV})")
    parser.add_argument("--out", default=str(HERE), help="folder for the two files (default: %(default)s)")
    args = parser.parse_args(argv)
    rows = load_source(args.source)
    out = Path(args.out)
    for name, examples in (("test_nq", test_examples(rows)), ("nq_trainval", trainval_examples(rows))):
        path = write_jsonl(examples, out / f"{name}.jsonl")
        print(f"{path.name}: {len(examples)} examples, {len({e['question'] for e in examples})} questions")


if __name__ == "__main__":
    main()
