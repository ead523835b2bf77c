"""The fused Triton OpAmp kernel against its spec, minimal.attention.opamp_attention.

The cases and the comparison are the harness's (kernels/cases.py, kernels/check.py: float64
spec on the same rounded inputs, max |kernel - spec| / max |spec| of the output and of each
of the five gradients); without CUDA they run on Triton's interpreter in fp32 and fp16.
"""

import os

import cases
import pytest
import torch

from minimal import attention as ref

F32 = torch.float32


@pytest.mark.parametrize("case", cases.OPAMP, ids=cases.label)
def test_forward_and_gradients_match_reference(check, case, kernel_dtype):
    name, _, rel = check.worst(check.opamp(case, kernel_dtype), kernel_dtype)
    assert rel < cases.TOL[kernel_dtype], f"{name}: {rel:.2e}"


@pytest.mark.parametrize("K, scale", [(0.5, None), (2.0, 0.3)])
def test_other_gains_and_scale(check, K, scale):
    # K = 1/2 switches the minus map off entirely (b = K - 1/2 = 0)
    name, _, rel = check.worst(check.opamp(cases.OPAMP[0], F32, K=K, scale=scale), F32)
    assert rel < cases.TOL[F32], f"{name}: {rel:.2e}"


def test_no_grad_forward_and_fully_padded_item(check):
    inputs, _ = cases.opamp_inputs(cases.OpAmpCase(2, 2, 1, 17, 17, 16), F32)
    kpm = torch.ones(2, 17, dtype=torch.bool, device=cases.DEVICE)
    kpm[1] = False  # item 1 is all padding: its output must be 0, not NaN
    with torch.no_grad():
        out = check.triton_opamp.opamp_attention(*inputs, key_padding_mask=kpm)
    assert (out[1] == 0).all()
    assert cases.rel_error(out, ref.opamp_attention(*inputs, key_padding_mask=kpm)) < 1e-5


def test_non_contiguous_inputs(check):
    # Hugging Face builds (B, H, T, D) views by transposing (B, T, H, D): not contiguous
    inputs, _ = cases.opamp_inputs(cases.OPAMP[0], F32)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in inputs]
    assert not views[0].is_contiguous()
    out = check.triton_opamp.opamp_attention(*views)
    out.sum().backward()
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    expected = ref.opamp_attention(*ins)
    expected.sum().backward()
    assert cases.rel_error(out, expected) < 1e-5
    for a, b in zip(views, ins):
        assert cases.rel_error(a.grad, b.grad) < 1e-5


def test_equal_maps_give_softmax_attention(check):
    (q, k, _, _, v), _ = cases.opamp_inputs(cases.OpAmpCase(1, 2, 2, 17, 17, 32), F32)
    out = check.triton_opamp.opamp_attention(q, k, q, k, v, K=10.0)
    assert cases.rel_error(out, ref.softmax_attention(q, k, v)) < 1e-5


# ----------------------------------------------------------------------------------------
# bad inputs


def test_bf16_raises_under_interpreter(check):
    if not check.triton_opamp.interpreter_active():
        pytest.skip("interpreter only")
    inputs, _ = cases.opamp_inputs(cases.OPAMP[0], torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        check.triton_opamp.opamp_attention(*inputs)


@pytest.mark.parametrize("D", [8, 256])
def test_unsupported_head_dim_raises(check, D):
    inputs, _ = cases.opamp_inputs(cases.OpAmpCase(1, 2, 2, 3, 3, D), F32)
    with pytest.raises(ValueError, match="head_dim"):
        check.triton_opamp.opamp_attention(*inputs)


@pytest.mark.parametrize("K", [0.0, -1.0, float("inf")])
def test_bad_gain_raises(check, K):
    inputs, _ = cases.opamp_inputs(cases.OpAmpCase(1, 2, 2, 3, 3, 16), F32)
    with pytest.raises(ValueError, match="K"):
        check.triton_opamp.opamp_attention(*inputs, K=K)


def test_reference_checks_are_reused(check):
    inputs, _ = cases.opamp_inputs(cases.OpAmpCase(1, 3, 2, 3, 3, 16), F32)
    with pytest.raises(ValueError, match="multiple"):
        check.triton_opamp.opamp_attention(*inputs)


def test_cpu_tensors_without_interpreter_raise(check, monkeypatch):
    monkeypatch.setattr("minimal.triton_common.interpreter_active", lambda: False)  # the kernels' shared switch
    inputs, _ = cases.opamp_inputs(cases.OPAMP[0], F32, device="cpu")
    with pytest.raises(ValueError, match="CUDA"):
        check.triton_opamp.opamp_attention(*inputs)


def test_interpreter_flag_matches_environment(check):
    # the kernels were decorated under the TRITON_INTERPRET seen at import (no GPU needed)
    assert check.triton_opamp.interpreter_active() == (os.environ.get("TRITON_INTERPRET") == "1")
