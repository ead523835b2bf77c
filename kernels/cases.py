"""The kernel cases and their random inputs, shared by kernels/check.py and tests/test_triton_*.py.

A case is a NamedTuple of sizes; ``label(case)`` names it (a table row, a pytest id). The small
lists run everywhere (Triton's interpreter uses 16-row blocks, so 17, 33, 45 and 70 leave tails);
the ``*_FULL`` lists are the GPU grid of ``python kernels/check.py``. Inputs are made on CPU from
a seeded generator, then moved and rounded to the dtype, so the spec sees the kernel's numbers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# max |kernel - spec| / max |spec|, spec in float64: the small cases (observed on the interpreter:
# fp32 <= 8e-7, fp16 <= 7e-4: probabilities and dS are rounded to fp16 before the dots) and the
# GPU grid, whose long rows sum more rounded terms; bf16 has an 8-bit mantissa
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
TOL_FULL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def dtypes(device: str = DEVICE) -> list[torch.dtype]:
    """fp32 and fp16; bf16 on a GPU that has it (sm_80+; not a T4), never under the interpreter."""
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return [torch.float32, torch.float16] + [torch.bfloat16] * bf16


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def label(case) -> str:
    """'B2-H4-Hkv2-T33-S33-D32-causal-pad': sizes by name, flags when set."""
    parts = []
    for name, value in case._asdict().items():
        if isinstance(value, bool):
            parts += [name] if value else []
        elif isinstance(value, tuple):
            parts.append(name + ",".join(map(str, value)))
        else:
            parts.append(f"{name}{value}")
    return "-".join(parts)


def rel_error(got, want) -> float:
    """max |got - want| / max |want| (inf where got is not finite)."""
    got, want = got.double().cpu(), want.double().cpu()
    if not bool(got.isfinite().all()):
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def sharp_tiny(factor: float, **config):
    """A tiny random Llama (``minimal.models.tiny_model``) with its query and key projections
    scaled by ``factor``: random weights give near-uniform maps, sharper ones have the large and
    small probabilities that SRA, elimination and the OpAmp kernel's rounding need."""
    from minimal import hooks
    from minimal.models import tiny_model

    model = tiny_model("tiny-llama", **config)
    with torch.no_grad():
        for m in hooks.attention_modules(model):
            m.q_proj.weight.mul_(factor)
            m.k_proj.weight.mul_(factor)
    return model


def _randn(generator, *shape, scale=1.0):
    return torch.randn(*shape, generator=generator) * scale


# ----------------------------------------------------------------------------------------
# OpAmp: q1, q2 (B, H, T, D); k1, k2, v (B, Hkv, S, D); key padding on request


class OpAmpCase(NamedTuple):
    B: int
    H: int
    Hkv: int
    T: int
    S: int
    D: int
    causal: bool = True
    pad: bool = False


OPAMP = [
    OpAmpCase(1, 2, 2, 17, 17, 16),  # MHA, one tail row
    OpAmpCase(2, 4, 2, 33, 33, 32, pad=True),  # GQA 2:1, key padding, 3 blocks
    OpAmpCase(1, 4, 1, 33, 33, 32, causal=False),  # GQA 4:1 (MQA), non-causal
    OpAmpCase(1, 2, 1, 1, 33, 32),  # decoding: T=1 against S=33
    OpAmpCase(2, 2, 1, 17, 33, 24, pad=True),  # T < S bottom-right, padding, D=24 padded to 32
    OpAmpCase(1, 2, 2, 33, 17, 16),  # T > S: the first 16 rows see no key (output 0)
    OpAmpCase(1, 2, 2, 17, 33, 16, causal=False, pad=True),  # non-causal with padding, T < S
]
OPAMP_FULL = [
    OpAmpCase(B, H, H // group, T, S, D, causal, pad)
    for B, H, T, S, D, pad in [
        (2, 8, 128, 128, 64, False),
        (2, 8, 257, 257, 64, True),  # tails on GPU blocks
        (1, 8, 1, 1000, 128, False),  # decoding against a long cache
        (1, 8, 100, 1000, 128, True),  # chunked prefill, T < S
        (1, 8, 1000, 1000, 16, False),
        (1, 8, 777, 777, 96, True),  # D padded to 128
        (1, 16, 2048, 2048, 128, False),
        (1, 8, 300, 200, 32, False),  # T > S
    ]
    for group in (1, 4) for causal in (True, False)
]


def padding_mask(B, S, device=DEVICE):
    """(B, S) bool, True = real key: item 0 left-padded by S/3, item 1 with a hole in the middle."""
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, : S // 3] = False
    if B > 1:
        keep[1, S // 2] = False
    return keep.to(device)


def opamp_inputs(case: OpAmpCase, dtype, device=DEVICE, seed=0):
    """([q1, k1, q2, k2, v], key_padding_mask or None)."""
    B, H, Hkv, T, S, D, _, pad = case
    g = torch.Generator().manual_seed(seed)
    q1, q2 = _randn(g, B, H, T, D), _randn(g, B, H, T, D)
    k1, k2, v = (_randn(g, B, Hkv, S, D) for _ in range(3))
    return [t.to(device, dtype) for t in (q1, k1, q2, k2, v)], padding_mask(B, S, device) if pad else None


# ----------------------------------------------------------------------------------------
# SRA: q (B, H, T, D); k, v (B, Hkv, T, D); sequence b left-padded to its lengths[b] real tokens


class SRACase(NamedTuple):
    B: int
    H: int
    Hkv: int
    T: int
    D: int
    n: tuple  # real tokens per sequence (left padding)
    L: int  # layers of the model
    layer: int


# small prompts need small b and t for both passes to act (the defaults skip prompts under 304 tokens)
SRA_CONFIG = dict(begin=5, tail=12, f_inner=0.5, f_outer=0.5, gain=5.0)
SRA = [
    SRACase(1, 2, 2, 70, 16, (70,), 4, 0),  # MHA, inner pass only (layer 0)
    SRACase(1, 2, 2, 70, 16, (70,), 4, 1),  # inner and outer passes
    SRACase(3, 4, 2, 70, 16, (70, 55, 40), 4, 1),  # GQA 2:1, left padding, each item its own windows
    SRACase(3, 4, 2, 70, 16, (70, 55, 40), 4, 2),
    SRACase(2, 3, 1, 45, 24, (45, 33), 3, 0),  # MQA, D = 24 padded to 32 in the kernel
    SRACase(2, 3, 1, 45, 24, (45, 33), 3, 1),
]
# SmolLM2-135M's attention (9 query heads, 3 KV heads, D = 64), 30 layers, the default SRAConfig
SRA_FULL = [SRACase(2, 9, 3, T, 64, (T, 3 * T // 4), 30, layer) for T in (1024, 2048) for layer in (0, 14)]


def sra_inputs(case: SRACase, dtype, device=DEVICE, seed=0):
    """[q, k, v], scaled by 2 for sharp maps: plenty of rows with probabilities above theta."""
    B, H, Hkv, T, D = case[:5]
    g = torch.Generator().manual_seed(seed)
    q, k, v = _randn(g, B, H, T, D, scale=2.0), _randn(g, B, Hkv, T, D, scale=2.0), _randn(g, B, Hkv, T, D)
    return [t.to(device, dtype) for t in (q, k, v)]


# ----------------------------------------------------------------------------------------
# Flash (the single-map teaching kernel): q (B, H, T, D); k, v (B, H, S, D)


class FlashCase(NamedTuple):
    B: int
    H: int
    T: int
    S: int
    D: int
    causal: bool = True


FLASH = [
    FlashCase(1, 2, 17, 17, 16),
    FlashCase(2, 2, 33, 33, 32, causal=False),
    FlashCase(1, 2, 1, 33, 32),  # decoding: one query sees every key
    FlashCase(1, 2, 17, 40, 64),  # T < S, bottom-right
    FlashCase(2, 1, 48, 48, 128),
]
FLASH_FULL = [
    FlashCase(B, H, T, S, D, causal)
    for B, H, T, S, D in [(2, 8, 257, 257, 64), (1, 8, 1, 1000, 128), (1, 8, 100, 1000, 128),
                          (1, 8, 1000, 1000, 16), (1, 16, 2048, 2048, 128), (1, 8, 300, 200, 32)]
    for causal in (True, False)
]


def flash_inputs(case: FlashCase, dtype, device=DEVICE, seed=0):
    """[q, k, v]."""
    B, H, T, S, D, _ = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = _randn(g, B, H, T, D), _randn(g, B, H, S, D), _randn(g, B, H, S, D)
    return [t.to(device, dtype) for t in (q, k, v)]
