"""OpAmp adaptation: identity at init, the layer math against the reference, masks, KV cache,
capture, save/load, bad input. Tiny random Llama/Qwen2 models (no downloads)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from minimal import attention, hooks, load_model
from minimal.opamp import (
    Adapter, OpAmpCalibration, add_opamp, load_opamp, mask_to_causal_padding, opamp_layers,
    opamp_parameters, remove_opamp, save_opamp,
)

TEXTS = ["Alice Smith lives in Paris. Bob Jones lives in Rome. Where does Bob live?", "Hello there!"]


def _batch(tok):
    return tok(TEXTS, return_tensors="pt", padding=True)  # left padded


def _perturb(model, seed=1, std=0.3):
    """Random adapter weights, so the two maps really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in opamp_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_adapter_is_identity_at_init_and_matches_its_formula():
    torch.manual_seed(0)
    a = Adapter(32, hidden=64, dropout=0.1).eval()
    assert a.w_down.bias is None and a.w_up.bias is None
    assert a.w_down.weight.shape == (64, 32) and a.w_up.weight.shape == (32, 64)
    assert torch.all(a.w_up.weight == 0) and a.w_down.weight.abs().max() > 0
    x = torch.randn(3, 5, 32)
    assert torch.equal(a(x), x)
    with torch.no_grad():
        a.w_up.weight.normal_()
    expected = x + torch.nn.functional.gelu(x @ a.w_down.weight.T) @ a.w_up.weight.T
    torch.testing.assert_close(a(x), expected)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_logits_unchanged_right_after_add_opamp(name):
    model, tok = load_model(name)
    enc = _batch(tok)
    real = enc.attention_mask.bool()
    with torch.no_grad():
        base = model(**enc).logits
        layers = add_opamp(model, K=10)
        got = model(**enc).logits
    assert sorted(layers) == [0, 1]
    assert (got - base)[real].abs().max().item() <= 1e-5
    remove_opamp(model)
    assert not opamp_layers(model)


def test_layer_output_equals_reference_opamp_attention_gqa_and_padding():
    """The calibration vs an independent computation: adapters applied by hand (heads
    concatenated, keys on the KV heads only) and minimal.attention.opamp_attention."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 7, 16
    cal = OpAmpCalibration(H, Hkv, D, K=5.0, adapter_dim=8).eval()
    with torch.no_grad():
        for p in cal.parameters():
            p.normal_(0, 0.3)
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, :3] = False
    allowed = attention.allowed_keys(T, T, True, padding)  # (B, 1, T, T)

    def by_hand(x, adapter):
        flat = x.permute(0, 2, 1, 3).reshape(B, T, -1)  # (B, T, heads*D)
        return adapter(flat).reshape(B, T, -1, D).permute(0, 2, 1, 3)

    q1, q2, k1, k2 = by_hand(q, cal.q1), by_hand(q, cal.q2), by_hand(k, cal.k1), by_hand(k, cal.k2)
    assert cal.k1.w_down.in_features == Hkv * D and cal.q1.w_down.in_features == H * D
    expected = attention.opamp_attention(q1, k1, q2, k2, v, K=5.0, key_padding_mask=padding)  # (B, H, T, D)
    for backend in ("reference", "triton"):  # triton runs in the interpreter on CPU
        cal.backend = backend
        got = cal(None, q, k, v, allowed, None)  # (B, H, T, D)
        torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1, :, 3:], expected[1, :, 3:], atol=1e-4, rtol=1e-4)  # real queries
    # no mask (HF passes None for unpadded causal prefill): the is_causal fast path, same numbers
    for backend in ("reference", "triton"):
        cal.backend = backend
        got = cal(None, q[:1], k[:1], v[:1], None, None)
        torch.testing.assert_close(got, expected[:1], atol=1e-4, rtol=1e-4)
    # the combined map that capture sees: rows sum to 1, and it reproduces the output
    m = cal.probs(None, q, k, allowed, None, None)  # (B, H, T, T)
    torch.testing.assert_close(m[0].sum(-1), torch.ones(H, T))
    out = m @ v.repeat_interleave(H // Hkv, dim=1)
    torch.testing.assert_close(out[0], expected[0], atol=1e-4, rtol=1e-4)


class MaskRecorder:
    """A calibration that records the masks HF hands to the hook and runs plain attention."""

    slot = "calibration"

    def __init__(self):
        self.masks = []

    def __call__(self, module, query, key, value, attention_mask, scaling):
        self.masks.append(hooks.boolean_mask(attention_mask, query.shape[2], key.shape[2], query.device))
        return None  # plain attention


def test_hf_mask_is_causal_plus_key_padding_on_real_rows():
    model, tok = load_model("tiny-llama")
    enc = _batch(tok)
    rec = MaskRecorder()
    hooks.attach(model, rec, layers=[0])
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert len(rec.masks) == 3  # prefill, then two cached decoding steps
    for mask in rec.masks:
        T, S = mask.shape[-2:]
        padding = mask_to_causal_padding(mask, T, S)
        assert padding is not None
        assert torch.equal(padding.expand(2, S), torch.cat([enc.attention_mask.bool(), torch.ones(2, S - enc.attention_mask.shape[1], dtype=torch.bool)], 1))
    # a sliding window is not "causal + padding": the converter says so (-> eager path)
    window = attention.allowed_keys(6, 6)[0, 0] & (torch.arange(6)[None] > torch.arange(6)[:, None] - 3)
    assert mask_to_causal_padding(window[None, None], 6, 6) is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_cached_generation_equals_full_recompute(name):
    """HF caches keys before the attention function, so key adapters see the full key each step."""
    model, tok = load_model(name)
    add_opamp(model, K=10)
    _perturb(model)
    enc = _batch(tok)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
        ids, mask = enc.input_ids, enc.attention_mask
        for step in range(5):  # greedy, no cache: the whole sequence every step
            # positions as generate() sets them for left padding: adapters act after RoPE,
            # mixing heads, so absolute positions matter (unlike plain RoPE attention)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
            torch.testing.assert_close(gen.scores[step], logits, atol=1e-4, rtol=1e-4)
            nxt = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(gen.sequences, ids)


def test_capture_records_the_opamp_map():
    model, tok = load_model("tiny-llama")
    add_opamp(model, K=10)
    _perturb(model)
    enc = _batch(tok)
    with torch.no_grad(), hooks.capture_attention(model, full=True) as cap:
        model(**enc)
    m = cap.maps[0][0]  # (H, T, S) of the unpadded row
    assert (m < 0).any()  # a softmax map never is; the OpAmp map can be
    torch.testing.assert_close(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-4, rtol=1e-4)


def test_save_load_roundtrip_and_mismatches(tmp_path):
    model, tok = load_model("tiny-llama")
    add_opamp(model, K=5, adapter_dim=8, layers=[1])
    _perturb(model)
    enc = _batch(tok)
    real = enc.attention_mask.bool()
    with torch.no_grad():
        expected = model(**enc).logits
    save_opamp(model, tmp_path / "a")

    fresh, _ = load_model("tiny-llama")
    layers = load_opamp(fresh, tmp_path / "a")
    assert sorted(layers) == [1] and layers[1].K == 5.0
    with torch.no_grad():
        assert (fresh(**enc).logits - expected)[real].abs().max().item() <= 1e-5

    other = load_model("tiny-llama")[0]
    add_opamp(other, K=10, adapter_dim=8, layers=[1])
    with pytest.raises(ValueError, match="K="):
        load_opamp(other, tmp_path / "a")
    qwen = load_model("tiny-qwen2")[0]
    with pytest.raises(ValueError, match="model_type"):
        load_opamp(qwen, tmp_path / "a")
    wider = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_opamp(wider, tmp_path / "a")
    with pytest.raises(ValueError, match="opamp_config.json"):
        load_opamp(fresh, tmp_path / "missing")
    from safetensors.torch import load_file, save_file  # a truncated tensor is refused, not kept half-random

    tensors = load_file(str(tmp_path / "a" / "adapters.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name][:1]
    save_file(tensors, str(tmp_path / "a" / "adapters.safetensors"))
    with pytest.raises(ValueError, match="size mismatch"):
        load_opamp(load_model("tiny-llama")[0], tmp_path / "a")


def test_bad_input_is_a_clear_error():
    model, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="K"):
        add_opamp(model, K=0)
    with pytest.raises(ValueError, match="K"):
        add_opamp(model, K=-1.0)
    with pytest.raises(ValueError, match="adapter_dim"):
        add_opamp(model, adapter_dim=0)
    with pytest.raises(ValueError, match="stride"):
        add_opamp(model, stride=0)
    with pytest.raises(ValueError, match="layers"):
        add_opamp(model, layers=[2])
    with pytest.raises(ValueError, match="layers"):
        add_opamp(model, layers=[-1])
    with pytest.raises(ValueError, match="no OpAmp"):
        save_opamp(model, "/tmp/unused")
    add_opamp(model, stride=2)
    assert sorted(opamp_layers(model)) == [0]
    with pytest.raises(ValueError, match="already"):
        add_opamp(model)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type="gpt2", vocab_size=100, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="q_proj"):
        add_opamp(gpt2)


def test_decoding_reuses_adapted_keys_only_when_the_prefix_is_the_same():
    torch.manual_seed(0)
    cal = OpAmpCalibration(num_heads=4, num_kv_heads=2, head_dim=8).eval()
    for a in (cal.k1, cal.k2):
        torch.nn.init.normal_(a.w_up.weight, std=0.1)
    key = torch.randn(2, 2, 7, 8)
    fresh = lambda k: (cal._heads(k, cal.k1), cal._heads(k, cal.k2))
    with torch.no_grad():
        cal.adapt_keys(key[:, :, :5])
        step = cal.adapt_keys(key)  # the same first 5 positions: only 2 adapted, 5 reused
        other = key.clone()
        other[1, 0, 2] += 1.0       # another prefix: everything adapted again
        changed = cal.adapt_keys(other)
    for got, want in zip(step + changed, fresh(key) + fresh(other)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
