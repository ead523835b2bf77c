"""Test setup shared by every test file.

Triton's interpreter must be switched on before any kernel module is imported, so it is done
here, at collection time, whenever no CUDA device is present.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MINIMAL_PROFILE", "smoke")


@pytest.fixture(scope="session")
def sharp_tiny():
    """``sharp_tiny(factor, **config)`` -> (model, tokenizer): a tiny random Llama whose query and
    key projections are scaled by ``factor``. Random weights give near-uniform attention maps;
    sharper maps have large and small probabilities, which the SRA and elimination tests need."""
    from minimal import hooks, load_model
    from minimal.models import tiny_model

    def make(factor: float, **config):
        model = tiny_model("tiny-llama", **config)
        with torch.no_grad():
            for m in hooks.attention_modules(model):
                m.q_proj.weight.mul_(factor)
                m.k_proj.weight.mul_(factor)
        return model, load_model("tiny-llama")[1]

    return make
