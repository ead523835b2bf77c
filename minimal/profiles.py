"""One switch sizes every notebook and command: ``MINIMAL_PROFILE=smoke|cpu|gpu`` (default: gpu with CUDA, else cpu).

smoke: CI, the real model and code paths with tiny counts. cpu: the committed notebook outputs, numbers that mean
something in at most ~15 minutes a notebook on 2 cores. gpu: Colab T4 or better, more data and steps, a bigger model.
Everything sized by the profile reads it here: ``get_profile("cpu").examples_per_cell == 30``."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

PROFILE_NAMES = ("smoke", "cpu", "gpu")

# Every size, as (smoke, cpu, gpu). The prefix names the notebook: opamp_ 03 (and 04), cmrr_ 04, sra_ 05, pear_ 06,
# compare_ 07 (python -m minimal compare); the others 00, python -m minimal evaluate and every notebook's test runs.
SIZES: dict[str, tuple] = {
    "examples_per_cell": (2, 30, 30),  # test examples per (noise ratio, gold position) cell (the files hold 30)
    "batch_size": (8, 8, 32),  # generation batch size
    "max_new_tokens": (20, 20, 20),  # SmolLM2 answers in a sentence, and a year takes 4 tokens
    "distractor_counts": ((0, 3), (0, 1, 3, 7, 15), (0, 1, 3, 7, 15)),  # accuracy-vs-distractors sweep
    "examples_per_count": (4, 40, 40),  # examples per point of that sweep (the shipped file has 40)
    "opamp_model": ("smollm2-135m", "smollm2-135m", "Qwen/Qwen2.5-0.5B-Instruct"),
    "qlora": (False, False, True),  # 4-bit NF4 base model for training (needs CUDA and bitsandbytes)
    "opamp_stride": (3, 3, 1),  # OpAmp on every stride-th layer (authors: 2 Llama, 3 Qwen, 1 in eval)
    "opamp_lora_r": (8, 8, 64),  # LoRA rank (spec 64; scaled down on CPU for speed)
    "opamp_lora_alpha": (16, 16, 16),  # LoRA alpha (spec 16)
    "opamp_train_batch": (2, 4, 8),  # training micro-batch
    "opamp_train_steps": (1, 24, 500),  # optimizer steps, same for OpAmp+LoRA and LoRA-only
    "opamp_eval_per_cell": (1, 8, 30),  # test_1hop questions per (noise, position) cell
    "cmrr_values": ((10,), (1, 5, 10, 20), (1, 5, 10, 20)),  # K values
    "cmrr_train_steps": (1, 12, 300),  # steps per run (every K and the LoRA-only control), batch opamp_train_batch
    "cmrr_train_noise": (0.8, 0.8, 0.8),  # every run trains at this one noise ratio; tests span all of them
    "cmrr_eval_per_cell": (1, 6, 30),  # test_1hop questions per (noise, position) cell
    "cmrr_seeds": ((0,), (0, 1), (0, 1, 2)),  # training seeds
    "sra_text_tokens": (256, 2200, 2200),  # last tokens of data/text/facts_qa.txt (2194: all of it)
    "sra_elim_per_ratio": (1, 6, 25),  # test_1hop questions per noise ratio, per elimination threshold
    "sra_sweep_examples": (6, 48, 150),  # train-split questions per (g, f) point of the sweep
    "sra_sweep_gains": ((4.0,), (2.0, 4.0, 8.0), (2.0, 4.0, 8.0)),  # g values swept
    "sra_sweep_factors": ((0.5,), (0.3, 0.5), (0.1, 0.3, 0.5)),  # f = f_inner = f_outer values swept
    "sra_test_per_cell": (1, 20, 30),  # test_1hop questions per (noise, position) cell, base vs SRA
    "compare_train_steps": (1, 32, 500),  # steps of batch opamp_train_batch on training_mix, lora and opamp alike
    "compare_seeds": ((0,), (0, 1, 2), (0, 1, 2)),  # training seeds of the trained methods
    "compare_per_cell": (1, 3, 30),  # questions per (noise, position) cell of each test set (cpu: 30 a set)
    "compare_repeats": (3, 11, 21),  # paired prefill timings per method (median ratio to base)
    "pear_settings": (((10, 4), (6, 6)), ((50, 10), (25, 20), (15, 40), (10, 50)),
                      ((50, 20), (25, 40), (15, 80), (10, 100))),  # detection (n, samples); gpu = the paper's
    "pear_compare_samples": (2, 8, 40),  # samples of the 2nd setting scored by both variants (mean vs path)
    "pear_k": (5, 10, 10),  # headline top-k, fixed in advance
    "pear_k_sweep": ((5,), (5, 10, 20), (5, 10, 20)),  # k values trained and evaluated
    "pear_train_sequences": (8, 80, 50000),  # copy sequences for tau (paper: 50,000)
    "pear_train_n": (10, 25, 50),  # their n (paper: 50)
    "pear_train_batch": (4, 2, 32),  # sequences per step
    "pear_lr": (5e-3, 2.5e-2, 5e-3),  # AdamW lr: authors' 5e-3; cpu 5x, since it takes 40 steps, not ~1,500
    "pear_eval_per_cell": (1, 20, 30),  # test_1hop questions per (noise 0.8/0.9, position) cell, base vs k
    "pear_sweep_per_cell": (1, 10, 30),  # the first of those per cell, for the sweep of k
    "pear_held_out": (8, 32, 64),  # held-out copy sequences (copy accuracy before/after)
    "pear_latency_repeats": (3, 11, 51),  # interleaved timings, folded vs base
}


@dataclass(frozen=True)
class Profile:
    """The sizes of one profile: ``profile.batch_size`` and so on (see ``SIZES``)."""
    name: str

    def __getattr__(self, knob: str):
        if knob.startswith("__") or knob not in SIZES:
            raise AttributeError(f"profile has no size {knob!r}; known: {', '.join(SIZES)}")
        return SIZES[knob][PROFILE_NAMES.index(self.name)]


def get_profile(name: str | None = None) -> Profile:
    """The profile named by ``name``, else by ``$MINIMAL_PROFILE``, else gpu with CUDA, else cpu."""
    name = name or os.environ.get("MINIMAL_PROFILE") or ("gpu" if torch.cuda.is_available() else "cpu")
    if name not in PROFILE_NAMES:
        raise ValueError(f"MINIMAL_PROFILE={name!r} is not a profile; choose one of {', '.join(PROFILE_NAMES)}")
    return Profile(name)


TRITON_MISSING = ("needs Triton, which has Linux wheels only (pip install triton; on macOS and Windows there is "
                  "none): everything else in minimal runs on the PyTorch reference")


def triton_available() -> bool:  # whether ``import triton`` can work here (it is not imported)
    return importlib.util.find_spec("triton") is not None


def check_kernel_dtype(dtype, interpreted: bool) -> None:
    """ValueError for bfloat16 where a Triton kernel cannot compute it: under the interpreter
    (its bf16 ``tl.dot`` multiplies raw bit patterns) and on GPUs older than sm_80 (Colab's T4)."""
    if dtype == torch.bfloat16 and interpreted:
        raise ValueError("bfloat16 is not supported under Triton's interpreter (TRITON_INTERPRET=1): its bf16 "
                         "tl.dot gives wrong results. Use float32 or float16 on CPU, bfloat16 on a GPU.")
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability()
        raise ValueError(f"bfloat16 needs a GPU of compute capability 8.0 or newer; {torch.cuda.get_device_name()} "
                         f"is {major}.{minor}: use float16 (minimal.models.compute_dtype picks it)")
