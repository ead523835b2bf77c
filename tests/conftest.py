"""Test setup shared by every test file.

Triton's interpreter must be switched on before any kernel module is imported, so it is done
here, at collection time, whenever no CUDA device is present.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MINIMAL_PROFILE", "smoke")
