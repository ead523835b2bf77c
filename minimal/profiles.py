"""One switch sizes every notebook and command: ``MINIMAL_PROFILE=smoke|cpu|gpu``.

- ``smoke``: CI. The real model and the real code paths, with tiny counts.
- ``cpu``:   the committed notebook outputs. Enough examples for numbers that mean
             something, each notebook at most ~15 minutes on 2 CPU cores.
- ``gpu``:   Colab T4 or better: more data, more steps, optionally a bigger model.

The default is ``gpu`` when CUDA is available, else ``cpu``. Everything that depends on
the profile reads it through :func:`get_profile`, here and nowhere else:

>>> p = get_profile("cpu")
>>> p.examples_per_cell
30
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROFILE_NAMES = ("smoke", "cpu", "gpu")

# Every size, as (smoke, cpu, gpu). One line per knob, grouped by the notebook that uses it.
SIZES: dict[str, tuple] = {
    # evaluation (00, python -m minimal evaluate, and every later notebook's test runs)
    "examples_per_cell": (2, 30, 50),  # test examples per (noise ratio, gold position) cell
    "batch_size": (8, 8, 32),  # generation batch size
    "max_new_tokens": (20, 20, 20),  # SmolLM2 answers in a sentence, and a year takes 4 tokens
    # 00 the problem
    "distractor_counts": ((0, 3), (0, 1, 3, 7, 15), (0, 1, 3, 7, 15)),  # accuracy-vs-distractors sweep
    "examples_per_count": (4, 40, 40),  # examples per point of that sweep (the shipped file has 40)
}


@dataclass(frozen=True)
class Profile:
    """The sizes of one profile: ``profile.batch_size`` and so on (see ``SIZES``)."""

    name: str

    def __getattr__(self, knob: str):
        if knob.startswith("__") or knob not in SIZES:
            raise AttributeError(f"profile has no size {knob!r}; known: {', '.join(SIZES)}")
        return SIZES[knob][PROFILE_NAMES.index(self.name)]


def default_profile_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """The profile named by ``name``, else by ``$MINIMAL_PROFILE``, else the default."""
    name = name or os.environ.get("MINIMAL_PROFILE") or default_profile_name()
    if name not in PROFILE_NAMES:
        raise ValueError(f"MINIMAL_PROFILE={name!r} is not a profile; choose one of {', '.join(PROFILE_NAMES)}")
    return Profile(name)
