"""The registered attention hook: nothing attached == the stock model; dispatch, masks, capture."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minimal import hooks, load_model
from minimal.attention import grouped_apply
from minimal.hooks import capture_attention, layer_probs

TEXTS = ["Alice Smith lives in Paris. Bob Jones lives in Rome. Where does Bob live?", "Hello!"]


def _eager(name):
    """The model with transformers' own eager attention: an independent implementation."""
    model, tok = load_model(name)
    model.set_attn_implementation("eager")
    return model, tok


def _batch(tok):
    return tok(TEXTS, return_tensors="pt", padding=True)  # left padded


class PlainAttention:
    """A calibration that recomputes ordinary attention through layer_probs():
    exercises the dispatch and our mask handling, in prefill and in cached decoding."""

    slot = "calibration"

    def __call__(self, module, query, key, value, attention_mask, scaling):
        probs = layer_probs(module, query, key, attention_mask, scaling)  # (B, H, T, S)
        return grouped_apply(probs, value).to(query.dtype)  # (B, H, T, D)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "smollm2-135m"])
def test_hook_with_nothing_attached_matches_stock_model(name):
    model, tok = load_model(name)  # stock: transformers' SDPA attention
    enc = _batch(tok)
    real = enc.attention_mask.bool()
    with torch.no_grad():
        expected = model(**enc).logits
        hooks.install(model)
        assert model.config._attn_implementation == hooks.ATTENTION_NAME
        got = model(**enc).logits
    assert (got - expected)[real].abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "smollm2-135m"])
def test_dispatch_to_a_calibration_object_prefill_and_cached_generation(name):
    model, tok = _eager(name)
    enc = _batch(tok)
    real = enc.attention_mask.bool()
    with torch.no_grad():
        expected = model(**enc).logits
        # fp32 rounding adds up over SmolLM2's 30 layers (eager and SDPA differ by ~5e-5
        # there); we ask to be no further from eager than transformers' SDPA is.
        model.set_attn_implementation("sdpa")
        tol = max(1e-5, 2 * (model(**enc).logits - expected)[real].abs().max().item())
        model.set_attn_implementation("eager")
        gen_expected = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        modules = hooks.install(model)
        hooks.attach(model, PlainAttention())
        got = model(**enc).logits
        gen_got = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert (got - expected)[real].abs().max().item() <= tol
    assert torch.equal(gen_got, gen_expected)
    hooks.uninstall(model)
    assert not any(hasattr(m, "calibration") for m in modules)
    assert model.config._attn_implementation == "sdpa"


def test_hooked_model_is_causal():
    model, tok = load_model("tiny-llama")
    hooks.install(model)
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 1000
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-6)
    assert not torch.allclose(a[0, -1], b[0, -1])


@pytest.mark.parametrize("name", ["tiny-qwen2", "smollm2-135m"])
def test_full_capture_equals_transformers_eager_attentions(name):
    model, tok = _eager(name)
    enc = _batch(tok)
    with torch.no_grad():
        eager = model(**enc, output_attentions=True).attentions  # L x (B, H, T, T)
        with capture_attention(model, full=True) as cap:
            model(**enc)
    real = enc.attention_mask.bool()
    for layer, expected in enumerate(eager):
        got = cap.maps[layer]
        rows = real[:, None, :, None].expand_as(got)  # compare real query rows only
        # fp32 rounding: the hooked layers compute outputs by SDPA, eager by matmuls, and over 30 layers
        # of SmolLM2 the hidden states drift apart by a few ulps (2.0e-5 on a map with transformers 5.24)
        assert (got - expected)[rows].abs().max().item() <= 5e-5


def test_span_mass_is_the_sum_of_the_last_row_over_each_span():
    model, tok = load_model("tiny-llama")
    enc = _batch(tok)
    T = enc.input_ids.shape[1]
    spans = [[(T - 10, T - 5), (T - 5, T - 1)], [(T - 3, T - 1)]]
    with torch.no_grad(), capture_attention(model, full=True, spans=spans) as cap:
        model(**enc)
    mass = cap.stacked_span_mass()  # (L, B, H, n_spans)
    assert mass.shape == (2, 2, 4, 2)
    for layer in range(2):
        full = cap.maps[layer][:, :, -1]  # (B, H, S)
        assert torch.allclose(mass[layer, 0, :, 0], full[0, :, T - 10 : T - 5].sum(-1), atol=1e-6)
        assert torch.allclose(mass[layer, 1, :, 0], full[1, :, T - 3 : T - 1].sum(-1), atol=1e-6)
    assert torch.isnan(mass[:, 1, :, 1]).all()  # item 1 has one span only


def test_capture_records_prefill_only_during_generate_and_detaches():
    model, tok = load_model("tiny-llama")
    enc = _batch(tok)
    T = enc.input_ids.shape[1]
    with torch.no_grad(), capture_attention(model, spans=[[(0, T)], [(0, T)]]) as cap:
        model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    total = cap.stacked_span_mass()  # the whole prompt: all the last token's mass
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert not any(hasattr(m, "capture") for m in hooks.attention_modules(model))


def test_full_capture_refuses_long_inputs_and_needs_a_mode():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="spans"):
        with capture_attention(model):
            pass
    with pytest.raises(ValueError, match="max_full_tokens"):
        with torch.no_grad(), capture_attention(model, full=True, max_full_tokens=8):
            model(torch.ones(1, 9, dtype=torch.long))


def test_unsupported_model_is_a_clear_error():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16, vocab_size=100)
    gpt2 = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="no attention module the minimal hook understands"):
        hooks.install(gpt2)


def test_attach_layers_slots_and_removal():
    model, tok = load_model("tiny-llama")
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        handle = hooks.attach(model, PlainAttention(), layers=[1])
        modules = hooks.attention_modules(model)
        assert not hasattr(modules[0], "calibration") and isinstance(modules[1].calibration, PlainAttention)
        with pytest.raises(ValueError, match="already carries PlainAttention"):
            hooks.attach(model, PlainAttention())
        with pytest.raises(ValueError, match=r"layer indices in \[0, 2\)"):
            hooks.attach(model, PlainAttention(), layers=[2])
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
        handle.remove()
        assert not hasattr(modules[1], "calibration")
        with hooks.attach(model, PlainAttention()) as method:
            assert hooks.attached(model, PlainAttention) == {0: method, 1: method}
        assert hooks.attached(model, PlainAttention) == {}
