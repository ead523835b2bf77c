"""The pure-PyTorch references (minimal.attention) against independent implementations.

- transformers' DiffLlama attention (Differential Transformer, arXiv 2410.05258): OpAmp is
  its math with lambda = (K - 1/2)/(K + 1/2), gain K + 1/2 and no per-head norm.
- torch's scaled_dot_product_attention: with Q2 = Q1 and K2 = K1 OpAmp is plain attention.
- GQA against explicitly repeated K/V, key padding, decoding, fully masked rows, bad inputs.

Everything runs in float64, so the tolerances are tight (1e-10) except against DiffLlama,
whose eager path takes its softmax in float32 (1e-6 relative there).
"""

import math

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
    """Run transformers' own DiffLlamaAttention.forward and recover OpAmp from it.

    How DiffLlama computes (transformers 5.x, modeling_diffllama.py): the H query heads and
    Hkv key heads are split in halves; query head i < H/2 with its key head is map 1, query
    head i + H/2 with its key head is map 2; V's KV heads are split in two halves that are
    concatenated along the head dim (so each map reads values of width 2D). Then
    out = (1 - lambda_init) * RMSNorm(O1 - lambda_full * O2), lambda_full =
    exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, followed by o_proj.

    To compare: set its learnable lambda vectors so that lambda_full = (K-1/2)/(K+1/2),
    replace the parameter-free RMSNorm (`groupnorm`, a plain submodule) and o_proj by
    identities, and make RoPE the identity (cos=1, sin=0). Then
    DiffLlama = (1 - lambda_init)/(K + 1/2) * OpAmp, where OpAmp's values are the two V
    halves (OpAmp is linear in V, so we run it once per half and concatenate).
    """
    from transformers import DiffLlamaConfig
    from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention

    B, T, H, Hkv, D = 2, 9, 4, 2, 16
    cfg = DiffLlamaConfig(
        hidden_size=H * D, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=D,
        intermediate_size=32, num_hidden_layers=1, vocab_size=16,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    attn = DiffLlamaAttention(cfg, layer_idx=1).to(DT).eval()

    lam = (K - 0.5) / (K + 0.5)
    with torch.no_grad():  # exp(lq1.lk1) - exp(0) + lambda_init = lam
        x = math.log(lam + 1 - attn.lambda_init)
        attn.lambda_q1.fill_(x / D)
        attn.lambda_k1.fill_(1.0)
        attn.lambda_q2.zero_()
        attn.lambda_k2.zero_()
    attn.groupnorm = torch.nn.Identity()  # the per-head norm that OpAmp does not have
    attn.o_proj = torch.nn.Identity()

    hidden = rand(B, T, H * D, seed=1)
    cos, sin = torch.ones(B, T, D, dtype=DT), torch.zeros(B, T, D, dtype=DT)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, -3:] = False  # right padding (no query row is left without keys)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & kpm[:, None, None, :]
    additive = torch.zeros(B, 1, T, T, dtype=DT).masked_fill(~allowed, torch.finfo(DT).min)
    with torch.no_grad():
        theirs, _ = attn(hidden, (cos, sin), attention_mask=additive)  # (B, T, H * D)

        q = attn.q_proj(hidden).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(hidden).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = attn.v_proj(hidden).view(B, T, Hkv, D).transpose(1, 2)
        h, hk = H // 2, Hkv // 2
        q1, q2, k1, k2 = q[:, :h], q[:, h:], k[:, :hk], k[:, hk:]
        halves = [opamp_attention(q1, k1, q2, k2, vv, K=K, key_padding_mask=kpm) for vv in (v[:, :hk], v[:, hk:])]
        ours = torch.cat(halves, dim=-1).transpose(1, 2).reshape(B, T, H * D)  # (B, T, H/2 * 2D)
        ours = ours * (1 - attn.lambda_init) / (K + 0.5)
    assert max_rel(ours, theirs) < 1e-6


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
