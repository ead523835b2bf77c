"""Profiles ask for nothing the data or the machine cannot give."""

import collections

import pytest
import torch

from minimal import data, models, profiles
from minimal.profiles import PROFILE_NAMES, get_profile

PER_CELL = ("examples_per_cell", "opamp_eval_per_cell", "cmrr_eval_per_cell", "sra_test_per_cell",
            "compare_per_cell", "pear_eval_per_cell", "pear_sweep_per_cell")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_no_profile_asks_for_more_questions_than_the_files_hold(name):
    p = get_profile(name)
    cells = collections.Counter((e["noise_ratio"], e["gold_position"]) for e in data.load_test_set("test_1hop"))
    for knob in PER_CELL:
        assert getattr(p, knob) <= min(cells.values()), f"{name}.{knob} = {getattr(p, knob)} > {min(cells.values())}"
    ratios = collections.Counter(e["noise_ratio"] for e in data.load_test_set("test_1hop"))
    assert p.sra_elim_per_ratio <= min(ratios.values())
    counts = collections.Counter(e["num_distractors"] for e in data.load_test_set("test_distractors"))
    assert p.examples_per_count <= min(counts.values())
    assert set(p.distractor_counts) <= set(counts)


def test_qlora_only_in_the_gpu_profile():
    assert [get_profile(n).qlora for n in PROFILE_NAMES] == [False, False, True]


def test_dtypes_are_chosen_in_one_place():
    assert models.compute_dtype("cpu") == torch.float32
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        assert models.compute_dtype("cuda") == expected
    profiles.check_kernel_dtype(torch.float16, interpreted=True)  # fine
    with pytest.raises(ValueError, match="bfloat16 is not supported under Triton's interpreter"):
        profiles.check_kernel_dtype(torch.bfloat16, interpreted=True)


def test_unknown_profile_names_the_choices(monkeypatch):
    monkeypatch.setenv("MINIMAL_PROFILE", "laptop")
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        get_profile()
