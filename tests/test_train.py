"""The training loop: answer-only labels, what PEFT freezes, that training lowers the loss,
the command line and its errors. Tiny random models."""

import json

import pytest
import torch

from minimal import load_model
from minimal.opamp import add_opamp, load_opamp, opamp_layers, opamp_parameters
from minimal.__main__ import main
from minimal.train import (
    TrainConfig, collate, encode_example, load_model_4bit, prepare_for_training, train, training_examples, training_mix,
)


def test_training_examples_are_train_split_and_mix_noise_ratios():
    ex = training_examples(40, noise_ratios=(0.0, 0.8), seed=3)
    assert len(ex) == 40 and all(e["split"] == "train" for e in ex)
    assert {e["noise_ratio"] for e in ex} == {0.0, 0.8}
    assert ex == training_examples(40, noise_ratios=(0.0, 0.8), seed=3)  # seeded
    test_people = {q for e in __import__("minimal").data.load_test_set("test_1hop") for q in [e["question"]]}
    assert not any(e["question"] in test_people for e in ex)


def test_training_mix_is_half_real_text_half_varied_synthetic_and_seeded():
    ex = training_mix(40, seed=2)
    assert len(ex) == 40 and all(e["split"] == "train" for e in ex)
    assert sum(e.get("source") == "nq-open" for e in ex) == 20
    assert {e["family"] for e in ex if "family" in e} == {"varied"}
    assert {e["noise_ratio"] for e in ex if e.get("family") == "varied"} == {0.0, 0.5, 0.8, 0.9}
    assert ex == training_mix(40, seed=2) and ex != training_mix(40, seed=3)
    assert all(e.get("source") != "nq-open" for e in training_mix(10, seed=2, nq_share=0))
    with pytest.raises(ValueError, match="nq_share"):
        training_mix(10, nq_share=1.5)


def test_labels_cover_exactly_the_answer_and_end_of_turn():
    _, tok = load_model("tiny-llama")
    ex = training_examples(3, seed=0)
    input_ids, mask, labels = collate([encode_example(tok, e) for e in ex], tok.pad_token_id)
    for b, e in enumerate(ex):
        n = int(mask[b].sum())
        assert torch.all(mask[b, :n] == 1) and torch.all(mask[b, n:] == 0)  # right padded
        assert torch.all(labels[b, n:] == -100)
        kept = labels[b][labels[b] != -100]
        assert tok.decode(kept) == e["answers"][0] + tok.eos_token
        assert torch.equal(input_ids[b, n - len(kept) : n], kept)  # the answer ends the sequence
    with pytest.raises(ValueError, match="test split"):
        encode_example(tok, {**ex[0], "split": "test"})


def test_peft_keeps_opamp_trainable_and_lora_off_the_adapters():
    model, tok = load_model("tiny-llama")
    add_opamp(model, K=10)
    model = prepare_for_training(model, lora=True, r=4, alpha=8)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("calibration" in n for n in names) and any("lora_" in n for n in names)
    assert not any("calibration" in n and "lora_" in n for n in names)  # no LoRA inside the adapters
    assert all(p.requires_grad for p in opamp_parameters(model))
    assert not model.get_input_embeddings().weight.requires_grad
    ex = training_examples(2, seed=0)
    input_ids, mask, labels = collate([encode_example(tok, e) for e in ex], tok.pad_token_id)
    model.train()
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    w_down = opamp_layers(model)[0].q1.w_down.weight  # W_up = 0: W_down gets its gradient later
    w_up = opamp_layers(model)[0].q1.w_up.weight
    assert w_up.grad is not None and w_up.grad.abs().sum() > 0
    assert w_down.grad is not None
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n][0]
    assert lora_b.grad is not None and lora_b.grad.abs().sum() > 0


def test_training_lowers_the_loss_and_changes_only_trainable_weights():
    model, tok = load_model("tiny-llama")
    torch.manual_seed(0)
    add_opamp(model, K=10, adapter_dim=16)
    model = prepare_for_training(model, lora=True, r=8, alpha=16)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad and "layers.0" in n}
    w_up = opamp_layers(model)[1].k2.w_up.weight
    ex = training_examples(2, seed=0)
    history = train(model, tok, ex, TrainConfig(steps=8, batch_size=2, lr=1e-2, warmup=0.1), progress=False)
    assert len(history["loss"]) == 8 and len(history["lr"]) == 8
    assert history["lr"][0] < history["lr"][1]  # warm-up
    assert history["lr"][-1] < 0.1 * max(history["lr"])  # cosine decay
    assert sum(history["loss"][-2:]) / 2 < sum(history["loss"][:2]) / 2 - 0.3  # nats; starts near ln(49152)
    assert w_up.abs().sum() > 0  # the adapters moved off their zero init
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not model.training


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(warmup=1.5)
    model, tok = load_model("tiny-llama")
    with pytest.raises(ValueError, match="nothing to train"):
        prepare_for_training(model, lora=False)
    with pytest.raises(ValueError, match="empty"):
        train(model, tok, [], TrainConfig(steps=1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_4bit_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA"):
        load_model_4bit("Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(SystemExit):  # argparse: --out is required
        main(["train-opamp", "--model", "tiny-llama"])


def test_cli_writes_adapters_lora_and_metrics(tmp_path, capsys):
    rc = main(["train-opamp", "--model", "tiny-llama", "--K", "5", "--steps", "2", "--batch-size", "2",
                          "--lora-r", "4", "--adapter-dim", "8", "--out", str(tmp_path)])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert len(metrics["loss"]) == 2 and metrics["args"]["K"] == 5.0
    assert (tmp_path / "lora" / "adapter_config.json").exists()
    fresh, _ = load_model("tiny-llama")
    layers = load_opamp(fresh, tmp_path / "adapters")
    assert layers[0].K == 5.0 and layers[0].q1.w_up.weight.abs().sum() > 0  # trained, not the zero init
