"""Elimination (minimal/eliminate.py), the template method: against (P * [P >= tau]) V written out."""

import math

import pytest
import torch

from minimal import hooks
from minimal.eliminate import Eliminate, eliminate

TEXTS = ["Alice Smith lives in Paris. Bob Jones lives in Rome. Carol King lives in Oslo. Where does Bob live?",
         "Hello there, Eve."]


@pytest.fixture(scope="module")
def tiny(sharp_tiny):
    return sharp_tiny(6.0)  # sharp maps: many probabilities on both sides of tau


def test_elimination_drops_small_probabilities_without_renormalising(tiny):
    model, tok = tiny
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    real = enc.attention_mask.bool()
    with torch.no_grad():
        base = model(**enc).logits
        with eliminate(model, 0.0):
            assert (model(**enc).logits - base)[real].abs().max() < 1e-5  # tau = 0: nothing dropped
        with eliminate(model, 0.05):
            dropped = model(**enc).logits
    assert (dropped - base)[real].abs().max() > 1e-3

    # the calibration itself against (P * [P >= tau]) V, written out
    module = hooks.attention_modules(model)[0]
    q, k, v = torch.randn(2, 4, 9, 16) * 3, torch.randn(2, 2, 9, 16) * 3, torch.randn(2, 2, 9, 16)
    mask = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9).clone()
    mask[1, :, :, :4] = False  # item 1 left-padded by 4
    P = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~mask, -math.inf), -1)
    P = P.nan_to_num(0.0)
    for renorm in (False, True):
        method = Eliminate(0.1, renormalize=renorm, tile=2 * 4 * 9 * 4)  # 4-row blocks
        kept = P * (P >= 0.1)
        if renorm:
            kept = kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)
        expected = kept @ v.repeat_interleave(2, 1)  # (B, H, T, D)
        got = method(module, q, k, v, mask, 0.25)
        real_rows = mask.any(-1)[:, 0]  # (B, T)
        assert (got - expected).transpose(1, 2)[real_rows].abs().max() < 1e-5
        sums = method.probs(module, q, k, mask, 0.25).sum(-1)[real_rows.unsqueeze(1).expand(-1, 4, -1)]
        assert (sums - 1).abs().max() < 1e-5 if renorm else (sums < 1 - 1e-3).any()


def test_elimination_during_generation(tiny):
    model, tok = tiny
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad(), eliminate(model, 0.02):
        out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc.input_ids.shape[1] + 3)
    assert all(getattr(m, "calibration", None) is None for m in hooks.attention_modules(model))


def test_bad_input(tiny):
    model, _ = tiny
    for tau in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="tau"):
            Eliminate(tau)
    with eliminate(model, 0.01) as method:
        assert hooks.attached(model, Eliminate) == {0: method, 1: method}
        with pytest.raises(ValueError, match="already carries Eliminate"):
            eliminate(model, 0.02)
    assert hooks.attached(model, Eliminate) == {}


def test_readme_example_is_the_same_method(tiny):
    """The README's "How methods plug in" shows a short Eliminate: it runs, and equals this file's."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class Eliminate" in b)
    model, tok = tiny
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    scope = {"model": model, "batch": batch}
    with torch.no_grad():
        code = code.replace("model.generate(**batch)", "readme_logits = model(**batch).logits")
        exec(code.replace("layers=[3, 4]", "layers=[1]"), scope)  # the tiny model has layers 0 and 1
        with hooks.attach(model, Eliminate(1e-2), layers=[1]):
            expected = model(**batch).logits
        with hooks.attach(model, scope["Eliminate"](1e-2), layers=[1]):
            got = model(**batch).logits
    assert hooks.attached(model, scope["Eliminate"]) == {}
    real = batch.attention_mask.bool()
    assert (got - expected)[real].abs().max() < 1e-5
