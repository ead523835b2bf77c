"""Write the shipped noisy-context QA test sets (test-split entities only).

    python data/make_test_sets.py

Each file is a grid of cells. A cell's seed is the file's base seed plus its number of
distractors, so the first/middle/last cells of one noise ratio hold the same questions and
documents and differ only in where the gold document sits (a paired comparison of positions).
Relations are cycled continuously through each file, so every relation gets the same share.

test_heldout.jsonl is ``minimal.data.heldout_set("test")`` (base seed 4234): relations,
phrasings and two-sentence documents that training never uses, in test_1hop's layout.
(test_nq.jsonl, real text, is made by its own script: data/make_nq_test_set.py.)
"""

from pathlib import Path

from minimal.data import RELATIONS, distractors_for_noise_ratio, generate, heldout_set, write_jsonl

HERE = Path(__file__).resolve().parent
SEED = 1234
POSITIONS = ("first", "middle", "last")


def grid(name, base_seed, settings, per_cell, hops=1):
    """settings: list of (generate kwargs, positions) for each noise level / count."""
    relations, examples = list(RELATIONS), []
    for level, (kwargs, positions) in enumerate(settings):
        start = level * per_cell % len(relations)  # keep cycling where the last level stopped
        k = kwargs.get("num_distractors")
        if k is None:
            k = distractors_for_noise_ratio(kwargs["noise_ratio"])
        for position in positions:
            examples += generate(
                per_cell, **kwargs, gold_position=position, hops=hops, split="test",
                seed=base_seed + k, relations=relations[start:] + relations[:start],
            )
    path = write_jsonl(examples, HERE / f"{name}.jsonl")
    print(f"{path.name}: {len(examples)} examples")


def main():
    def ratios(rs):  # with no distractors there is one document: a single "first" cell
        return [(dict(noise_ratio=r), POSITIONS if r > 0 else ("first",)) for r in rs]

    grid("test_1hop", SEED, ratios([0.0, 0.5, 0.8, 0.9]), per_cell=30)
    grid("test_2hop", SEED + 1000, ratios([0.0, 0.5, 0.8]), per_cell=20, hops=2)
    grid("test_distractors", SEED + 2000,
         [(dict(num_distractors=k), ("random",)) for k in (0, 1, 3, 7, 15)], per_cell=40)
    examples = heldout_set("test", per_cell=30)  # base seed minimal.data.HELDOUT_SEED = 4234
    path = write_jsonl(examples, HERE / "test_heldout.jsonl")
    print(f"{path.name}: {len(examples)} examples")


if __name__ == "__main__":
    main()
