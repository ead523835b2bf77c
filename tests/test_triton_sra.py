"""The Triton SRA kernels against the spec, reattend(softmax(q k^T s)) @ v.

On a machine without CUDA this runs through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports the kernel), in fp32 and fp16; bf16 only on a GPU
(under the interpreter it must raise). Shapes are small so the interpreter stays fast; blocks
are 16 there, so T = 70 crosses several query and key blocks and leaves tails.

Error metric: max |kernel - spec| / max |spec|, the spec computed in float64 from the same
(rounded) inputs. Tolerances, with what the interpreter gave: fp32 1e-5 (observed <= 8e-7);
fp16 5e-3 (observed <= 5e-4: probabilities are rounded to fp16 before the dots); bf16 3e-2
(GPU only: 8-bit mantissa).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from minimal import sra  # noqa: E402
from minimal import triton_sra as tk  # noqa: E402
from minimal.models import tiny_model  # noqa: E402
from minimal.sra import SRAConfig  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not tk.interpreter_active():
    pytest.skip("no CUDA and TRITON_INTERPRET was not set before import", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# bf16 only on a GPU that has it (sm_80+; a T4 has not): never under the interpreter
BF16 = DEVICE == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if BF16 else [])
CONFIG = SRAConfig(begin=5, tail=12, f_inner=0.5, f_outer=0.5, gain=5.0)


def make(B, H, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * 2  # sharp maps: plenty of rows above threshold
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    v = torch.randn(B, Hkv, T, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def spec(q, k, v, layer, L, config, lengths):
    """reattend(softmax(q k^T / sqrt(D) + causal + left padding)) @ v, float64, on CPU."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    pos = torch.arange(T)
    ok = (pos[None, None, :] <= pos[None, :, None]) & (pos[None, None, :] >= T - torch.tensor(lengths)[:, None, None])
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~ok[:, None], -math.inf)
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return sra.reattend(probs, layer, L, config, lengths) @ v


def rel_error(got, expected):
    return ((got.double().cpu() - expected).abs().max() / expected.abs().max()).item()


# (B, H, Hkv, T, D, lengths, L, layers)
CASES = [
    (1, 2, 2, 70, 16, [70], 4, [0, 1]),  # MHA, inner + outer passes
    (3, 4, 2, 70, 16, [70, 55, 40], 4, [1, 2]),  # GQA 2:1, left padding, each item its own windows
    (2, 3, 1, 45, 24, [45, 33], 3, [0, 1]),  # MQA, D = 24 padded to 32 in the kernel
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_spec(case, dtype):
    B, H, Hkv, T, D, lengths, L, layers = case
    q, k, v = make(B, H, Hkv, T, D, dtype)
    for layer in layers:
        expected = spec(q, k, v, layer, L, CONFIG, lengths)
        got = tk.sra_attention(q, k, v, layer, L, CONFIG, lengths=lengths)
        assert got.dtype == dtype and got.shape == q.shape
        assert torch.isfinite(got).all()
        assert rel_error(got, expected) <= TOL[dtype], f"layer {layer}"
        plain = spec(q, k, v, L - 1, L, CONFIG, lengths)  # the last layer: plain attention
        assert (expected - plain).abs().max() > 1e-3  # the case really re-weights something


def test_kernel_rows_directly_validity_and_the_formula():
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
    got, valid = tk._sra_rows_triton(*(t.to(DEVICE) for t in (q, k, v, *args)), 0.25, 4.0)
    blocked, blocked_valid = sra._sra_rows(q, k, v, *args, 0.25, 4.0, tile=16 * 40)  # 1-row blocks
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
def test_model_with_triton_impl_matches_blocked():
    from minimal import hooks, load_model

    model = tiny_model("tiny-llama", num_hidden_layers=3)
    with torch.no_grad():
        for m in hooks.attention_modules(model):  # sharpen the random maps so SRA acts
            m.q_proj.weight.mul_(8.0)
            m.k_proj.weight.mul_(8.0)
    _, tok = load_model("tiny-llama")
    model.to(DEVICE)
    enc = tok(["Alice lives in Paris. Bob lives in Rome. Carol lives in Oslo. Where does Bob live?",
               "Eve lives in Cairo. Where does Eve live?"], return_tensors="pt", padding=True).to(DEVICE)
    config = SRAConfig(begin=3, tail=6, f_inner=0.5, f_outer=0.5, gain=4.0)
    outs = {}
    with torch.no_grad():
        for impl in ("blocked", "triton"):
            with sra.sra(model, config, impl=impl):
                outs[impl] = model(**enc).logits
        base = model(**enc).logits
    real = enc.attention_mask.bool()
    assert (outs["triton"] - outs["blocked"])[real].abs().max() < 1e-4
    assert (outs["triton"] - base)[real].abs().max() > 1e-3


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only behaviour")
def test_bf16_raises_under_the_interpreter():
    q, k, v = make(1, 2, 2, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="bfloat16"):
        tk.sra_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0, 4, CONFIG)


def test_bad_input():
    q, k, v = make(1, 2, 2, 20, 16, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        tk.sra_attention(q[..., :8], k[..., :8], v[..., :8], 0, 4, CONFIG)
    with pytest.raises(ValueError, match="dtype"):
        tk.sra_attention(q.double(), k.double(), v.double(), 0, 4, CONFIG)
    with pytest.raises(ValueError, match="prefill"):
        tk.sra_attention(q[:, :, :5], k, v, 0, 4, CONFIG)
