"""One switch sizes every notebook and command: ``MINIMAL_PROFILE=smoke|cpu|gpu``.

- ``smoke``: CI. The real model and the real code paths, with tiny counts.
- ``cpu``:   the committed notebook outputs. Enough examples for numbers that mean
             something, each notebook at most ~15 minutes on 2 CPU cores.
- ``gpu``:   Colab T4 or better: more data, more steps, optionally a bigger model.

The default is ``gpu`` when CUDA is available, else ``cpu``. Everything that depends on
the profile reads it through :func:`get_profile`, here and nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

PROFILE_NAMES = ("smoke", "cpu", "gpu")


@dataclass(frozen=True)
class Profile:
    name: str
    examples_per_cell: int  # test examples per (noise ratio, gold position) cell
    batch_size: int  # generation batch size
    distractor_counts: tuple[int, ...]  # the sweep of notebook 00
    examples_per_count: int  # examples per point of that sweep
    max_new_tokens: int = 20  # SmolLM2 answers in a sentence, and a year takes 4 tokens

    def with_(self, **changes) -> "Profile":
        """A copy with some fields changed: ``get_profile().with_(batch_size=4)``."""
        return replace(self, **changes)


PROFILES = {
    "smoke": Profile("smoke", examples_per_cell=2, batch_size=8, distractor_counts=(0, 3), examples_per_count=4),
    "cpu": Profile("cpu", examples_per_cell=30, batch_size=8, distractor_counts=(0, 1, 3, 7, 15), examples_per_count=40),
    "gpu": Profile("gpu", examples_per_cell=50, batch_size=32, distractor_counts=(0, 1, 3, 7, 15, 31), examples_per_count=100),
}


def default_profile_name() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str | None = None) -> Profile:
    """The profile named by ``name``, else by ``$MINIMAL_PROFILE``, else the default."""
    name = name or os.environ.get("MINIMAL_PROFILE") or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"MINIMAL_PROFILE={name!r} is not a profile; choose one of {', '.join(PROFILE_NAMES)}")
    return PROFILES[name]
