"""The noisy-context QA data: generation, JSONL files, and prompt token spans."""

import json
import re

import pytest

from minimal import data
from minimal.data import (
    DATA_DIR, FIRST_NAMES, LAST_NAMES, RELATIONS, build_batch, build_prompt,
    distractors_for_noise_ratio, generate, load_test_set, read_jsonl, write_jsonl,
)

SHIPPED = ("test_1hop", "test_2hop", "test_distractors")


@pytest.fixture(scope="module")
def tokenizer():
    from minimal.models import load_tokenizer

    return load_tokenizer()


def names_in(text: str, split: str) -> set[str]:
    """The "First Last" names of a split that occur in a text."""
    pattern = r"\b(%s) (%s)\b" % ("|".join(FIRST_NAMES[split]), "|".join(LAST_NAMES))
    return {m.group(0) for m in re.finditer(pattern, text)}


def has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


# ---- generation -------------------------------------------------------------------------


def test_deterministic_for_a_seed():
    kw = dict(num_distractors=3, hops=2, split="test")
    assert generate(12, seed=7, **kw) == generate(12, seed=7, **kw)
    assert generate(12, seed=7, **kw) != generate(12, seed=8, **kw)
    assert generate(5, seed=7, **kw) == generate(12, seed=7, **kw)[:5]


@pytest.mark.parametrize("r, k", [(0, 0), (0.5, 1), (0.8, 4), (0.9, 9)])
def test_noise_ratio_gives_distractor_count(r, k):
    assert distractors_for_noise_ratio(r) == k
    for hops in (1, 2):
        ex = generate(3, noise_ratio=r, hops=hops, seed=1)
        for e in ex:
            assert e["num_distractors"] == k and e["noise_ratio"] == r
            assert len(e["documents"]) == hops * (k + 1)


@pytest.mark.parametrize("hops", [1, 2])
def test_distractors_are_hard(hops):
    for ex in generate(60, num_distractors=7, hops=hops, split="test", seed=3):
        relation = RELATIONS[ex["relation"]]
        template = re.compile("^" + re.escape(relation.facts[0]).replace(r"\{name\}", "(.+)").replace(r"\{value\}", "(.+)") + "$")
        bridge = re.compile(r"^(.+) works with (.+)\.$")
        facts = [template.match(d) for d in ex["documents"]]
        values = [m.group(2) for m in facts if m]
        assert len(values) == 8 and len(set(values)) == 8  # same template, distinct answers
        assert sum(bool(bridge.match(d)) for d in ex["documents"]) == (8 if hops == 2 else 0)
        answer = ex["answers"][0]
        for i, doc in enumerate(ex["documents"]):
            assert has_word(doc, answer) == (i == ex["gold"][-1]), (doc, answer)
        assert len(set(ex["documents"])) == len(ex["documents"])


def test_word_pools_do_not_collide():
    """No name is also an answer value, so an answer word only shows up where it is meant to."""
    words = [w.lower() for split in FIRST_NAMES for w in FIRST_NAMES[split]] + [w.lower() for w in LAST_NAMES]
    for r in RELATIONS.values():
        words += [v.lower() for v in r.values]
        assert len(set(r.values)) == len(r.values) >= 40
    assert len(words) == len(set(words))
    assert not set(FIRST_NAMES["train"]) & set(FIRST_NAMES["test"])


def test_gold_position():
    for hops in (1, 2):
        for ex in generate(6, num_distractors=4, hops=hops, gold_position="first", seed=0):
            assert ex["gold"] == list(range(hops))
        for ex in generate(6, num_distractors=4, hops=hops, gold_position="last", seed=0):
            n = len(ex["documents"])
            assert ex["gold"] == list(range(n - hops, n))
        for ex in generate(6, num_distractors=4, hops=hops, gold_position="middle", seed=0):
            n = len(ex["documents"])
            start = (n - hops) // 2
            assert ex["gold"] == list(range(start, start + hops))
    starts = {ex["gold"][0] for ex in generate(100, num_distractors=4, gold_position="random", seed=0)}
    assert starts == set(range(5))


def test_positions_with_the_same_seed_only_reorder():
    a, b = (generate(6, num_distractors=3, gold_position=p, seed=2) for p in ("first", "last"))
    for x, y in zip(a, b):
        assert x["question"] == y["question"] and sorted(x["documents"]) == sorted(y["documents"])


def test_two_hop_structure():
    for ex in generate(30, num_distractors=3, hops=2, split="test", seed=4):
        bridge_doc, fact_doc = (ex["documents"][i] for i in ex["gold"])
        m = re.fullmatch(r"(\w+ \w+) works with (\w+ \w+)\.", bridge_doc)
        subject, colleague = m.groups()
        assert fact_doc.startswith((colleague + " ", colleague + "'s ")) and ex["answers"][0] in fact_doc
        assert f"the colleague of {subject}" in ex["question"]
        assert colleague not in ex["question"]
        # the subject appears in one document only; every attribute holder is someone's colleague
        assert sum(subject in d for d in ex["documents"]) == 1
        bridges = [re.fullmatch(r"(.+) works with (.+)\.", d) for d in ex["documents"]]
        colleagues = {m.group(2) for m in bridges if m}
        holders = {" ".join(d.split()[:2]).removesuffix("'s") for d, m in zip(ex["documents"], bridges) if not m}
        assert holders == colleagues and len(colleagues) == 4


def test_train_and_test_entities_are_disjoint():
    train = set()
    for hops in (1, 2):
        for ex in generate(400, num_distractors=7, hops=hops, split="train", seed=99):
            train |= names_in(" ".join(ex["documents"]) + ex["question"], "train")
            assert not names_in(" ".join(ex["documents"]), "test")
    assert len(train) > 900  # a large sample of the 1200 train names
    for name in SHIPPED:
        for ex in load_test_set(name):
            text = " ".join(ex["documents"]) + " " + ex["question"]
            assert ex["split"] == "test"
            assert names_in(text, "test") and not names_in(text, "train")
            assert not names_in(text, "test") & train


# ---- files ------------------------------------------------------------------------------


def test_shipped_files_validate():
    counts = {"test_1hop": 300, "test_2hop": 140, "test_distractors": 200}
    for name in SHIPPED:
        examples = load_test_set(name)
        assert len(examples) == counts[name]
        assert len({ex["id"] for ex in examples}) == len(examples)
        assert load_test_set(DATA_DIR / f"{name}.jsonl") == examples  # also by path
    cells = {(ex["noise_ratio"], ex["gold_position"]) for ex in load_test_set("test_1hop")}
    assert len(cells) == 10 and (0.0, "first") in cells
    counts = sorted({ex["num_distractors"] for ex in load_test_set("test_distractors")})
    assert counts == [0, 1, 3, 7, 15]


def test_jsonl_round_trip(tmp_path):
    examples = generate(5, noise_ratio=0.5, hops=2, seed=0)
    assert read_jsonl(write_jsonl(examples, tmp_path / "x.jsonl")) == examples


def test_read_jsonl_errors_name_line_and_field(tmp_path):
    good = [json.dumps(ex) for ex in generate(3, seed=0)]
    path = tmp_path / "bad.jsonl"

    def error_for(lines):
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError) as info:
            read_jsonl(path)
        return str(info.value)

    missing = json.loads(good[1])
    del missing["answers"]
    msg = error_for([good[0], json.dumps(missing), good[2]])
    assert "bad.jsonl" in msg and "line 2" in msg and "answers" in msg

    wrong = json.loads(good[0])
    wrong["gold"] = [5]
    msg = error_for([good[0], good[1], json.dumps(wrong)])
    assert "line 3" in msg and "gold" in msg

    wrong = dict(json.loads(good[0]), hops="1")
    assert "'hops'" in error_for([json.dumps(wrong)])
    assert "line 2" in error_for([good[0], "{not json"])

    path.write_text("\n")
    with pytest.raises(ValueError, match="empty test set"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="test_1hop"):
        load_test_set("no_such_set")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(noise_ratio=1.0), r"noise_ratio.*\[0, 1\)"),
        (dict(noise_ratio=-0.1), r"noise_ratio.*\[0, 1\)"),
        (dict(noise_ratio=0.5, num_distractors=1), "not both"),
        (dict(num_distractors=-1), "num_distractors"),
        (dict(num_distractors=40), "at most 39"),
        (dict(num_distractors=60, relations=["year"]), "at most 59"),
        (dict(gold_position="centre"), "gold_position.*'middle'"),
        (dict(hops=3), "hops=3.*1, 2"),
        (dict(split="dev"), "split='dev'.*'train', 'test'"),
        (dict(relations=["colour"]), "relation='colour'.*'city'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(1, **kwargs)


# ---- prompts ----------------------------------------------------------------------------


def prompt_examples():
    return (
        generate(3, num_distractors=0, seed=0)
        + generate(3, noise_ratio=0.9, hops=1, split="test", seed=1)
        + generate(3, num_distractors=15, seed=2)
        + generate(3, num_distractors=15, hops=2, split="test", seed=3)
    )


def test_prompt_spans_decode_to_documents(tokenizer):
    for ex in prompt_examples():
        p = build_prompt(tokenizer, ex)
        assert p.input_ids.ndim == 1 and p.input_ids.tolist() == tokenizer(p.text, add_special_tokens=False)["input_ids"]
        assert len(p.doc_spans) == len(ex["documents"])
        for (s, e), doc in zip(p.doc_spans, ex["documents"]):
            assert tokenizer.decode(p.input_ids[s:e]).strip() == doc
        s, e = p.question_span
        assert tokenizer.decode(p.input_ids[s:e]).strip() == ex["question"]
        ends = [e for _, e in p.doc_spans]
        assert all(a <= b for a, b in zip(ends, [s for s, _ in p.doc_spans[1:]]))  # in order, no overlap
        assert p.text.rstrip().endswith("assistant")  # generation prompt added


def test_system_prompt(tokenizer):
    ex = generate(1, num_distractors=2, seed=0)[0]
    p = build_prompt(tokenizer, ex, system="Be brief.")
    assert "Be brief." in p.text
    for (s, e), doc in zip(p.doc_spans, ex["documents"]):
        assert tokenizer.decode(p.input_ids[s:e]).strip() == doc


def test_batch_left_padding_keeps_spans(tokenizer):
    examples = prompt_examples()[::2]
    input_ids, attention_mask, spans = build_batch(tokenizer, examples)
    assert input_ids.shape == attention_mask.shape and input_ids.shape[0] == len(examples)
    for b, ex in enumerate(examples):
        p = build_prompt(tokenizer, ex)
        pad = input_ids.shape[1] - len(p.input_ids)
        assert attention_mask[b, :pad].sum() == 0 and attention_mask[b, pad:].all()
        assert (input_ids[b, :pad] == tokenizer.pad_token_id).all()
        assert input_ids[b, pad:].tolist() == p.input_ids.tolist()
        for (s, e), doc in zip(spans[b], ex["documents"]):
            assert tokenizer.decode(input_ids[b, s:e]).strip() == doc
    assert attention_mask[:, -1].all()  # left padding: every row ends with a real token


# ---- the held-out family ----------------------------------------------------------------

from collections import Counter  # noqa: E402

from minimal.data import FILLERS, HELDOUT_RELATIONS, heldout_set  # noqa: E402


def template_regex(template: str) -> re.Pattern:
    """A fact, question or filler template as a regex: {name} and {value} match anything."""
    pattern = re.escape(template).replace(r"\{name\}", ".+").replace(r"\{value\}", ".+")
    return re.compile(pattern)


HELDOUT_TEMPLATES = [t for r in HELDOUT_RELATIONS.values() for t in r.facts + r.questions] + list(FILLERS)


def test_heldout_never_in_training_data():
    """generate(split="train") (the default family) never makes a held-out relation, phrasing,
    filler sentence or value, whatever the seed, hops or noise."""
    patterns = [template_regex(t) for t in HELDOUT_TEMPLATES]
    values = {v for r in HELDOUT_RELATIONS.values() for v in r.values}
    assert not set(HELDOUT_RELATIONS) & set(RELATIONS)
    for seed in range(20):
        for hops in (1, 2):
            for ex in generate(30, num_distractors=7 + seed % 3, hops=hops, split="train", seed=seed):
                assert ex["relation"] in RELATIONS and "family" not in ex
                for text in ex["documents"] + [ex["question"]]:
                    assert not any(p.search(text) for p in patterns), text
                    assert not set(re.findall(r"\w+", text)) & values, text
                    assert text.count(". ") == 0  # one sentence per document, as before
    with pytest.raises(ValueError, match="relation='car'"):
        generate(1, split="train", relations=["car"])  # the default family knows no held-out relation
    with pytest.raises(ValueError, match="1-hop"):
        generate(1, family="heldout", hops=2)
    with pytest.raises(ValueError, match="family='other'"):
        generate(1, family="other")


def test_heldout_word_pools_do_not_collide():
    names = {w.lower() for split in FIRST_NAMES for w in FIRST_NAMES[split]} | {w.lower() for w in LAST_NAMES}
    train_values = {v.lower() for r in RELATIONS.values() for v in r.values}
    template_words = {w.lower() for t in HELDOUT_TEMPLATES for w in re.findall(r"[A-Za-z]+", t)}
    seen = set()
    for r in HELDOUT_RELATIONS.values():
        values = {v.lower() for v in r.values}
        assert len(values) == len(r.values) >= 30 and len(r.facts) >= 3 and len(r.questions) >= 3
        assert not values & (names | train_values | template_words | seen), r.name
        seen |= values


def sentences(doc: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", doc.strip()) if s]


def test_heldout_file_is_the_generator_output_and_has_the_layout():
    examples = load_test_set("test_heldout")
    assert examples == heldout_set("test")  # the file on disk equals a regeneration
    assert len(examples) == 300 and len({ex["id"] for ex in examples}) == 300
    cells = Counter((ex["noise_ratio"], ex["gold_position"]) for ex in examples)
    assert cells == {(0.0, "first"): 30, **{(r, p): 30 for r in (0.5, 0.8, 0.9) for p in ("first", "middle", "last")}}
    by_cell = {}
    for ex in examples:
        by_cell.setdefault((ex["noise_ratio"], ex["gold_position"]), []).append(ex)
    for r in (0.5, 0.8, 0.9):  # first/middle/last of one ratio: the same questions, reordered
        first, middle, last = (by_cell[(r, p)] for p in ("first", "middle", "last"))
        for a, b, c in zip(first, middle, last):
            assert a["question"] == b["question"] == c["question"]
            assert sorted(a["documents"]) == sorted(b["documents"]) == sorted(c["documents"])


def test_heldout_documents_and_phrasings():
    examples = load_test_set("test_heldout")
    facts = {t: template_regex(t) for r in HELDOUT_RELATIONS.values() for t in r.facts}
    questions = {t: re.compile("^" + template_regex(t).pattern + "$")
                 for r in HELDOUT_RELATIONS.values() for t in r.questions}
    fillers = [template_regex(t) for t in FILLERS]
    used_facts, used_questions, filler_first = set(), set(), set()
    for ex in examples:
        assert ex["relation"] in HELDOUT_RELATIONS and ex["family"] == "heldout" and ex["split"] == "test"
        text = " ".join(ex["documents"]) + " " + ex["question"]
        assert names_in(text, "test") and not names_in(text, "train")
        used_questions |= {t for t, p in questions.items() if p.match(ex["question"])}
        people = [sorted(names_in(d, "test")) for d in ex["documents"]]
        assert all(len(p) == 1 for p in people), ex["documents"]  # one person per document
        firsts = [p[0].split()[0] for p in people]
        assert len(set(firsts)) == len(firsts)  # distinct first names: "Alice ..." is never ambiguous
        answer = ex["answers"][0]
        for i, doc in enumerate(ex["documents"]):
            parts = sentences(doc)
            assert len(parts) == 2, doc  # more than one sentence: the fact and a filler
            fact = [t for t, p in facts.items() if any(p.fullmatch(s) for s in parts)]
            assert len(fact) == 1 and fact[0] in HELDOUT_RELATIONS[ex["relation"]].facts, doc
            used_facts |= set(fact)
            is_filler = [any(p.fullmatch(s) for p in fillers) for s in parts]
            assert sorted(is_filler) == [False, True], doc
            filler_first.add(is_filler[0])
            assert has_word(doc, answer) == (i == ex["gold"][0]), (doc, answer)
    assert used_facts == set(facts) and used_questions == set(questions)  # every phrasing is used
    assert filler_first == {True, False}  # filler before and after the fact


def test_heldout_validation_variant_uses_train_names():
    val = heldout_set("train", per_cell=5)
    assert len(val) == 50 and all(ex["split"] == "train" and ex["relation"] in HELDOUT_RELATIONS for ex in val)
    text = " ".join(" ".join(ex["documents"]) + " " + ex["question"] for ex in val)
    assert names_in(text, "train") and not names_in(text, "test")
    assert {ex["seed"] for ex in val} == {data.HELDOUT_VALIDATION_SEED + k for k in (0, 1, 4, 9)}


# ---- the NQ files -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def nq_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_nq_test_set", DATA_DIR / "make_nq_test_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nq_gold_holds_an_answer_and_no_distractor_does():
    from minimal.evaluate import normalize_answer

    def words(text):  # the scorer's normalisation, split at every non-word character
        return re.split(r"\W+", normalize_answer(text))

    def holds(doc, answers):  # some answer is a run of whole words of the document
        d = words(doc)
        return any((a := [w for w in words(answer) if w])
                   and any(d[s:s + len(a)] == a for s in range(len(d))) for answer in answers)

    for ex in load_test_set("test_nq"):
        assert ex["source"] == "nq-open" and ex["split"] == "test" and "relation" not in ex
        for i, doc in enumerate(ex["documents"]):
            assert holds(doc, ex["answers"]) == (i in ex["gold"]), (ex["id"], i)
            assert len(doc.split()) <= 100 + 25  # "Title: text", the text cut to 100 words
        assert len(set(ex["documents"])) == len(ex["documents"])


def test_nq_layout_and_split():
    test, trainval = load_test_set("test_nq"), load_test_set("nq_trainval")
    cells = Counter((ex["noise_ratio"], ex["gold_position"]) for ex in test)
    assert cells == {(0.0, "first"): 30, **{(r, p): 30 for r in (0.5, 0.8, 0.9) for p in ("first", "middle", "last")}}
    assert {ex["num_distractors"] for ex in test} == {0, 1, 4, 9}
    assert all(len(ex["documents"]) == ex["num_distractors"] + 1 for ex in test)
    by_ratio = {}
    for ex in test:
        by_ratio.setdefault(ex["noise_ratio"], {}).setdefault(ex["gold_position"], []).append(ex)
    for r, cells in by_ratio.items():  # one ratio: the same 30 questions and documents, reordered
        qs = [[ex["question"] for ex in cells[p]] for p in cells]
        assert all(q == qs[0] for q in qs) and len(set(qs[0])) == 30
        for exs in zip(*cells.values()):
            assert all(sorted(e["documents"]) == sorted(exs[0]["documents"]) for e in exs)
    test_questions = {ex["question"] for ex in test}
    assert len(test_questions) == 120  # 30 per noise ratio, none at two ratios
    train_questions = {ex["question"] for ex in trainval}
    assert not test_questions & train_questions and len(train_questions) == len(trainval) == 1205
    assert all(ex["split"] == "train" and len(ex["documents"]) == 1 for ex in trainval)
    test_docs = {ex["documents"][ex["gold"][0]] for ex in test}
    assert not test_docs & {d for ex in trainval for d in ex["documents"]}  # no test passage in training


def test_nq_files_equal_a_regeneration(nq_script):
    import os

    source = os.environ.get(nq_script.SOURCE_ENV)
    if not source:
        pytest.skip(f"${nq_script.SOURCE_ENV} does not name the NQ source file (data/README.md says which)")
    rows = nq_script.load_source(source)
    assert len(rows) == 1325
    assert load_test_set("test_nq") == nq_script.test_examples(rows)
    assert load_test_set("nq_trainval") == nq_script.trainval_examples(rows)
    test, trainval = nq_script.split_questions(rows)
    assert sorted(trainval + [i for ids in test.values() for i in ids]) == list(range(1325))
    assert nq_script.document({"title": "T", "text": "w " * 150}) == "T: " + " ".join(["w"] * 100)
    noisy = nq_script.trainval_examples(rows, num_distractors=2, gold_position="random")
    pool = {ex["documents"][0] for ex in load_test_set("nq_trainval")}
    assert all(set(ex["documents"]) <= pool for ex in noisy[:50])  # distractors from train/val only


# ---- a user's own file: five fields -----------------------------------------------------


def test_minimal_user_file_loads_and_groups_as_unknown(tmp_path):
    from minimal.evaluate import accuracy_grid, select_per_cell

    rows = [{"id": f"q{i}", "documents": ["Paris is in France.", "Rome is in Italy."], "gold": [i % 2],
             "question": "Where is Paris?", "answers": ["France"]} for i in range(4)]
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_jsonl(path)
    assert examples == rows and load_test_set(path) == rows
    assert select_per_cell(examples, 3) == rows[:3]  # all in the one cell ("unknown", "unknown")
    records = [dict(ex, lenient=i < 3, strict=False) for i, ex in enumerate(examples)]
    grid = accuracy_grid(records, by=("noise_ratio", "gold_position", "relation", "hops"))
    assert len(grid) == 1 and grid[0]["n"] == 4 and grid[0]["correct"] == 3
    assert [grid[0][k] for k in ("noise_ratio", "gold_position", "relation", "hops")] == ["unknown"] * 4
    # mixed with a shipped file: known cells as before, the user's rows in "unknown"
    mixed = accuracy_grid([dict(ex, lenient=True, strict=True) for ex in load_test_set("test_1hop")[:30]] + records,
                          by="noise_ratio")
    assert [row["noise_ratio"] for row in mixed] == [0.0, "unknown"]

    # the five fields are still required and checked, with file, line and field named
    for field, bad in [("question", None), ("gold", [7]), ("answers", "France")]:
        broken = dict(rows[1])
        if bad is None:
            del broken[field]
        else:
            broken[field] = bad
        path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(broken) + "\n")
        with pytest.raises(ValueError) as info:
            read_jsonl(path)
        assert "mine.jsonl" in str(info.value) and "line 2" in str(info.value) and repr(field) in str(info.value)
    # optional fields, when present, are still checked
    path.write_text(json.dumps(dict(rows[0], noise_ratio="high")) + "\n")
    with pytest.raises(ValueError, match="line 1.*'noise_ratio'"):
        read_jsonl(path)
    path.write_text(json.dumps(dict(rows[0], hops=2)) + "\n")
    with pytest.raises(ValueError, match="'gold'.*one index per hop"):
        read_jsonl(path)


def test_varied_training_family_shares_nothing_with_the_heldout_family():
    """family="varied" (the training recipe's synthetic half): the six training relations in three
    phrasings, two-sentence documents; never a held-out relation, phrasing, filler or value."""
    from minimal.data import FILLERS, TRAIN_FILLERS, VARIED_RELATIONS

    patterns = [template_regex(t) for t in HELDOUT_TEMPLATES]
    values = {v for r in HELDOUT_RELATIONS.values() for v in r.values}
    assert set(VARIED_RELATIONS) == set(RELATIONS) and not set(FILLERS) & set(TRAIN_FILLERS)
    for name, r in VARIED_RELATIONS.items():
        assert RELATIONS[name].facts == r.facts[:1] and len(set(r.facts)) == len(set(r.questions)) == 3
    seen_facts = set()
    for seed in range(10):
        for ex in generate(30, noise_ratio=0.8, split="train", family="varied", seed=seed):
            assert ex["family"] == "varied" and ex["relation"] in RELATIONS and len(ex["documents"]) == 5
            for text in ex["documents"] + [ex["question"]]:
                assert not any(p.search(text) for p in patterns), text
                assert not set(re.findall(r"\w+", text)) & values, text
            assert all(doc.count(". ") == 1 for doc in ex["documents"])  # two sentences each
            gold = ex["documents"][ex["gold"][0]]
            seen_facts |= {f for f in VARIED_RELATIONS[ex["relation"]].facts if template_regex(f).search(gold)}
            assert ex["answers"][0] in gold
    assert len(seen_facts) == 18  # every phrasing of every relation occurs


def test_nq_training_questions_never_meet_the_test_set():
    from minimal.data import nq_examples

    test = load_test_set("test_nq")
    test_questions = {e["question"] for e in test}
    test_passages = {e["documents"][g] for e in test for g in e["gold"]}  # the passages that answer test questions
    train, val = nq_examples("train", seed=1), nq_examples("validation", seed=1)
    assert len(train) + len(val) == len(read_jsonl(DATA_DIR / "nq_trainval.jsonl"))
    assert not {e["question"] for e in train} & {e["question"] for e in val}
    for ex in train + val:
        assert ex["question"] not in test_questions and ex["split"] == "train"
        assert not set(ex["documents"]) & test_passages
        k = ex["num_distractors"]
        assert len(ex["documents"]) == k + 1 and k == {0.0: 0, 0.5: 1, 0.8: 4}[ex["noise_ratio"]]
        words = " " + " ".join(re.findall(r"\w+", ex["documents"][ex["gold"][0]].lower())) + " "
        assert any(" " + " ".join(re.findall(r"\w+", a.lower())) + " " in words for a in ex["answers"])
    assert nq_examples("train", 5, seed=1) == train[:5]  # seeded, n takes the first n
    with pytest.raises(ValueError, match="part='test'"):
        nq_examples("test")
