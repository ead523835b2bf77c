"""Scaled ReAttention: the spec against a literal transcription, the linear-memory form against
the spec, and SRA in a model (batches, prefill only, warnings, bad input)."""

import math
import warnings

import pytest
import torch

from functools import partial

from minimal import hooks, sra, sra_linear
from minimal.sra import SRAConfig

# ----------------------------------------------------------------------------------------
# The independent computation: the authors' algorithm as their public code runs it, transcribed
# loop by loop, batch 1, in place, on Python lists. Nothing here is shared with minimal.sra.


def literal_sra(A, layer, L, b, t, f_inner, f_outer, g):
    """A: [H][n][n] probabilities of one sequence (lists, modified in place)."""
    H, n = len(A), len(A[0])

    def reweight(row, window, theta, key_end):
        if not any(row[j] > theta for j in window):  # validity: some A > theta in W
            return
        for j in range(key_end):  # drop what is below theta
            if row[j] < theta:
                row[j] = 0.0
        r = 1.0 - sum(row)  # the removed mass
        m = [100.0 if row[j] >= theta else 5.0 for j in window]
        total = sum(m)
        for j, mj in zip(window, m):
            row[j] += r * g * mj / total

    # inner pass: layers 0 .. L-2, skipped when n <= b + t + 3; touches keys < e only
    if layer <= L - 2 and n > b + t + 3:
        c = math.ceil((n - b - t - 3) / (L + 3))
        s = (layer + 3) * c + b + 3
        e = min(s + c, n - t)
        w = e - s
        theta = f_inner / (s - b)
        for h in range(H):
            for i in range(s, e):
                reweight(A[h][i], range(s - 3 * w, s - 2 * w), theta, e)
    # outer pass: layers 1 .. L-2, skipped when n <= t + 3; the last t rows
    if 1 <= layer <= L - 2 and n > t + 3:
        c = math.ceil((n - t - 3) / (L + 3))
        start = (layer + 2) * c + 3
        window = range(start, min(start + c, n - t))
        theta = f_outer / (n - t)
        for h in range(H):
            for i in range(n - t, n):
                reweight(A[h][i], window, theta, n)
    return A


def causal_probs(H, n, seed, sharp=2.0, dtype=torch.float64):
    """Random causal softmax maps (H, n, n) with a spread of large and tiny probabilities."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(H, n, n, generator=g, dtype=dtype) * sharp
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    return torch.softmax(scores, -1)


# ----------------------------------------------------------------------------------------
# Config and pass formulas


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(gain=0), "gain"), (dict(gain=-1.0), "gain"), (dict(gain=float("inf")), "gain"),
        (dict(f_inner=0), "f_inner"), (dict(f_inner=1.5), "f_inner"), (dict(f_outer=-0.1), "f_outer"),
        (dict(f_outer=float("nan")), "f_outer"), (dict(begin=-1), "begin"), (dict(tail=-5), "tail"),
        (dict(begin=2.5), "begin"), (dict(tail=True), "tail"),
    ],
)
def test_config_rejects_bad_values_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SRAConfig(**kwargs)


def test_defaults_are_the_authors():
    c = SRAConfig()
    assert (c.begin, c.tail, c.f_inner, c.f_outer, c.gain) == (100, 200, 0.5, 0.3, 4.0)
    SRAConfig(f_inner=1.0, f_outer=1.0, gain=0.5, begin=0, tail=0)  # the edges that are allowed


def test_pass_formulas_by_hand():
    c = SRAConfig()  # b=100, t=200
    # n = 1000, L = 30: inner chunk ceil(697/33) = 22, outer chunk ceil(797/33) = 25
    p = sra.inner_pass(1000, 0, 30, c)
    assert p.rows == (169, 191) and p.window == (103, 125) and p.theta == 0.5 / 69
    p = sra.inner_pass(1000, 28, 30, c)  # s = 31*22 + 103 = 785, e = min(807, 800) = 800, w = 15
    assert p.rows == (785, 800) and p.window == (740, 755)
    p = sra.outer_pass(1000, 1, 30, c)
    assert p.rows == (800, 1000) and p.window == (78, 103) and p.theta == 0.3 / 800
    assert sra.outer_pass(1000, 28, 30, c).window == (753, 778)
    assert sra.outer_pass(1000, 0, 30, c) is None  # outer: layers 1 .. L-2
    assert sra.inner_pass(1000, 29, 30, c) is None and sra.outer_pass(1000, 29, 30, c) is None  # last layer
    assert sra.inner_pass(303, 0, 30, c) is None  # n <= b + t + 3
    assert sra.outer_pass(203, 5, 30, c) is None  # n <= t + 3
    assert [q.name for q in sra.passes(1000, 5, 30, c)] == ["inner", "outer"]
    table = sra.window_table(1000, 30, c)
    assert "outer" not in table[0] and table[29] == {"layer": 29}


# ----------------------------------------------------------------------------------------
# reattend == the literal transcription


CASES = [  # (n, L, b, t, f_inner, f_outer, g)
    (80, 4, 5, 12, 0.5, 0.5, 5.0),  # the authors' demo factors, scaled down
    (90, 5, 10, 20, 0.5, 0.3, 4.0),  # the default factors
    (61, 3, 0, 7, 1.0, 1.0, 2.0),  # b = 0; f = 1
    (50, 4, 3, 0, 0.3, 0.3, 0.5),  # t = 0: no outer rows; g < 1 shrinks
    (40, 4, 20, 20, 0.5, 0.3, 4.0),  # too short for the inner pass (n <= b + t + 3)
]


@pytest.mark.parametrize("case", CASES)
def test_reattend_equals_literal_transcription(case):
    n, L, b, t, fi, fo, g = case
    config = SRAConfig(begin=b, tail=t, f_inner=fi, f_outer=fo, gain=g)
    changed_rows = 0
    for layer in range(L):
        A = causal_probs(3, n, seed=layer)[None]  # (1, H, n, n) float64
        expected = torch.tensor(literal_sra(A[0].tolist(), layer, L, b, t, fi, fo, g), dtype=torch.float64)
        got = sra.reattend(A, layer, L, config)
        assert (got[0] - expected).abs().max().item() < 1e-12, f"layer {layer}"
        changed_rows += int((got != A).any(-1).sum())
    if n > b + t + 3:
        assert changed_rows > 0  # the case really exercises re-weighting


def test_ties_validity_uses_gt_weights_use_ge():
    """Entries exactly at theta: kept, weighted 100 in W, but do not make a row valid."""
    n, L, b, t = 80, 4, 5, 12
    config = SRAConfig(begin=b, tail=t, f_inner=0.5, f_outer=0.5, gain=5.0)
    p = sra.inner_pass(n, 0, L, config)
    (s, e), (w0, w1), theta = p.rows, p.window, p.theta
    A = causal_probs(2, n, seed=7, sharp=0.5)  # flat: nothing far above theta
    A[:, s:e, w0:w1] = A[:, s:e, w0:w1].clamp(max=theta / 2)
    A[0, s, w0] = theta  # row s, head 0: a tie and nothing above -> NOT valid
    A[0, s + 1, w0] = theta  # row s+1: a tie plus one above -> valid, the tie weighted 100
    A[0, s + 1, w0 + 1] = 2 * theta
    A[0, s + 1, 0] = theta  # a tie outside W: kept (only A < theta is dropped)
    A = A[None]
    expected = torch.tensor(literal_sra(A[0].tolist(), 0, L, b, t, 0.5, 0.5, 5.0), dtype=torch.float64)
    got = sra.reattend(A, 0, L, config)
    assert (got[0] - expected).abs().max().item() < 1e-12
    assert torch.equal(got[0, 0, s], A[0, 0, s])  # tie only: untouched
    row = got[0, 0, s + 1]
    assert row[0] == theta  # tie outside W kept
    kept = A[0, 0, s + 1].clone()
    kept[kept < theta] = 0
    r = 1 - kept.sum()
    gain_w0 = (row[w0] - theta) / (r * 5.0)  # share of the 100/5 weights: 100 / (2*100 + (w-2)*5)
    assert abs(gain_w0.item() - 100 / (200 + (w1 - w0 - 2) * 5)) < 1e-12
    assert abs(row.sum().item() - (1 + (5.0 - 1) * r.item())) < 1e-12  # rows NOT renormalised


def test_reattend_batch_each_sequence_its_own_windows():
    """Left padding: every sequence re-weighted as if alone (the authors read item 0 for all)."""
    L, config = 4, SRAConfig(begin=5, tail=12, f_inner=0.5, f_outer=0.5, gain=5.0)
    lengths, T = [80, 62, 45], 80
    A = torch.zeros(3, 2, T, T, dtype=torch.float64)
    singles = []
    for i, n in enumerate(lengths):
        single = causal_probs(2, n, seed=10 + i)
        A[i, :, T - n :, T - n :] = single
        singles.append(single)
    for layer in range(L):
        got = sra.reattend(A, layer, L, config, lengths=lengths)
        for i, (n, single) in enumerate(zip(lengths, singles)):
            expected = literal_sra(single.tolist(), layer, L, 5, 12, 0.5, 0.5, 5.0)
            assert (got[i, :, T - n :, T - n :] - torch.tensor(expected, dtype=torch.float64)).abs().max() < 1e-12
            assert not got[i, :, : T - n].any() and not got[i, :, :, : T - n].any()  # padding stays 0
    # the rows argument (used by attention capture) gives the same rows
    rows = torch.tensor([10, 50, 79])
    full = sra.reattend(A, 1, L, config, lengths=lengths)
    assert torch.equal(sra.reattend(A[:, :, rows], 1, L, config, lengths=lengths, rows=rows), full[:, :, rows])


def test_sra_attention_bad_input():
    q, k, v = _qkv(1, 2, 2, 10, 16)
    for kwargs, words in [(dict(lengths=[11]), "lengths"), (dict(lengths=[5, 5]), "lengths"),
                          (dict(lengths=[2.5]), "lengths"), (dict(config={"gain": 4}), "config"),
                          (dict(backend="fast"), "backend")]:
        with pytest.raises(ValueError, match=words):
            sra.sra_attention(q, k, v, 0, 4, **kwargs)
    with pytest.raises(ValueError, match="prefill"):
        sra.sra_attention(q[:, :, :4], k, v, 0, 4)
    with pytest.raises(ValueError, match="multiple"):
        sra.sra_attention(torch.randn(1, 3, 10, 16), k, v, 0, 4)


# ----------------------------------------------------------------------------------------
# The linear-memory form == reattend(softmax) @ v


def _qkv(B, H, Hkv, T, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * 2  # sharp maps: plenty of rows above threshold
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    v = torch.randn(B, Hkv, T, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _independent(q, k, v, layer, L, config, lengths):
    """reattend(softmax(q k^T / sqrt(D) + causal + padding)) @ v, written out here."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, 1).double(), v.repeat_interleave(group, 1).double()
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(D)
    pos = torch.arange(T)
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b, n in enumerate(lengths):
        ok = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= T - n)
        probs = torch.softmax(scores[b : b + 1].masked_fill(~ok, -math.inf), -1).nan_to_num(0.0)
        probs = sra.reattend(probs, layer, L, config, lengths=[n])
        out[b] = (probs @ v[b : b + 1])[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_memory_form_equals_spec(dtype):
    B, H, Hkv, T, D, L = 3, 4, 2, 70, 16, 4
    config = SRAConfig(begin=5, tail=12, f_inner=0.5, f_outer=0.5, gain=5.0)
    lengths = [70, 55, 40]
    q, k, v = _qkv(B, H, Hkv, T, D, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    for layer in range(L):
        spec = _independent(q, k, v, layer, L, config, lengths)
        eager = sra.sra_attention(q, k, v, layer, L, config, lengths, backend="eager")
        plan = sra.row_plan(layer, L, config, lengths, T)
        rows_fn = partial(sra_linear.blocked_rows, tile=3 * 4 * 70 * 5)  # 5-row blocks
        blocked = sra_linear.sra_output(q, k, v, *plan, lengths, D**-0.5, config.gain, rows_fn)
        default_blocks = sra.sra_attention(q, k, v, layer, L, config, lengths)
        for got in (eager, blocked, default_blocks):
            assert got.dtype == dtype
            assert (got.double() - spec).abs().max().item() <= tol * spec.abs().max().item()
    _, lo, hi = sra.row_plan(1, L, config, lengths, T)
    assert sra_linear.touched_spans(lo < hi)  # the case touches rows


def test_linear_memory_form_changes_what_sra_should_change():
    B, H, T, D, L = 1, 2, 64, 16, 4
    config = SRAConfig(begin=4, tail=10, f_inner=0.5, f_outer=0.5, gain=4.0)
    q, k, v = _qkv(B, H, H, T, D, seed=3)
    plain = sra_linear.plain_attention(q, k, v, [T], D**-0.5)
    out = sra.sra_attention(q, k, v, 1, L, config)
    changed = ((out - plain).abs().amax(-1) > 1e-6).any(1)[0]  # (T,) rows that differ
    _, lo, hi = sra.row_plan(1, L, config, [T], T)
    touched = (lo < hi)[0]
    assert changed.any() and not (changed & ~touched).any()  # only touched rows move
    assert torch.equal(sra.sra_attention(q, k, v, L - 1, L, config), plain)  # last layer: nothing


# ----------------------------------------------------------------------------------------
# SRA in a model


CONFIG = SRAConfig(begin=4, tail=8, f_inner=0.5, f_outer=0.5, gain=4.0)
TEXTS = [
    "Documents: Alice Smith lives in Paris. Bob Jones lives in Rome. Carol King lives in Oslo. "
    "Dan Hill lives in Lima. Question: where does Bob Jones live? Answer:",
    "Documents: Eve Scott lives in Cairo. Frank Reed lives in Seoul. Question: where does Eve live?",
]


@pytest.fixture(scope="module")
def tiny(sharp_tiny):
    return sharp_tiny(8.0, num_hidden_layers=4)  # 4 layers: both passes occur; sharp maps, so SRA acts


def _logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def test_model_backends_agree_and_batch_equals_single(tiny):
    model, tok = tiny
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    real = enc.attention_mask.bool()
    base = _logits(model, enc)
    outs = {}
    for backend in ("eager", "blocked"):
        with sra.sra(model, CONFIG, backend=backend):
            outs[backend] = _logits(model, enc)
    assert (outs["eager"] - outs["blocked"])[real].abs().max() < 1e-4
    assert (outs["eager"] - base)[real].abs().max() > 1e-3  # SRA does something
    with sra.sra(model, CONFIG):
        for i, text in enumerate(TEXTS):  # each sequence alone == its row of the padded batch
            alone = _logits(model, tok([text], return_tensors="pt"))[0]
            assert (alone - outs["blocked"][i][real[i]]).abs().max() < 1e-4
    assert (_logits(model, enc) - base)[real].abs().max() < 1e-5  # removed again
    assert all(getattr(m, "calibration", None) is None for m in hooks.attention_modules(model))


def test_model_capture_shows_the_reweighted_map(tiny):
    model, tok = tiny
    enc = tok(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        with hooks.capture_attention(model, full=True) as base:
            model(**enc)
        with sra.sra(model, CONFIG), hooks.capture_attention(model, full=True) as cap:
            model(**enc)
    L = len(base.maps)
    # layer 0 sees the same inputs in both runs (later layers see SRA's changed hidden states)
    assert (cap.maps[0] - sra.reattend(base.maps[0], 0, L, CONFIG)).abs().max() < 1e-6
    assert (cap.maps[0] - base.maps[0]).abs().max() > 1e-3
    # every layer: probs() == reattend(plain probabilities) on the same queries and keys
    method, module = sra.SRA(CONFIG, num_layers=L), hooks.attention_modules(model)[1]
    q, k = torch.randn(2, 4, 40, 16) * 3, torch.randn(2, 2, 40, 16) * 3
    mask = torch.ones(40, 40, dtype=torch.bool).tril().expand(2, 1, 40, 40).clone()
    mask[1, :, :, :7] = False  # item 1 left-padded by 7
    plain = hooks.layer_probs(module, q, k, mask, 0.25)
    expected = sra.reattend(plain, 1, L, CONFIG, lengths=[40, 33])
    assert (method.probs(module, q, k, mask, 0.25, None) - expected).abs().max() < 1e-6
    rows = torch.tensor([39])
    assert torch.allclose(method.probs(module, q, k, mask, 0.25, rows), expected[:, :, rows], atol=1e-6)
    assert (expected - plain).abs().max() > 1e-3


def test_decoding_steps_are_plain_and_generate_works(tiny):
    model, tok = tiny
    method = sra.SRA(CONFIG, num_layers=4)
    module = hooks.attention_modules(model)[1]
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 16)
    assert method(module, q, k, v, None, 0.25) is None  # None: the hook runs plain SDPA
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with sra.sra(model, CONFIG), torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc.input_ids.shape[1] + 3)


def test_too_short_sequences_warn_once_and_are_untouched(tiny):
    model, tok = tiny
    enc = tok(["Hi there."], return_tensors="pt")
    base = _logits(model, enc)
    with sra.sra(model, SRAConfig()):  # defaults: nothing under 304 tokens
        with pytest.warns(UserWarning, match="too short") as record:
            got = _logits(model, enc)
            _logits(model, enc)
    assert len([w for w in record if "inner pass" in str(w.message)]) == 1  # once
    assert torch.equal(got, base)


def test_batch_without_mask_warns_and_with_mask_does_not(tiny):
    model, tok = tiny
    enc = tok([TEXTS[0], TEXTS[0]], return_tensors="pt")  # no padding at all
    with sra.sra(model, CONFIG):
        with pytest.warns(UserWarning, match="without attention_mask"):
            _logits(model, {"input_ids": enc.input_ids})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _logits(model, enc)  # mask given (transformers drops it: no padding): no warning


def test_bad_model_input(tiny):
    model, tok = tiny
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    right = {k: v.flip(-1) for k, v in enc.items()}  # right padding
    with sra.sra(model, CONFIG), pytest.raises(ValueError, match="left-padded"):
        _logits(model, right)
    with pytest.raises(ValueError, match="backend"):
        sra.apply_sra(model, CONFIG, backend="fast")
    modules = hooks.attention_modules(model)
    modules[0].calibration = object()
    try:
        with pytest.raises(ValueError, match="already carries"):
            sra.apply_sra(model, CONFIG)
    finally:
        del modules[0].calibration
    for m in modules:
        m.is_causal = False
    try:
        with pytest.raises(ValueError, match="causal"):
            sra.apply_sra(model, CONFIG)
    finally:
        for m in modules:
            m.is_causal = True
    hooks.uninstall(model)
