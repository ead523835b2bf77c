"""The Triton SRA kernels, ``minimal.sra.sra_attention(backend="triton")``, against the spec
``minimal.sra.sra_attention_eager`` (reattend(softmax(q k^T s)) @ v).

The cases and the comparison are the harness's (kernels/cases.py, kernels/check.py: float64
spec on the same rounded inputs, max |kernel - spec| / max |spec|, each case re-weighting some
rows); without CUDA they run on Triton's interpreter in fp32 and fp16, where blocks are 16, so
T = 70 crosses several query and key blocks and leaves tails.
"""

import cases
import pytest
import torch

from minimal import sra, sra_linear

F32 = torch.float32
CONFIG = sra.SRAConfig(**cases.SRA_CONFIG)


@pytest.mark.parametrize("case", cases.SRA, ids=cases.label)
def test_kernel_equals_spec(check, case, kernel_dtype):
    _, _, rel = check.worst(check.sra(case, kernel_dtype), kernel_dtype)
    assert rel <= cases.TOL[kernel_dtype]


def test_kernel_rows_directly_validity_and_the_formula(check):
    """The rows kernel on its own (rows = the last R of S positions, bottom-right causal):
    a row with an empty window, and a row whose window holds nothing above theta, are not
    valid; a row whose window holds the one large probability is, and is re-weighted."""
    B, H, R, S, D = 1, 1, 3, 40, 16
    q, k = torch.zeros(B, H, R, D), torch.zeros(B, H, S, D)
    v = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(0))
    q[..., 0], k[0, 0, 10, 0] = 1.0, 4.0  # key 10 stands out, the others are equal
    plain, small = [], []
    for r in range(R):  # row r sees keys 0 .. S - R + r
        p = torch.softmax((q[0, 0, r] @ k[0, 0, : S - R + r + 1].T) * 0.25, -1)
        plain.append(p @ v[0, 0, : S - R + r + 1])
        small.append(p[0].item())
    theta = torch.tensor([[0.5 * small[0], 2 * small[1], 1.5 * small[2]]])
    lo, hi = torch.tensor([[0, 0, 20]]), torch.tensor([[0, 30, 30]])  # row 0: empty W; row 1: W holds key 10
    key_real = torch.ones(B, S, dtype=torch.bool)
    args = (theta, lo, hi, key_real)
    from minimal.triton_sra import sra_rows

    got, valid = sra_rows(*(t.to(cases.DEVICE) for t in (q, k, v, *args)), 0.25, 4.0)
    blocked, blocked_valid = sra_linear.blocked_rows(q, k, v, *args, 0.25, 4.0, tile=S)  # 1-row blocks
    assert valid.cpu().tolist() == blocked_valid.tolist() == [[[False, True, False]]]
    # row 0 has an empty window, row 2 nothing above theta in W: both keep the plain output
    assert (got[0, 0, 1].cpu() - plain[1]).abs().max() > 1e-2  # valid: re-weighted
    assert torch.allclose(got[0, 0, 1].cpu(), blocked[0, 0, 1], atol=1e-5)
    # and by hand: kept part + r g sum(m v) / sum(m), with p_10 the only probability >= theta in W
    p = torch.softmax((q[0, 0, 1] @ k[0, 0, :39].T) * 0.25, -1)
    keep = p >= theta[0, 1]
    r = 1 - p[keep].sum()
    m = torch.full((30,), 5.0)
    m[keep[:30]] = 100.0
    expected = (p * keep) @ v[0, 0, :39] + r * 4.0 * (m @ v[0, 0, :30]) / m.sum()
    assert torch.allclose(got[0, 0, 1].cpu(), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:SRA")  # the short second text skips the inner pass, with a warning
def test_model_with_triton_backend_matches_blocked(check, sharp_tiny):
    model, tok = sharp_tiny(8.0, num_hidden_layers=3)  # sharp maps, so SRA acts
    model.to(cases.DEVICE)
    enc = tok(["Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo. Where does Bob live?",
               "Eve lives in Cairo. Where does Eve live?"], return_tensors="pt", padding=True).to(cases.DEVICE)
    config = sra.SRAConfig(begin=3, tail=6, f_inner=0.5, f_outer=0.5, gain=4.0)
    outs = {}
    with torch.no_grad():
        for backend in ("blocked", "triton"):
            with sra.sra(model, config, backend=backend):
                outs[backend] = model(**enc).logits
        base = model(**enc).logits
    real = enc.attention_mask.bool()
    assert (outs["triton"] - outs["blocked"])[real].abs().max() < 1e-4
    assert (outs["triton"] - base)[real].abs().max() > 1e-3


def test_bf16_raises_under_the_interpreter(check):
    from minimal import triton_sra

    if not triton_sra.interpreter_active():
        pytest.skip("interpreter only")
    case = cases.SRA[1]
    q, k, v = cases.sra_inputs(case, torch.bfloat16)
    for layer in (case.layer, case.L - 1):  # checked up front: also where SRA touches no row (the last layer)
        with pytest.raises(ValueError, match="bfloat16"):
            sra.sra_attention(q, k, v, layer, case.L, CONFIG, backend="triton")


def test_bad_input(check):
    case = cases.SRA[1]  # a case whose rows SRA touches: the kernel runs
    q, k, v = cases.sra_inputs(case, F32)
    for layer in (case.layer, case.L - 1):  # the last layer: no row touched, checked all the same
        with pytest.raises(ValueError, match="head_dim"):
            sra.sra_attention(q[..., :8], k[..., :8], v[..., :8], layer, case.L, CONFIG, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        sra.sra_attention(q.double(), k.double(), v.double(), case.layer, case.L, CONFIG, backend="triton")
    with pytest.raises(ValueError, match="prefill"):
        sra.sra_attention(q[:, :, :5], k, v, case.layer, case.L, CONFIG, backend="triton")
