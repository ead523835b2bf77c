"""PEAR: proxy data, head detection against a naive ablation, re-weighting, folding, save/load."""

import copy

import pytest
import torch

from minimal import hooks, load_model, pear
from minimal.cost import latency_ratio
from minimal.models import tiny_model

SETTINGS = ((6, 5), (4, 7))


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def tiny(request):
    return load_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


# ----------------------------------------------------------------------------- proxy data


def test_proxy_dataset_repeats_distinct_ordinary_tokens_and_is_seeded(llama):
    _, tok = llama
    data = pear.proxy_dataset(tok, pear.SETTINGS, seed=3)
    assert [tuple(d.shape) for d in data] == [(s, 2 * n) for n, s in pear.SETTINGS]
    for ids, (n, _) in zip(data, pear.SETTINGS):
        assert torch.equal(ids[:, :n], ids[:, n:])  # x1..xn x1..xn
        assert all(len(set(row[:n].tolist())) == n for row in ids)  # distinct within a sequence
        assert ids.min() >= pear.TOKEN_RANGE[0] and ids.max() < pear.TOKEN_RANGE[1]
        assert not torch.isin(ids, torch.tensor(tok.all_special_ids)).any()
    again = pear.proxy_dataset(tok, pear.SETTINGS, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(data, again))
    assert not torch.equal(data[0], pear.proxy_dataset(tok, pear.SETTINGS, seed=4)[0])
    with pytest.raises(ValueError, match="n >= 2"):
        pear.copy_sequences(1, 3)


# ----------------------------------------------------------------------------- detection


def _naive_score(model, ids, layer, head, variant):
    """Ablate one head in a full forward of the whole sequence, no cache, full logits."""
    attn = hooks.attention_modules(model)
    _, num_heads, head_dim = pear.geometry(model)
    x, target = ids[:, :-1], ids[:, -1]
    seen, outputs = {}, {}

    def record(module, args):
        seen["x"] = args[0][:, -1].clone()

    def keep(j):
        def hook(module, args, output):
            outputs[j] = output[0].clone()
        return hook

    handles = [attn[layer].o_proj.register_forward_pre_hook(record)]
    handles += [attn[j].register_forward_hook(keep(j)) for j in range(len(attn))]
    logits = model(x).logits[:, -1]
    for h in handles:
        h.remove()
    clean = logits.gather(1, target[:, None])[:, 0] - logits.mean(-1)
    mean = seen["x"].mean(0)[head * head_dim : (head + 1) * head_dim]

    def ablate(module, args):
        y = args[0].clone()
        y[:, -1, head * head_dim : (head + 1) * head_dim] = mean
        return (y,)

    def freeze(j):
        def hook(module, args, output):
            return (outputs[j], *output[1:])  # the clean output, at every position
        return hook

    handles = [attn[layer].o_proj.register_forward_pre_hook(ablate)]
    if variant == "path":
        handles += [attn[j].register_forward_hook(freeze(j)) for j in range(layer + 1, len(attn))]
    logits = model(x).logits[:, -1]
    for h in handles:
        h.remove()
    ablated = logits.gather(1, target[:, None])[:, 0] - logits.mean(-1)
    return (ablated - clean).mean().item()


@pytest.mark.parametrize("variant", ["mean", "path"])
@torch.no_grad()
def test_batched_ablation_equals_naive_single_head_ablation(tiny, variant):
    model, tok = tiny
    data = pear.proxy_dataset(tok, SETTINGS, seed=0)
    result = pear.head_scores(model, data, variant=variant, max_rows=6, progress=False)  # 6 rows: chunks of 1
    assert result.variant == variant and result.scores.shape == (2, 4)
    assert result.settings == list(SETTINGS)
    for layer, head in [(0, 0), (0, 3), (1, 2)]:
        naive = sum(_naive_score(model, ids, layer, head, variant) for ids in data) / len(data)
        assert result.scores[layer, head].item() == pytest.approx(naive, abs=2e-5)
    # chunking does not change anything
    again = pear.head_scores(model, data, variant=variant, max_rows=64, progress=False)
    assert torch.allclose(again.scores, result.scores, atol=1e-5)


@torch.no_grad()
def test_path_patching_differs_from_mean_ablation_only_before_the_last_layer(llama):
    model, tok = llama
    data = pear.proxy_dataset(tok, SETTINGS, seed=0)
    mean = pear.head_scores(model, data, variant="mean", progress=False).scores
    path = pear.head_scores(model, data, variant="path", progress=False).scores
    assert torch.allclose(mean[-1], path[-1], atol=1e-6)  # nothing after the last layer to freeze
    assert not torch.allclose(mean[0], path[0], atol=1e-6)


@torch.no_grad()
def test_detection_returns_valid_heads_and_topk_checks_k(llama):
    model, tok = llama
    result = pear.head_scores(model, pear.proxy_dataset(tok, SETTINGS, seed=1), progress=False)
    heads = pear.top_heads(result, 3)
    assert len(heads) == 3 and len(set(heads)) == 3
    assert all(0 <= l < 2 and 0 <= h < 4 for l, h in heads)
    assert [result.scores[l, h].item() for l, h in heads] == sorted(result.scores.flatten().tolist(), reverse=True)[:3]
    assert pear.top_heads(result, 8) and len(pear.top_heads(result.scores, 8)) == 8
    for bad in (0, -1, 9, 2.5):
        with pytest.raises(ValueError, match="k="):
            pear.top_heads(result, bad)
    with pytest.raises(ValueError, match="variant"):
        pear.head_scores(model, [], variant="patch")


# ----------------------------------------------------------------------------- re-weighting and folding

COEFS = {(0, 1): 0.5, (1, 3): 1.7, (1, 0): 0.0}


@torch.no_grad()
def test_folded_logits_equal_hooked_logits(tiny):
    model, tok = tiny
    ids = pear.proxy_dataset(tok, SETTINGS, seed=2)[0]
    base = model(ids).logits
    with pear.apply(model, COEFS):
        hooked = model(ids).logits
    assert torch.equal(model(ids).logits, base)  # the hooks are gone again
    assert (hooked - base).abs().max() > 1e-3  # the coefficients do something
    folded = pear.fold(copy.deepcopy(model), COEFS)
    assert (folded(ids).logits - hooked).abs().max().item() <= 1e-5


@torch.no_grad()
def test_coefficients_of_one_change_nothing(llama):
    model, tok = llama
    ids = pear.proxy_dataset(tok, SETTINGS, seed=2)[1]
    base = model(ids).logits
    ones = {h: 1.0 for h in COEFS}
    with pear.apply(model, ones):
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(pear.fold(copy.deepcopy(model), ones)(ids).logits, base)
    scales = pear.HeadScales(list(COEFS), 4, 16)  # init 1
    assert scales.coefficients() == ones


def test_folded_model_is_a_plain_model(llama):
    model, _ = llama
    folded = pear.fold(copy.deepcopy(model), COEFS)
    base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in folded.state_dict().items()} == base_shapes
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in folded.modules())
    # exactly the chosen columns changed, by their factor
    w0, w1 = model.model.layers[1].self_attn.o_proj.weight, folded.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(w1[:, 48:64], 1.7 * w0[:, 48:64]) and torch.equal(w1[:, 0:16], torch.zeros_like(w0[:, 0:16]))
    assert torch.equal(w1[:, 16:48], w0[:, 16:48])


def test_training_moves_only_tau_and_records_history(llama):
    model, _ = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = [(0, 1), (1, 2)]
    scales, history = pear.train_coefficients(model, heads, sequences=6, n=5, batch_size=2, progress=False)
    assert len(history["loss"]) == len(history["tau"]) == 4 and history["step"] == [0, 1, 2, 3]
    assert history["tau"][0] == [1.0, 1.0] and history["tau"][-1] != [1.0, 1.0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # model untouched
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed
    assert list(scales.coefficients()) == heads


def test_copy_loss_is_on_the_copyable_second_half(llama):
    model, _ = llama
    ids = pear.copy_sequences(5, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        expected = torch.nn.functional.cross_entropy(logits[:, 5:9].reshape(-1, logits.shape[-1]), ids[:, 6:].reshape(-1))
        assert pear.copy_loss(model, ids).item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(llama, tmp_path):
    model, _ = llama
    for bad in ({(2, 0): 0.5}, {(0, 4): 0.5}, {(-1, 0): 0.5}):
        with pytest.raises(ValueError, match="does not exist"):
            pear.fold(copy.deepcopy(model), bad)
        with pytest.raises(ValueError, match="does not exist"):
            pear.apply(model, bad)
    with pytest.raises(ValueError, match="finite"):
        pear.fold(copy.deepcopy(model), {(0, 0): float("nan")})
    with pytest.raises(ValueError, match="at least one"):
        pear.fold(copy.deepcopy(model), {})
    with pytest.raises(ValueError, match="does not exist"):
        pear.train_coefficients(model, [(5, 0)], sequences=1, progress=False)

    folded = pear.fold(copy.deepcopy(model), COEFS)
    with pytest.raises(ValueError, match="already has PEAR coefficients folded"):
        pear.fold(folded, COEFS)

    path = pear.save_coefficients(tmp_path / "tau.json", model, COEFS, variant="path")
    assert pear.load_coefficients(path, model) == COEFS
    other, _ = load_model("tiny-qwen2")
    with pytest.raises(ValueError, match="saved for model .tiny-llama., this model is .tiny-qwen2."):
        pear.load_coefficients(path, other)
    with pytest.raises(ValueError, match="num_layers: saved 2, this model 3"):
        pear.load_coefficients(path, tiny_model("tiny-llama", num_hidden_layers=3))


def test_fold_mark_survives_save_pretrained(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = llama
    pear.fold(copy.deepcopy(model), COEFS).save_pretrained(tmp_path / "folded")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")
    with pytest.raises(ValueError, match="already has PEAR coefficients folded"):
        pear.fold(reloaded, COEFS)


def test_latency_ratio_of_a_model_with_itself(llama):
    model, _ = llama
    ids = torch.randint(1000, 2000, (1, 16))
    timing = latency_ratio(model, model, ids, repeats=3, warmup=1)
    assert timing["repeats"] == 3 and timing["ratio"] > 0 and timing["base_s"] > 0
    with pytest.raises(ValueError, match="repeats"):
        latency_ratio(model, model, ids, repeats=0)
