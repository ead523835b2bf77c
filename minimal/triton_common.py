"""What the Triton kernels share: the import guard, the interpreter switch, input checks, launch settings.
Without CUDA they run on Triton's CPU interpreter (``TRITON_INTERPRET=1`` before import; no bf16 there)."""

import contextlib

import torch

from .profiles import TRITON_MISSING, check_kernel_dtype

try:
    import triton
    import triton.language as tl  # noqa: F401  (re-exported: the kernel modules import both from here)
except ImportError as err:
    raise ImportError(f"minimal.triton_* {TRITON_MISSING}") from err

LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e)), the cheaper instruction


@triton.jit
def _probe():
    pass


def interpreter_active() -> bool:
    """True when the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return type(_probe).__name__ == "InterpretedFunction"


def check_kernel_inputs(x: torch.Tensor, module: str, fallback: str) -> None:
    """A kernel's limits beyond the reference's checks: head_dim in [16, 128], fp16/bf16/fp32, CUDA tensors
    (or the interpreter). ``module`` and ``fallback`` name the kernel and the PyTorch form."""
    if not 16 <= (D := x.shape[-1]) <= 128:
        raise ValueError(f"head_dim D={D} is not supported by the Triton kernel: it must be in [16, 128]")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {x.dtype} is not supported: use float16, bfloat16 or float32")
    check_kernel_dtype(x.dtype, interpreter_active())
    if not interpreter_active() and not x.is_cuda:
        raise ValueError(f"the Triton kernel needs CUDA tensors; to run it on CPU, set TRITON_INTERPRET=1 before "
                         f"importing {module} (or use {fallback})")


def launch_settings(D: int, dtype):
    """``(blocks, launch)``: plain, untuned block sizes and warps. Interpreter: small blocks (fast, and tiny
    tests still cross blocks); GPU: narrower key blocks for wide or fp32 tiles (registers)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if interpreter_active():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=BLOCK_D), {}
    BLOCK_N = 32 if BLOCK_D > 64 or dtype == torch.float32 else 64
    return dict(BLOCK_M=64, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D), dict(num_warps=8 if BLOCK_D > 64 else 4, num_stages=2)


def precision(dtype) -> str:
    """fp32 dots in IEEE precision, not TF32 (for 16-bit inputs the setting is ignored)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, not whichever is current (a no-op on CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
