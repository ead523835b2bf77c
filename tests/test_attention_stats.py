"""Attention statistics, perplexity and the shipped text."""

import math

import pytest
import torch

from minimal import attention_stats as st
from minimal import hooks

TEXTS = ["Alice Smith lives in Paris. Bob Jones lives in Rome. Carol King lives in Oslo. Where does Bob live?",
         "Hello there, Eve."]


@pytest.fixture(scope="module")
def tiny(sharp_tiny):
    return sharp_tiny(6.0)  # sharp maps, so every band is populated


def _full_maps(model, enc):
    with torch.no_grad(), hooks.capture_attention(model, full=True) as cap:
        model(**enc)
    return cap.maps


def test_statistics_equal_counts_on_the_full_maps(tiny):
    model, tok = tiny
    enc = tok(TEXTS, return_tensors="pt", padding=True)  # left-padded batch
    maps = _full_maps(model, enc)
    real = enc.attention_mask.bool()
    T = real.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    table = st.attention_statistics(model, enc.input_ids, enc.attention_mask, thresholds=(1e-3, 2e-2), block_rows=5)
    assert [r["layer"] for r in table] == [0, 1]
    for layer, row in enumerate(table):
        # the independent count: entries (b, h, i, j) with i, j real tokens and j <= i
        ok = causal[None] & real[:, None, :] & real[:, :, None]  # (B, T, T)
        vals = maps[layer].permute(1, 0, 2, 3)[:, ok]  # (H, n_entries)
        vals = vals.flatten()
        assert row["entries"] == vals.numel()
        assert math.isclose(row["potatoes_share"], (vals < 0.01).double().mean().item(), abs_tol=1e-9)
        assert math.isclose(row["gems_share"], ((vals >= 0.01) & (vals <= 0.05)).double().mean().item(), abs_tol=1e-9)
        assert math.isclose(row["linchpins_share"], (vals > 0.05).double().mean().item(), abs_tol=1e-9)
        assert math.isclose(row["linchpins_mass"], (vals[vals > 0.05].sum() / vals.sum()).item(), rel_tol=1e-5)
        assert math.isclose(row["sparsity@0.02"], (vals < 0.02).double().mean().item(), abs_tol=1e-9)
        assert math.isclose(row["potatoes_share"] + row["gems_share"] + row["linchpins_share"], 1.0, abs_tol=1e-9)
        assert 0 < row["potatoes_share"] < 1 and 0 < row["linchpins_share"] < 1
    other = st.attention_statistics(model, enc.input_ids, enc.attention_mask, (1e-3, 2e-2), block_rows=64)
    for a, b in zip(table, other):  # the block size changes nothing but the order of float sums
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-9) for k in a)
    assert all(getattr(m, "attention_capture", None) is None for m in hooks.attention_modules(model))


def test_token_nll_and_perplexity(tiny):
    model, tok = tiny
    ids = tok(TEXTS[0], return_tensors="pt").input_ids[0]
    nll = st.token_nll(model, ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0, :-1], -1)
    expected = -logp[torch.arange(len(ids) - 1), ids[1:]]
    assert nll.shape == (len(ids) - 1,) and torch.allclose(nll, expected, atol=1e-4)
    assert math.isclose(st.perplexity(nll), math.exp(expected.mean().item()), rel_tol=1e-4)
    mask = torch.zeros_like(nll, dtype=torch.bool)
    mask[3] = True
    assert math.isclose(st.perplexity(nll, mask), math.exp(nll[3].item()), rel_tol=1e-6)
    with pytest.raises(ValueError, match="nothing"):
        st.perplexity(nll, torch.zeros_like(mask))


def test_shipped_text_is_the_generated_one_and_answers_are_found(tiny):
    _, tok = tiny
    text = st.load_text("facts_qa")
    assert text == st.make_fact_text()  # reproducible from the generator (data/text/README.md)
    ids, mask = st.answer_token_mask(tok, text)
    answers = [line[3:] for line in text.splitlines() if line.startswith("A: ")]
    assert len(answers) >= 10 and mask.shape == (len(ids) - 1,)
    assert tok.decode(ids[1:][mask]).replace(" ", "") == "".join(answers).replace(" ", "")
    for a in answers:  # every answer is stated once among the facts
        assert sum(a in line for line in text.split("\n\n")[0].splitlines()) >= 1
    ids_end, mask_end = st.answer_token_mask(tok, text, last_tokens=200)
    assert torch.equal(ids_end, ids[-200:]) and torch.equal(mask_end, mask[-199:])
    with pytest.raises(FileNotFoundError, match="facts_qa"):
        st.load_text("nope")


def test_bad_input(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="thresholds"):
        st.AttentionStatistics(thresholds=(0.0,))
