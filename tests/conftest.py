"""Test setup shared by every test file.

Triton's interpreter must be switched on before any kernel module is imported, so it is done
here, at collection time, whenever no CUDA device is present. The Triton tests share their
cases with the kernel harness: ``kernels/cases.py`` (sizes, inputs, tolerances) and
``kernels/check.py`` (kernel vs spec), reached through the fixtures below.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MINIMAL_PROFILE", "smoke")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # cases.py, check.py (scripts, no package)

import cases  # noqa: E402


@pytest.fixture(scope="session")
def check():
    """kernels/check.py with the kernel modules it imports (``check.triton_opamp``, ...). Skips
    the test without Triton, or without CUDA when TRITON_INTERPRET was not 1 before the import."""
    pytest.importorskip("triton")
    import check

    if cases.DEVICE == "cpu" and not check.triton_opamp.interpreter_active():
        pytest.skip("no CUDA and TRITON_INTERPRET was not set before import")
    return check


@pytest.fixture(params=cases.dtypes(), ids=cases.dtype_name)
def kernel_dtype(request):
    """Each dtype the kernels compute here: fp32, fp16, and bf16 on a GPU that has it."""
    return request.param


@pytest.fixture(scope="session")
def sharp_tiny():
    """``sharp_tiny(factor, **config)`` -> (model, tokenizer): ``cases.sharp_tiny``, a tiny random
    Llama with sharp attention maps (query and key projections scaled by ``factor``)."""
    from minimal import load_model

    return lambda factor, **config: (cases.sharp_tiny(factor, **config), load_model("tiny-llama")[1])
