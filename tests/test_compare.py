"""python -m minimal compare: method names, weights on disk, composition, the command end to end."""

import json
import shutil

import pytest
import torch

from minimal import compare, data, evaluate, load_model, pear

TINY = "tiny-llama"


def test_method_names_are_checked():
    assert compare.parse_methods("base, opamp,pear+sra") == ["base", "opamp", "pear+sra"]
    for bad, words in [("base,attn", "known methods are base, lora, opamp, sra, pear"),
                       ("opamp+sra", "do not compose"), ("opamp+lora", "do not compose"),
                       ("base+pear", "combines with nothing"), ("pear+pear", "repeats"),
                       ("sra,sra", "twice"), ("", "empty")]:
        with pytest.raises(ValueError, match=words):
            compare.parse_methods(bad)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """LoRA, OpAmp + LoRA and PEAR weights for the tiny model, trained with the smoke recipe."""
    root = tmp_path_factory.mktemp("weights")
    records = compare.ensure_weights(TINY, "lora,opamp,pear", root, progress=False)
    return root, records


def test_missing_weights_are_trained_saved_and_then_loaded(weights):
    root, records = weights
    folder = compare.weights_dir(TINY, root) / "seed0"
    assert (folder / "opamp" / "adapters" / "adapters.safetensors").exists()
    assert (folder / "lora" / "lora" / "adapter_config.json").exists()
    assert set(records) == {"lora", "opamp", "pear"} and records["opamp"]["K"] == compare.K
    stamp = (folder / "pear.json").stat().st_mtime
    again = compare.ensure_weights(TINY, "pear", root, progress=False)  # present: loaded, not retrained
    assert (folder / "pear.json").stat().st_mtime == stamp and again["pear"] == records["pear"]


def test_built_methods_equal_their_unmerged_forms(weights):
    """Merged LoRA (+ OpAmp) and folded PEAR give the logits of the hooked, unmerged models."""
    from peft import PeftModel

    from minimal.opamp import load_opamp

    root, _ = weights
    folder = compare.weights_dir(TINY, root) / "seed0"
    ids = torch.randint(100, 2000, (2, 24))
    model, _ = compare.build("opamp+pear", TINY, root)
    reference, _ = load_model(TINY)
    load_opamp(reference, folder / "opamp" / "adapters")
    reference = PeftModel.from_pretrained(reference, str(folder / "opamp" / "lora"))
    coefficients = pear.load_coefficients(folder / "pear.json", model)
    with torch.no_grad(), pear.apply(reference.get_base_model(), coefficients):
        expected = reference(ids).logits
        got = model(ids).logits
    assert (got - expected).abs().max() <= 1e-5
    base, _ = load_model(TINY)
    with torch.no_grad():
        assert (model(ids).logits - base(ids).logits).abs().max() > 1e-6  # the method did change something


def test_weights_of_another_model_are_refused(weights, tmp_path):
    root, _ = weights
    shutil.copytree(compare.weights_dir(TINY, root), compare.weights_dir("tiny-qwen2", tmp_path))
    for method in ("pear", "opamp", "lora"):
        with pytest.raises(ValueError, match="saved for"):
            compare.build(method, "tiny-qwen2", tmp_path)


def test_compare_end_to_end_on_two_test_files_and_two_seeds(weights, tmp_path, capsys):
    root, _ = weights
    examples = data.generate(3, noise_ratio=0.8, split="test", seed=5) + data.generate(1, noise_ratio=0.0, seed=6)
    test = data.write_jsonl(examples, tmp_path / "mine.jsonl")
    # a user's own file: only the five required fields
    own = [{k: e[k] for k in ("id", "documents", "gold", "question", "answers")} for e in examples]
    bare = data.write_jsonl(own, tmp_path / "bare.jsonl")
    argv = ["compare", "--model", TINY, "--methods", "base,pear+sra", "--test", f"{test},{bare}", "--per-cell", "2",
            "--seeds", "0,1", "--weights", str(root), "--out", str(tmp_path / "out")]
    from minimal.__main__ import main

    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert (tmp_path / "out" / "compare.png").exists()
    assert list(result["tests"]) == [str(test), str(bare)]
    assert (compare.weights_dir(TINY, root) / "seed1" / "pear.json").exists()  # seed 1 trained on first use
    for t, block in result["tests"].items():
        assert list(block["methods"]) == ["base", "pear+sra"] and f"{block['n']}" in printed
        base, method = block["methods"]["base"], block["methods"]["pear+sra"]
        assert [r["seed"] for r in base["runs"]] == [None] and [r["seed"] for r in method["runs"]] == [0, 1]
        for run in base["runs"] + method["runs"]:
            assert run["overall"]["n"] == len(run["records"]) == block["n"]
            assert "paired" in run
        accs = torch.tensor([r["overall"]["accuracy"] for r in method["runs"]], dtype=torch.float64)
        assert abs(method["mean"] - accs.mean().item()) < 1e-12 and abs(method["sd"] - accs.std().item()) < 1e-12
    # the first file has 2 per cell: (0.8, each position) + (0.0, first); the bare one is one cell, "unknown"
    assert result["tests"][str(test)]["n"] == 3 and result["tests"][str(bare)]["n"] == 2
    bare_noise = result["tests"][str(bare)]["methods"]["base"]["runs"][0]["by_noise"]
    assert [r["noise_ratio"] for r in bare_noise] == ["unknown"] and "noise unknown" in printed
    assert result["cost"]["pear+sra"]["prefill"]["ratio"] > 0
    assert all(v["pear"] > 0 for v in result["cost"]["pear+sra"]["training"].values())


def test_bad_test_file_names_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    example = data.generate(1, noise_ratio=0.5, seed=1)[0]
    bad.write_text(json.dumps(example) + "\n" + json.dumps(dict(example, gold=[99])) + "\n")
    with pytest.raises(ValueError, match="line 2.*gold"):
        compare.compare(TINY, "base", bad, per_cell=1, progress=False)


def test_paired_counts_and_sign_test():
    rec = lambda i, ok: {"id": i, "lenient": ok}
    base = [rec(i, ok) for i, ok in enumerate([1] * 14 + [0] * 2 + [1] * 3 + [0] * 5)]
    other = [rec(i, ok) for i, ok in enumerate([0] * 14 + [1] * 2 + [1] * 3 + [0] * 5)]
    p = evaluate.paired(base, other)
    assert (p["fixed"], p["broken"]) == (2, 14)
    assert abs(p["p_value"] - 2 * (1 + 16 + 120) / 2**16) < 1e-12  # exact binomial, n = 16 discordant
    assert evaluate.paired(base, base) == {"fixed": 0, "broken": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="same questions"):
        evaluate.paired(base, other[::-1])


def test_command_line_mistakes_get_a_message_not_a_traceback():
    from minimal.__main__ import main

    for argv, words in [(["--methods", "base,attn"], "known methods are"),
                        (["--test", "nope.jsonl"], "no test set"), (["--test", "test_1hop,nope"], "no test set"),
                        (["--seeds", "x"], "comma-separated integers"), (["--seeds", "-1"], "seeds"),
                        (["--profile", "huge"], "huge")]:
        with pytest.raises(SystemExit, match=words):
            main(["compare", *argv])
