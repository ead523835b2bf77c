"""The fused Triton OpAmp kernel against the pure-PyTorch reference.

On a machine without CUDA this runs through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernel), in fp32 and fp16; bf16 is checked on
a GPU only (under the interpreter it must raise).

Error metric: max |kernel - reference| / max |reference| per tensor (output and each of the
five gradients), the reference being minimal.attention.opamp_attention run in float64 on
the same (rounded) inputs. Tolerances, with what was observed on the interpreter:

    fp32  1e-5   (observed <= 4e-7)
    fp16  5e-3   (observed <= 7e-4: probabilities and dS are rounded to fp16 before the dots)
    bf16  3e-2   (GPU only: 8-bit mantissa)
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from minimal import attention as ref  # noqa: E402
from minimal import triton_opamp as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tk.interpreter_active():
    pytest.skip("no CUDA and TRITON_INTERPRET was not set before import", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# bf16 only on a GPU that has it (sm_80+; a T4 has not): never under the interpreter
BF16 = DEVICE == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if BF16 else [])
NAMES = ("out", "dq1", "dk1", "dq2", "dk2", "dv")


def make(B, H, Hkv, T, S, D, dtype, pad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, q2 = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k1, k2, v = (torch.randn(B, Hkv, S, D, generator=g) for _ in range(3))
    kpm = None
    if pad:  # item 0 left-padded, item 1 (if any) with a hole in the middle
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[0, : S // 3] = False
        if B > 1:
            kpm[1, S // 2] = False
        kpm = kpm.to(DEVICE)
    tensors = [t.to(DEVICE, dtype) for t in (q1, k1, q2, k2, v)]
    return tensors, kpm


def errors(B, H, Hkv, T, S, D, dtype, causal, pad, K=10.0, scale=None):
    """Max relative errors of the output and the five gradients, kernel vs float64 reference."""
    inputs, kpm = make(B, H, Hkv, T, S, D, dtype, pad)
    ins = [t.clone().requires_grad_() for t in inputs]
    out = tk.opamp_attention(*ins, K=K, causal=causal, key_padding_mask=kpm, scale=scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, ins, dout)

    ins64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = ref.opamp_attention(*ins64, K=K, causal=causal, key_padding_mask=kpm, scale=scale)
    grads64 = torch.autograd.grad(out64, ins64, dout.double())

    result = {}
    for name, a, b in zip(NAMES, (out, *grads), (out64, *grads64)):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        result[name] = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    return result


# (B, H, Hkv, T, S, D, causal, pad): blocks are 16 under the interpreter, so 17 and 33 leave tails
CASES = [
    (1, 2, 2, 17, 17, 16, True, False),  # MHA, one tail row
    (2, 4, 2, 33, 33, 32, True, True),  # GQA 2:1, key padding, 3 blocks
    (1, 4, 1, 33, 33, 32, False, False),  # GQA 4:1 (MQA), non-causal
    (1, 2, 1, 1, 33, 32, True, False),  # decoding: T=1 against S=33
    (2, 2, 1, 17, 33, 24, True, True),  # T < S bottom-right, padding, D=24 padded to 32
    (1, 2, 2, 33, 17, 16, True, False),  # T > S: the first 16 rows see no key (output 0)
    (1, 2, 2, 17, 33, 16, False, True),  # non-causal with padding, T < S
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}Hkv{}T{}S{}D{}{}{}".format(
    *c[:6], "-causal" if c[6] else "", "-pad" if c[7] else ""))
def test_forward_and_gradients_match_reference(case, dtype):
    errs = errors(*case[:6], dtype=dtype, causal=case[6], pad=case[7])
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"errors above {TOL[dtype]:.0e}: {bad}"


@pytest.mark.parametrize("K, scale", [(0.5, None), (2.0, 0.3)])
def test_other_gains_and_scale(K, scale):
    # K = 1/2 switches the minus map off entirely (b = K - 1/2 = 0)
    errs = errors(1, 2, 1, 17, 17, 16, torch.float32, causal=True, pad=False, K=K, scale=scale)
    assert max(errs.values()) < TOL[torch.float32], errs


def test_no_grad_forward_and_fully_padded_item():
    inputs, _ = make(2, 2, 1, 17, 17, 16, torch.float32)
    kpm = torch.ones(2, 17, dtype=torch.bool, device=DEVICE)
    kpm[1] = False  # item 1 is all padding: its output must be 0, not NaN
    with torch.no_grad():
        out = tk.opamp_attention(*inputs, key_padding_mask=kpm)
    expected = ref.opamp_attention(*inputs, key_padding_mask=kpm)
    assert (out[1] == 0).all()
    assert (out - expected).abs().max() < 1e-5 * expected.abs().max()


def test_non_contiguous_inputs():
    # Hugging Face builds (B, H, T, D) views by transposing (B, T, H, D): not contiguous
    (q1, k1, q2, k2, v), _ = make(1, 2, 1, 17, 17, 16, torch.float32)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q1, k1, q2, k2, v)]
    assert not views[0].is_contiguous()
    out = tk.opamp_attention(*views)
    out.sum().backward()
    ins = [t.detach().clone().requires_grad_() for t in (q1, k1, q2, k2, v)]
    expected = ref.opamp_attention(*ins)
    expected.sum().backward()
    assert (out - expected).abs().max() < 1e-5 * expected.abs().max()
    for a, b in zip(views, ins):
        assert (a.grad - b.grad).abs().max() < 1e-5 * b.grad.abs().max()


def test_equal_maps_give_softmax_attention():
    (q, k, _, _, v), _ = make(1, 2, 2, 17, 17, 32, torch.float32)
    out = tk.opamp_attention(q, k, q, k, v, K=10.0)
    expected = ref.softmax_attention(q, k, v)
    assert (out - expected).abs().max() < 1e-5 * expected.abs().max()


# ----------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.skipif(not tk.interpreter_active(), reason="interpreter only")
def test_bf16_raises_under_interpreter():
    inputs, _ = make(1, 2, 2, 17, 17, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        tk.opamp_attention(*inputs)


@pytest.mark.parametrize("D", [8, 256])
def test_unsupported_head_dim_raises(D):
    inputs, _ = make(1, 2, 2, 3, 3, D, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        tk.opamp_attention(*inputs)


@pytest.mark.parametrize("K", [0.0, -1.0, float("inf")])
def test_bad_gain_raises(K):
    inputs, _ = make(1, 2, 2, 3, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="K"):
        tk.opamp_attention(*inputs, K=K)


def test_reference_checks_are_reused():
    (q1, k1, q2, k2, v), _ = make(1, 3, 2, 3, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        tk.opamp_attention(q1, k1, q2, k2, v)


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    monkeypatch.setattr(tk, "interpreter_active", lambda: False)
    q1, k1, q2, k2, v = (torch.randn(1, 2, 3, 16) for _ in range(5))
    with pytest.raises(ValueError, match="CUDA"):
        tk.opamp_attention(q1, k1, q2, k2, v)


def test_interpreter_flag_matches_environment():
    # the kernels were decorated under the TRITON_INTERPRET seen at import (no GPU needed)
    assert tk.interpreter_active() == (os.environ.get("TRITON_INTERPRET") == "1")
