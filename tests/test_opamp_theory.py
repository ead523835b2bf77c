"""Notebook 01's helpers (minimal.opamp_theory): synthetic maps, their summary, DiffLlama check."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from minimal.attention import opamp_combine  # noqa: E402
from minimal.opamp_theory import diffllama_vs_opamp, map_summary, plot_map, synthetic_maps  # noqa: E402


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_synthetic_maps_are_attention_maps_with_the_stated_split():
    sm = synthetic_maps(num_docs=5, doc_len=4, question_len=6, gold=1, signal_plus=0.3, signal_minus=0.1,
                        mismatch=0.05, seed=3)
    Q, S = sm.m_plus.shape
    assert (Q, S) == (6, 3 + 5 * 4 + 6)
    for m in (sm.m_plus, sm.m_minus, sm.noise, sm.signal):
        assert (m >= 0).all()
        assert torch.allclose(m.sum(-1), torch.ones(Q, dtype=m.dtype))
        # causal: question row r sits at position S - Q + r and sees nothing after it
        assert (m.triu(diagonal=S - Q + 1) == 0).all()
    assert sm.doc_spans[1] == (7, 11)
    assert (sm.signal[:, 7:11] == 0.25).all() and sm.signal[:, :7].sum() == 0
    # with no mismatch, the differential part is exactly (a - b)(R - N)
    clean = synthetic_maps(signal_plus=0.3, signal_minus=0.1, mismatch=0.0)
    assert torch.allclose(clean.m_plus - clean.m_minus, 0.2 * (clean.signal - clean.noise))
    # the seed matters and is reproducible
    assert torch.equal(synthetic_maps(seed=1).m_plus, synthetic_maps(seed=1).m_plus)
    assert not torch.equal(synthetic_maps(seed=1).m_plus, synthetic_maps(seed=2).m_plus)


def test_summary_on_a_hand_made_map():
    m = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.5, -0.5, 1.5, -0.5]], dtype=torch.float64)
    s = map_summary(m, doc_spans=[(1, 2), (2, 4)], gold=1, sink=0)
    assert s["gold"] == pytest.approx((0.25 + 1.0) / 2)
    assert s["distractor"] == pytest.approx((0.25 - 0.5) / 2)
    assert s["sink"] == pytest.approx(0.5)
    assert s["gold_share_abs"] == pytest.approx((0.25 / 1.0 + 2.0 / 3.0) / 2)
    assert s["negative"] == 2 and s["negative_frac"] == pytest.approx(0.25)
    assert s["min"] == -0.5 and s["row_sum_error"] == pytest.approx(0.0)


def test_gold_share_peaks_where_the_noise_cancels():
    # no mismatch: off the gold document M = (1 - (a+b)/2 - K (a - b)) N, zero at K* = (1 - 0.2)/0.2 = 4
    sm = synthetic_maps(signal_plus=0.3, signal_minus=0.1, mismatch=0.0)

    def share(K):
        return map_summary(opamp_combine(sm.m_plus, sm.m_minus, K), sm.doc_spans, sm.gold)["gold_share_abs"]

    assert share(4.0) == pytest.approx(1.0)
    assert share(0.5) < share(2.0) < share(4.0) > share(10.0) > share(1e4)
    assert share(1e4) == pytest.approx(0.5, abs=1e-3)  # M/K -> M+ - M-, whose rows sum to 0


def test_bad_synthetic_parameters():
    with pytest.raises(ValueError, match="signal_minus"):
        synthetic_maps(signal_plus=0.1, signal_minus=0.2)
    with pytest.raises(ValueError, match="gold"):
        synthetic_maps(num_docs=3, gold=3)
    with pytest.raises(ValueError, match="mismatch"):
        synthetic_maps(mismatch=-0.1)


def test_plot_map_draws():
    sm = synthetic_maps()
    fig, ax = plt.subplots()
    plot_map(ax, sm.m_plus - sm.m_minus, "diff", sm.doc_spans, sm.gold)
    assert len(ax.images) == 1 and len(ax.lines) == 2 * len(sm.doc_spans)
    plt.close(fig)


@pytest.mark.parametrize("K", [0.2, 0.5, 1.0, 10.0])
def test_diffllama_matches_opamp(K):
    theirs, ours = diffllama_vs_opamp(K)
    assert theirs.shape == ours.shape == (2, 9, 64)
    assert max_rel(ours, theirs) < 1e-6


def test_diffllama_check_can_fail():
    # the per-head norm is what OpAmp leaves out: keeping it breaks the equality ...
    theirs, ours = diffllama_vs_opamp(10.0, keep_norm=True)
    assert max_rel(ours, theirs) > 1e-2
    # ... and so does a different K (lambda) on the two sides
    theirs5, _ = diffllama_vs_opamp(5.0)
    _, ours10 = diffllama_vs_opamp(10.0)
    assert max_rel(ours10 * 10.5 / 5.5, theirs5) > 1e-2
    with pytest.raises(ValueError, match="K"):
        diffllama_vs_opamp(-1.0)
    with pytest.raises(ValueError, match="K"):
        diffllama_vs_opamp(math.inf)
