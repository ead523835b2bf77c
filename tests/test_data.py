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
        template = re.compile("^" + re.escape(relation.fact).replace(r"\{name\}", "(.+)").replace(r"\{value\}", "(.+)") + "$")
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
