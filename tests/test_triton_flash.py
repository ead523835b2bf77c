"""The single-map teaching kernel (minimal.triton_flash) against torch's SDPA.

Without CUDA it runs on Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), fp32
and fp16; bf16 on a GPU only. The expected output is torch's scaled_dot_product_attention in
float64 on the same rounded inputs, with a bottom-right causal mask built here with tril.
Errors are max |kernel - SDPA| / max |SDPA|; observed on the interpreter: fp32 <= 3e-7,
fp16 <= 4e-4.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from minimal import attention as ref  # noqa: E402
from minimal import triton_flash as tf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tf.interpreter_active():
    pytest.skip("no CUDA and TRITON_INTERPRET was not set before import", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
# bf16 only on a GPU that has it (sm_80+; a T4 has not): never under the interpreter
BF16 = DEVICE == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if BF16 else [])


def make(B, H, T, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# (B, H, T, S, D, causal): blocks are 16 under the interpreter, so 17 and 33 leave tails
CASES = [
    (1, 2, 17, 17, 16, True),
    (2, 2, 33, 33, 32, False),
    (1, 2, 1, 33, 32, True),  # decoding: one query sees every key
    (1, 2, 17, 40, 64, True),  # T < S, bottom-right
    (2, 1, 48, 48, 128, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}T{}S{}D{}{}".format(*c[:5], "-causal" if c[5] else ""))
def test_matches_sdpa(case, dtype):
    B, H, T, S, D, causal = case
    q, k, v = make(B, H, T, S, D, dtype)
    mask = torch.ones(T, S, dtype=torch.bool, device=DEVICE).tril(diagonal=S - T) if causal else None
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    out = tf.flash_attention(q, k, v, causal=causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel(out, expected) < TOL[dtype]


def test_scale_and_rows_without_keys():
    # T > S under causal: the first T - S rows see no key and must output 0 (the reference's rule)
    q, k, v = make(1, 2, 33, 17, 32, torch.float32)
    out = tf.flash_attention(q, k, v, causal=True, scale=0.3)
    expected = ref.softmax_attention(q, k, v, causal=True, scale=0.3)
    assert torch.isfinite(out).all()
    assert (out[:, :, :16] == 0).all()
    assert rel(out, expected) < 1e-5
    # and the scale matters: the default scale gives a different result
    assert rel(tf.flash_attention(q, k, v, causal=True), expected) > 1e-2


def test_non_contiguous_inputs_and_no_gradient():
    q, k, v = make(1, 2, 17, 17, 32, torch.float32)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    assert not views[0].is_contiguous()
    out = tf.flash_attention(*views)
    assert not out.requires_grad  # forward only
    assert rel(out, ref.softmax_attention(q, k, v)) < 1e-5


@pytest.mark.skipif(not tf.interpreter_active(), reason="interpreter only")
def test_bf16_raises_under_interpreter():
    with pytest.raises(ValueError, match="bfloat16"):
        tf.flash_attention(*make(1, 1, 16, 16, 16, torch.bfloat16))


@pytest.mark.parametrize("change, match", [
    (lambda q, k, v: (q[..., :24], k[..., :24], v[..., :24]), "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :-1]), "k and v"),
    (lambda q, k, v: (q[:, :1], k, v), "agree"),
    (lambda q, k, v: (q[0], k, v), "rank-4"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype"),
    (lambda q, k, v: (q, k.half(), v), "dtype"),
])
def test_bad_inputs_raise_value_error(change, match):
    q, k, v = make(1, 2, 16, 16, 32, torch.float32)
    with pytest.raises(ValueError, match=match):
        tf.flash_attention(*change(q, k, v))
