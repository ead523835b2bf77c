"""The single-map teaching kernel (minimal.triton_flash) against its spec, softmax_attention.

The cases and the comparison are the harness's (kernels/cases.py, kernels/check.py: float64
spec on the same rounded inputs, max |kernel - spec| / max |spec|); without CUDA they run on
Triton's interpreter in fp32 and fp16.
"""

import cases
import pytest
import torch

from minimal import attention as ref

F32 = torch.float32


@pytest.mark.parametrize("case", cases.FLASH, ids=cases.label)
def test_matches_spec(check, case, kernel_dtype):
    _, _, rel = check.worst(check.flash(case, kernel_dtype), kernel_dtype)
    assert rel < cases.TOL[kernel_dtype]


def test_scale_and_rows_without_keys(check):
    # T > S under causal: the first T - S rows see no key and must output 0 (the reference's rule)
    q, k, v = cases.flash_inputs(cases.FlashCase(1, 2, 33, 17, 32), F32)
    out = check.triton_flash.flash_attention(q, k, v, causal=True, scale=0.3)
    expected = ref.softmax_attention(q, k, v, causal=True, scale=0.3)
    assert torch.isfinite(out).all()
    assert (out[:, :, :16] == 0).all()
    assert cases.rel_error(out, expected) < 1e-5
    # and the scale matters: the default scale gives a different result
    assert cases.rel_error(check.triton_flash.flash_attention(q, k, v, causal=True), expected) > 1e-2


def test_non_contiguous_inputs_and_no_gradient(check):
    q, k, v = cases.flash_inputs(cases.FLASH[0], F32)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    assert not views[0].is_contiguous()
    out = check.triton_flash.flash_attention(*views)
    assert not out.requires_grad  # forward only
    assert cases.rel_error(out, ref.softmax_attention(q, k, v)) < 1e-5


def test_bf16_raises_under_interpreter(check):
    if not check.triton_flash.interpreter_active():
        pytest.skip("interpreter only")
    with pytest.raises(ValueError, match="bfloat16"):
        check.triton_flash.flash_attention(*cases.flash_inputs(cases.FlashCase(1, 1, 16, 16, 16), torch.bfloat16))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v: (q[..., :24], k[..., :24], v[..., :24]), "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :-1]), "shape of k"),
    (lambda q, k, v: (q[:, :1], k, v), "multiple"),
    (lambda q, k, v: (torch.cat([q, q], 1), k, v), "as many key as query heads"),  # no GQA in this kernel
    (lambda q, k, v: (q[0], k, v), "rank 4"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype"),
    (lambda q, k, v: (q, k.half(), v), "dtype"),
])
def test_bad_inputs_raise_value_error(check, change, match):
    q, k, v = cases.flash_inputs(cases.FlashCase(1, 2, 16, 16, 32), F32)
    with pytest.raises(ValueError, match=match):
        check.triton_flash.flash_attention(*change(q, k, v))
