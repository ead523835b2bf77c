"""load_model: the offline default is the real SmolLM2, tiny configs are real architectures."""

import pytest
import torch

from minimal import load_model
from minimal.models import KNOWN_NAMES, check_supported


def test_offline_default_is_smollm2_135m_instruct_and_knows_things():
    model, tok = load_model()
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size) == (
        "llama", 30, 9, 3, 576)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tok.padding_side == "left" and tok.pad_token is not None
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.parametrize("name,model_type", [("tiny-llama", "llama"), ("tiny-qwen2", "qwen2")])
def test_tiny_models_are_small_random_and_seeded(name, model_type):
    a, tok = load_model(name, seed=1)
    b, _ = load_model(name, seed=1)
    c, _ = load_model(name, seed=2)
    assert a.config.model_type == model_type and a.config.num_key_value_heads < a.config.num_attention_heads
    assert sum(p.numel() for p in a.parameters()) < 5e6
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == len(tok)  # the default tokenizer drives the tiny models too


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_model("gpt-5")
    for name in KNOWN_NAMES:
        assert name in str(err.value)


def test_hub_id_without_network_points_to_the_offline_default(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 40 s of retries
    with pytest.raises(OSError, match="offline default"):
        load_model("someone/no-such-model-here")


def test_unsupported_family_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="not supported"):
        check_supported(gpt2)


def test_shipped_weights_follow_the_model_not_the_file(capsys):
    """The weights in weights/smollm2-135m/ were trained on the GGUF copy; the Hub checkpoint of the
    same model (its name is all that differs for the loaders: played here by renaming the GGUF copy,
    since tests never download) takes them too, and says so; another model is refused."""
    from minimal import compare, models, opamp, pear

    folder = compare.weights_dir(models.DEFAULT_HUB_ID) / "seed0"
    assert folder == compare.weights_dir("smollm2-135m") / "seed0"  # one folder, whichever name is asked for
    model, tok = load_model()
    assert models.default_model_source(model) == "gguf"
    model.config._name_or_path = models.DEFAULT_HUB_ID  # as loading from the Hub names it
    assert models.default_model_source(model) == "hub"
    coefficients = pear.load_coefficients(folder / "pear.json", model)
    assert len(coefficients) == compare.PEAR_K
    layers = opamp.load_opamp(model, folder / "opamp" / "adapters")
    assert any(cal.q1.w_up.weight.abs().sum() > 0 for cal in layers.values())  # trained, not the zero init
    fresh, _ = load_model()
    fresh.config._name_or_path = models.DEFAULT_HUB_ID
    compare.load_lora(fresh, folder / "lora" / "lora")
    assert "trained on the offline GGUF copy" in capsys.readouterr().out

    other, _ = load_model("tiny-llama")
    with pytest.raises(ValueError, match="saved for model 'smollm2-135m-instruct-q4_1', this model is 'tiny-llama'"):
        pear.load_coefficients(folder / "pear.json", other)
    with pytest.raises(ValueError, match="saved for model"):
        models.check_same_model("Qwen/Qwen2.5-0.5B-Instruct", model, "weights")
