"""The pure-PyTorch references (minimal.attention) against independent implementations.

- transformers' DiffLlama attention (Differential Transformer, arXiv 2410.05258): OpAmp is
  its math with lambda = (K - 1/2)/(K + 1/2), gain K + 1/2 and no per-head norm.
- torch's scaled_dot_product_attention: with Q2 = Q1 and K2 = K1 OpAmp is plain attention.
- GQA against explicitly repeated K/V, key padding, decoding, fully masked rows, bad inputs.

Everything runs in float64, so the tolerances are tight (1e-10) except against DiffLlama,
whose eager path takes its softmax in float32 (1e-6 relative there).
"""

import pytest
import torch
import torch.nn.functional as F

from minimal.attention import (
    softmax_probs as attention_probs,
    check_opamp_inputs,
    opamp_attention,
    opamp_combine,
    opamp_maps,
    softmax_attention,
)
from minimal.opamp_theory import diffllama_vs_opamp

DT = torch.float64
TOL = 1e-10


def rand(*shape, dtype=DT, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=dtype, generator=g)


def make_inputs(B=2, H=4, Hkv=2, T=7, S=7, D=16, dtype=DT, seed=0):
    torch.manual_seed(seed)
    q1, q2 = rand(B, H, T, D, dtype=dtype), rand(B, H, T, D, dtype=dtype)
    k1, k2, v = (rand(B, Hkv, S, D, dtype=dtype) for _ in range(3))
    return q1, k1, q2, k2, v


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------
# (a) against transformers' DiffLlama attention


@pytest.mark.parametrize("K", [0.5, 1.0, 10.0])
def test_opamp_matches_diffllama_attention(K):
    """transformers' own DiffLlamaAttention.forward with lambda_full = (K-1/2)/(K+1/2), identity
    RoPE, norm and o_proj, equals (1 - lambda_init)/(K + 1/2) x OpAmp (the set-up and the
    derivation are in minimal.opamp_theory.diffllama_vs_opamp, which notebook 01 also runs)."""
    theirs, ours = diffllama_vs_opamp(K)
    assert max_rel(ours, theirs) < 1e-6
    with_norm, _ = diffllama_vs_opamp(K, keep_norm=True)  # DiffLlama's per-head norm: a real difference
    assert max_rel(ours, with_norm) > 1e-3


# ----------------------------------------------------------------------------------------
# (b) equal maps: OpAmp is plain softmax attention, for any K


@pytest.mark.parametrize("K", [0.3, 1.0, 10.0, 1000.0])
@pytest.mark.parametrize("causal", [True, False])
def test_equal_maps_is_softmax_attention_and_sdpa(K, causal):
    q, k, _, _, v = make_inputs(H=4, Hkv=4, T=8, S=8)
    ours = opamp_attention(q, k, q, k, v, K=K, causal=causal)
    assert max_rel(ours, softmax_attention(q, k, v, causal=causal)) < TOL
    assert max_rel(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal)) < TOL


def test_softmax_attention_matches_sdpa_bottom_right_gqa_padding():
    B, H, Hkv, T, S, D = 2, 4, 2, 5, 9, 16
    q, k, _, _, v = make_inputs(B, H, Hkv, T, S, D)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[0, :2] = False
    kpm[1, 4] = False
    # built independently of the reference: bottom-right causal = tril with offset S - T
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)[None, None] & kpm[:, None, None, :]
    rep = H // Hkv
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask
    )
    assert max_rel(softmax_attention(q, k, v, causal=True, key_padding_mask=kpm), expected) < TOL


def test_opamp_is_the_combined_map_times_v():
    q1, k1, q2, k2, v = make_inputs(H=2, Hkv=2)
    K = 4.0
    m_plus, m_minus = opamp_maps(q1, k1, q2, k2)
    assert torch.allclose(m_plus.sum(-1), torch.ones(()).to(DT))
    combined = opamp_combine(m_plus, m_minus, K)  # K (M+ - M-) + (M+ + M-)/2
    assert torch.allclose(combined.sum(-1), torch.ones(()).to(DT))  # common-mode gain 1
    assert (combined < 0).any()  # entries can go negative
    assert max_rel(opamp_attention(q1, k1, q2, k2, v, K=K), combined @ v) < TOL
    # explicit softmax, written out once more
    s = q1.shape[-1] ** -0.5
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    p1 = torch.softmax((q1 @ k1.transpose(-1, -2) * s).masked_fill(~causal, -torch.inf), -1)
    p2 = torch.softmax((q2 @ k2.transpose(-1, -2) * s).masked_fill(~causal, -torch.inf), -1)
    assert max_rel(opamp_attention(q1, k1, q2, k2, v, K=K), (K + 0.5) * p1 @ v - (K - 0.5) * p2 @ v) < TOL


# ----------------------------------------------------------------------------------------
# (c) GQA, padding, decoding, masked rows


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_equals_repeated_kv(causal):
    q1, k1, q2, k2, v = make_inputs(H=6, Hkv=2, T=5, S=8)
    rep = lambda t: t.repeat_interleave(3, dim=1)  # noqa: E731  head h -> kv head h // 3
    expected = opamp_attention(q1, rep(k1), q2, rep(k2), rep(v), causal=causal)
    assert max_rel(opamp_attention(q1, k1, q2, k2, v, causal=causal), expected) < TOL


def test_key_padding_equals_dropping_the_padded_keys():
    q1, k1, q2, k2, v = make_inputs(B=1, T=6, S=6)
    kpm = torch.tensor([[False, False, True, True, True, True]])  # left padding
    out = opamp_attention(q1, k1, q2, k2, v, causal=False, key_padding_mask=kpm)
    keep = lambda t: t[:, :, 2:]  # noqa: E731
    expected = opamp_attention(q1, keep(k1), q2, keep(k2), keep(v), causal=False)
    assert max_rel(out, expected) < TOL
    # and the padded values do not leak in
    v2 = v.clone()
    v2[:, :, :2] = 1e6
    assert max_rel(opamp_attention(q1, k1, q2, k2, v2, causal=False, key_padding_mask=kpm), out) < TOL


def test_single_query_decoding_is_the_last_row():
    q1, k1, q2, k2, v = make_inputs(T=9, S=9)
    full = opamp_attention(q1, k1, q2, k2, v, causal=True)
    last = opamp_attention(q1[:, :, -1:], k1, q2[:, :, -1:], k2, v, causal=True)  # T=1, S=9
    assert max_rel(last, full[:, :, -1:]) < TOL


def test_rows_without_keys_are_zero_not_nan():
    q1, k1, q2, k2, v = (t.requires_grad_() for t in make_inputs(B=2, T=6, S=4))  # T > S
    kpm = torch.ones(2, 4, dtype=torch.bool)
    kpm[1] = False  # item 1: everything padded
    out = opamp_attention(q1, k1, q2, k2, v, causal=True, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert (out[0, :, :2] == 0).all()  # causal, T - S = 2 rows before the first key
    assert (out[1] == 0).all()
    assert (out[0, :, 2:] != 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q1, k1, q2, k2, v))
    assert (attention_probs(q1, k1, key_padding_mask=kpm)[1] == 0).all()


def test_low_precision_inputs_keep_their_dtype():
    q1, k1, q2, k2, v = make_inputs(dtype=torch.float32)
    half = [t.to(torch.bfloat16) for t in (q1, k1, q2, k2, v)]
    out = opamp_attention(*half, K=2.0)
    assert out.dtype == torch.bfloat16
    assert max_rel(out.float(), opamp_attention(q1, k1, q2, k2, v, K=2.0)) < 5e-2


# ----------------------------------------------------------------------------------------
# bad inputs


def _bad_cases():
    q1, k1, q2, k2, v = make_inputs(H=4, Hkv=2)
    return {
        "K<=0": ((q1, k1, q2, k2, v), dict(K=0.0), "K"),
        "K<0": ((q1, k1, q2, k2, v), dict(K=-1.0), "K"),
        "K=nan": ((q1, k1, q2, k2, v), dict(K=float("nan")), "K"),
        "K=inf": ((q1, k1, q2, k2, v), dict(K=float("inf")), "K"),
        "q shapes": ((q1, k1, q2[:, :, :-1], k2, v), {}, "q1 and q2"),
        "k shapes": ((q1, k1, q2, k2[:, :, :-1], v), {}, "k1 and k2"),
        "v shape": ((q1, k1, q2, k2, v[..., :-1]), {}, "v must"),
        "H % Hkv": ((q1[:, :3], k1, q2[:, :3], k2, v), {}, "multiple"),
        "dtype": ((q1, k1, q2.float(), k2, v), {}, "dtype"),
        "rank": ((q1[0], k1, q2[0], k2, v), {}, "rank 4"),
        "head dim": ((q1[..., :8], k1, q2[..., :8], k2, v), {}, "head_dim"),
        "mask dtype": ((q1, k1, q2, k2, v), dict(key_padding_mask=torch.ones(2, 7)), "bool"),
        "mask shape": ((q1, k1, q2, k2, v), dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), r"\(B, S\)"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_raise_value_error(case):
    args, kwargs, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        opamp_attention(*args, **kwargs)


def test_check_returns_sizes():
    assert check_opamp_inputs(*make_inputs(B=2, H=4, Hkv=2, T=5, S=7, D=16)) == (2, 4, 2, 5, 7, 16)
