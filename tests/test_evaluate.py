"""Scoring: match rules, Wilson intervals, grids, and one real evaluation of the default model."""

import math

import pytest

from minimal import data, load_model
from minimal.evaluate import (accuracy_grid, attention_by_layer, evaluate, exact_match, format_grid,
                              lenient_match, normalize_answer, save_json, select_per_cell, wilson_interval)


def test_normalize_answer():
    assert normalize_answer("  The   Paris! ") == "paris"
    assert normalize_answer("An apple, a day.") == "apple day"


@pytest.mark.parametrize("pred,answers,strict,lenient", [
    ("Paris", ["Paris"], True, True),
    ("paris.", ["Paris"], True, True),
    ("Alice lives in Paris.", ["Paris"], False, True),   # answer words inside the prediction
    ("New", ["New York"], False, True),                  # prediction words inside the answer
    ("Rome", ["Paris"], False, False),
    ("", ["Paris"], False, False),                       # an empty prediction is never right
    ("the", ["Paris"], False, False),                    # nor one that normalizes to nothing
])
def test_match_rules(pred, answers, strict, lenient):
    assert exact_match(pred, answers) is strict
    assert lenient_match(pred, answers) is lenient


def test_wilson_interval_known_values():
    # textbook values (Wilson 1927; e.g. Newcombe 1998, Table I): 5/10 and 0/10 at 95%
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_accuracy_grid_counts_and_table():
    records = [dict(noise_ratio=r, gold_position=p, lenient=ok, strict=False, gold_mass=[0.1, 0.3])
               for r, p, ok in [(0.0, "first", True), (0.5, "first", True), (0.5, "first", False),
                                (0.5, "last", False)]]
    grid = accuracy_grid(records)
    cell = {(g["noise_ratio"], g["gold_position"]): g for g in grid}
    assert cell[(0.5, "first")]["n"] == 2 and cell[(0.5, "first")]["accuracy"] == 0.5
    assert cell[(0.5, "last")]["accuracy"] == 0.0
    assert cell[(0.0, "first")]["gold_mass"] == pytest.approx(0.2)
    assert accuracy_grid(records, metric="strict")[0]["correct"] == 0
    table = format_grid(grid)
    assert "50.0%" in table and "0.5" in table
    with pytest.raises(ValueError, match="metric"):
        accuracy_grid(records, metric="f1")


def test_select_per_cell_is_balanced():
    examples = data.load_test_set("test_1hop")
    chosen = select_per_cell(examples, 2)
    cells = {(e["noise_ratio"], e["gold_position"]) for e in examples}
    assert len(chosen) == 2 * len(cells)
    with pytest.raises(ValueError):
        select_per_cell(examples, 0)


def test_evaluate_the_default_model_end_to_end(tmp_path):
    """Real behaviour: with no distractor the model copies the answer; attention adds up."""
    model, tok = load_model()
    examples = [e for e in data.load_test_set("test_1hop") if e["num_distractors"] == 0][:4]
    examples += select_per_cell([e for e in data.load_test_set("test_1hop") if e["num_distractors"] == 9], 1)
    records = evaluate(model, tok, examples, batch_size=4, progress=False)
    assert len(records) == len(examples)
    easy = [r for r in records if r["num_distractors"] == 0]
    assert sum(r["lenient"] for r in easy) >= 3, [r["prediction"] for r in easy]
    L = model.config.num_hidden_layers
    for r in records:
        assert len(r["gold_mass"]) == L
        for g, d in zip(r["gold_mass"], r["distractor_mass"]):
            assert 0.0 <= g and 0.0 <= d and g + d <= 1.0 + 1e-5
    profile = attention_by_layer(records)
    assert len(profile["gold_per_doc"]) == L
    path = save_json({"records": records}, tmp_path / "r.json")
    assert path.exists()


def test_evaluate_refuses_an_empty_set():
    model, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, tok, [])


def test_gold_attention_ratio_is_the_ratio_of_layer_means():
    records = [
        {"gold_mass_per_doc": [0.2, 0.4], "distractor_mass_per_doc": [0.1, 0.1]},
        {"gold_mass_per_doc": [0.4, 0.2], "distractor_mass_per_doc": [0.3, 0.1]},
        {"gold_mass_per_doc": [0.9, 0.9], "distractor_mass_per_doc": None},  # no distractors: left out
    ]
    # gold: mean over records then layers = 0.3; distractors: 0.15
    from minimal.evaluate import gold_attention_ratio

    assert abs(gold_attention_ratio(records) - 2.0) < 1e-6
    assert gold_attention_ratio(records[2:]) is None


def test_grouping_puts_missing_fields_in_unknown():
    """A user's file may lack the grouping fields: such records form the cell "unknown";
    a field present as null stays None (test_distractors' noise_ratio)."""
    records = [dict(lenient=True, strict=True), dict(noise_ratio=None, lenient=False, strict=False),
               dict(noise_ratio=0.5, gold_position="first", lenient=True, strict=False)]
    grid = accuracy_grid(records)
    assert [(g["noise_ratio"], g["gold_position"], g["n"]) for g in grid] == [
        (0.5, "first", 1), ("unknown", "unknown", 1), (None, "unknown", 1)]
    assert select_per_cell(records, 1, by=("relation",)) == records[:1]
    assert "unknown" in format_grid(grid)
