"""Every method on the same questions, with what it costs: ``python -m minimal compare``.

    python -m minimal compare --model smollm2-135m --methods base,lora,opamp,sra,pear --test test_1hop

A *method* is a name, or names joined by ``+`` where they compose:

    base    the model as it is
    lora    LoRA fine-tuned on train-split noisy QA (the fair control for OpAmp)
    opamp   OpAmp adapters (K = 10) + LoRA, trained together on the same data (minimal.opamp)
    sra     Scaled ReAttention, inference only, no weights (minimal.sra)
    pear    PEAR coefficients folded into o_proj (minimal.pear)

    pear+sra, lora+pear, opamp+pear, lora+sra   compose; opamp+sra does not (both replace the
                                                attention map), nor opamp+lora (opamp has LoRA)

Trained weights live in ``weights/<model>/`` (``--weights``): ``lora/``, ``opamp/`` and
``pear.json`` (tensors stored in fp16, loaded into the model's dtype). The repository ships them for the default model; for any other model they
are trained on first use with the recipe of the profile (notebooks 03 and 06), saved, and
loaded from then on. Weights saved for another model are refused (a ValueError naming the
mismatch), never silently used.

Every method sees the same test questions (greedy, lenient match, Wilson 95% intervals). The
cost columns are measured in the same run against the base model, side by side
(:mod:`minimal.cost`): prefill time and peak prefill memory on the longest test prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict
import time
from pathlib import Path

import torch

from . import cost, data, evaluate, models, pear, sra
from .opamp import load_opamp, save_opamp
from .profiles import get_profile
from .train import TrainConfig, adapt, training_mix

PARTS = ("base", "lora", "opamp", "sra", "pear")
DEFAULT_METHODS = "base,lora,opamp,sra,pear"
DEFAULT_TESTS = "test_1hop,test_heldout,test_nq"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CLASHES = {
    frozenset({"opamp", "sra"}): "both replace the attention map of every layer",
    frozenset({"opamp", "lora"}): "opamp already includes LoRA (trained together)",
}
K = 10.0  # OpAmp's CMRR (the paper's choice)


# ----------------------------------------------------------------------------- method names


def parse_methods(text) -> list[str]:
    """``"base,opamp,pear+sra"`` -> ``["base", "opamp", "pear+sra"]``, checked.

    Raises ValueError for unknown names (listing the known ones), ``base`` in a combination,
    parts that do not compose, repeated parts or an empty list.
    """
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if not names:
        raise ValueError(f"methods is empty: choose from {', '.join(PARTS)} (or combine with '+')")
    for name in names:
        parts = name.split("+")
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r} in {name!r}: known methods are "
                             f"{', '.join(PARTS)}; combine them with '+', e.g. pear+sra")
        if len(set(parts)) != len(parts):
            raise ValueError(f"method {name!r} repeats a part")
        if "base" in parts and len(parts) > 1:
            raise ValueError(f"method {name!r}: 'base' is the model without any method; it combines with nothing")
        for pair, why in CLASHES.items():
            if pair <= set(parts):
                raise ValueError(f"method {name!r}: {' and '.join(sorted(pair))} do not compose ({why})")
    if len(set(names)) != len(names):
        raise ValueError(f"methods lists a method twice: {names}")
    return names


def _slug(model_name: str) -> str:
    return model_name.replace("/", "--")


def weights_dir(model_name: str, root=None) -> Path:
    """Where the trained weights of ``model_name`` live: ``<root>/<model name, '/' as '--'>``."""
    if models.default_model_source(model_name):  # the default model, from the GGUF copy or the Hub alike
        model_name = models.DEFAULT_MODEL
    return Path(root or WEIGHTS_DIR) / _slug(model_name)


# ----------------------------------------------------------------------------- training (once)


def _announce(what: str, model_name: str, where: Path) -> None:
    print(f"{what} for {model_name}: none in {where}, training now (once; the progress bar shows the time "
          "left), then saved there")


def train_adapters(model_name: str, part: str, folder: Path, profile, seed: int = 0, progress: bool = True) -> dict:
    """Train ``part`` ("lora" or "opamp" = OpAmp + LoRA) on :func:`minimal.train.training_mix`
    (half real-text questions, half synthetic ones in varied phrasings), with the same data, steps
    and seed for both parts, so LoRA alone stays OpAmp's fair control; save it.

    Writes ``folder/lora/`` (PEFT), ``folder/adapters/`` (OpAmp, if any) and ``folder/train.json``.
    """
    steps, batch = profile.compare_train_steps, profile.opamp_train_batch
    examples = training_mix(steps * batch, seed=seed)
    config = TrainConfig(steps=steps, batch_size=batch, seed=seed)
    model, _, history = adapt(model_name, examples, config, K=K if part == "opamp" else None,
                              stride=profile.opamp_stride, lora_r=profile.opamp_lora_r,
                              lora_alpha=profile.opamp_lora_alpha, progress=progress,
                              desc=f"train {part} (seed {seed})")
    folder.mkdir(parents=True, exist_ok=True)
    if part == "opamp":
        save_opamp(model, folder / "adapters")
    model.save_pretrained(folder / "lora")
    for path in folder.glob("*/*.safetensors"):
        _store_half(path)
    record = dict(part=part, model=model_name, profile=profile.name, recipe="training_mix", nq_share=0.5,
                  steps=steps, batch=batch, seed=seed,
                  K=K if part == "opamp" else None, stride=profile.opamp_stride, lora_r=profile.opamp_lora_r,
                  seconds=history["seconds"], loss=history["loss"],
                  date=time.strftime("%Y-%m-%d"), machine=platform.machine())
    (folder / "train.json").write_text(json.dumps(record, indent=1))
    return record


def train_pear(model_name: str, path: Path, profile, device: str, seed: int = 0, progress: bool = True) -> dict:
    """Detect suppression heads and learn their coefficients with notebook 06's recipe; save.
    ``seed`` draws the copy sequences of detection and of training."""
    model, tokenizer = models.load_model(model_name, device=device)
    start = time.time()
    dataset = pear.proxy_dataset(tokenizer, profile.pear_settings, seed=seed)
    scores = pear.head_scores(model, dataset, variant="path", progress=progress)
    heads = pear.top_heads(scores, min(PEAR_K, scores.scores.numel()))
    scales, history = pear.train_coefficients(
        model, heads, sequences=profile.pear_train_sequences, n=profile.pear_train_n,
        batch_size=profile.pear_train_batch, lr=profile.pear_lr, seed=seed + 1, tokenizer=tokenizer, progress=progress)
    seconds = time.time() - start
    pear.save_coefficients(path, model, scales.coefficients(), variant=scores.variant, k=len(heads), seed=seed,
                           profile=profile.name, seconds=seconds, settings=[list(s) for s in profile.pear_settings],
                           loss=history["loss"], date=time.strftime("%Y-%m-%d"))
    return json.loads(Path(path).read_text())


def ensure_weights(model_name: str, methods, root=None, profile=None, device: str = "cpu", seed: int = 0,
                   progress: bool = True) -> dict:
    """Make sure every trained part the ``methods`` need exists under ``weights_dir(...)/seed<seed>``;
    train the missing ones. Returns ``{part: training record}`` (with the seconds it took)."""
    profile = profile or get_profile()
    folder = weights_dir(model_name, root) / f"seed{seed}"
    needed = {p for m in parse_methods(methods) for p in m.split("+")} & {"lora", "opamp", "pear"}
    records = {}
    for part in sorted(needed):
        if part == "pear":
            path = folder / "pear.json"
            if not path.exists():
                _announce("PEAR coefficients", model_name, path)
                train_pear(model_name, path, profile, device, seed, progress)
            records[part] = json.loads(path.read_text())
        else:
            path = folder / part / "train.json"
            if not path.exists():
                _announce(f"{part} weights", model_name, path.parent)
                train_adapters(model_name, part, path.parent, profile, seed, progress)
            records[part] = json.loads(path.read_text())
    return records


def _store_half(path: Path) -> None:
    """Rewrite a safetensors file with fp32 tensors in fp16: half the size on disk (the shipped
    weights live in git). Loading copies them back into the model's dtype; the rounding (relative
    5e-4) is far below what changes a greedy answer here."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: t.half() if t.dtype == torch.float32 else t for k, t in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)


# ----------------------------------------------------------------------------- building a method


def build(method: str, model_name: str, root=None, device: str = "cpu", sra_config: sra.SRAConfig | None = None,
          seed: int = 0):
    """A fresh model with ``method`` applied, from the saved weights of training seed ``seed``
    (see :func:`ensure_weights`).

    Order: the trained weights (LoRA merged into the linears; OpAmp adapters attached), then
    PEAR folded into ``o_proj``, then SRA switched on. Returns ``(model, tokenizer)``.
    """
    (name,) = parse_methods([method])
    parts = set(name.split("+"))
    folder = weights_dir(model_name, root) / f"seed{seed}"
    model, tokenizer = models.load_model(model_name, device=device)
    for part in ("opamp", "lora"):
        if part in parts:
            if part == "opamp":
                load_opamp(model, folder / "opamp" / "adapters")
            model = _load_lora(model, folder / part / "lora", model_name)
    if "pear" in parts:
        pear.fold(model, pear.load_coefficients(folder / "pear.json", model))
    if "sra" in parts:
        sra.apply_sra(model, sra_config or default_sra_config(tokenizer))
    return model.eval(), tokenizer


def _load_lora(model, path: Path, model_name: str):
    from peft import PeftConfig, PeftModel

    if not (path / "adapter_config.json").exists():
        raise ValueError(f"{path} holds no LoRA weights (adapter_config.json): run ensure_weights first")
    saved = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if saved:
        models.check_same_model(saved, model, f"LoRA weights in {path}")
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


# Chosen by scripts/choose_on_validation.py on validation questions (60; never a test set): SRA's
# gain (the authors' g is 4) and PEAR's number of heads. The margins were one or two questions.
SRA_GAIN = 2.0
PEAR_K = 20


def default_sra_config(tokenizer, **factors) -> sra.SRAConfig:
    """SRA's begin/tail read off training prompts of every kind compare meets (template and varied
    synthetic questions, Natural Questions: their longest question sets the tail), the authors' f,
    and the gain ``SRA_GAIN``."""
    examples = [e for r in (0.0, 0.5, 0.8, 0.9) for family in ("default", "varied")
                for e in data.generate(8, noise_ratio=r, split="train", family=family, seed=7)]
    examples += data.nq_examples("train", 32, noise_ratios=(0.0,), seed=7)
    return sra.config_for_prompts(tokenizer, examples, **{"gain": SRA_GAIN, **factors})


# ----------------------------------------------------------------------------- the comparison


TRAINED = {"lora", "opamp", "pear"}  # parts whose weights depend on a training seed


def parse_tests(text) -> list[str]:
    """``"test_1hop,test_nq"`` (or a list) -> the names or paths, each one loadable; else ValueError."""
    if isinstance(text, Path):
        text = [text]
    tests = [str(t).strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if not tests:
        raise ValueError("test is empty: name a shipped test set (test_1hop, test_heldout, test_nq, ...) or a JSONL path")
    for t in tests:
        data.load_test_set(t)  # FileNotFoundError naming the shipped sets
    return tests


def _cost_prompt(tokenizer, examples, device):
    """The longest prompt among ``examples``, as a batch of one: (1, T)."""
    prompts = [data.build_prompt(tokenizer, e).input_ids for e in examples]
    return max(prompts, key=len)[None].to(device)


def _scored(records: list[dict]) -> dict:
    """One evaluation run summarised: accuracy overall, by noise ratio, by gold position (noisy
    questions, or all when no question says its noise ratio), attention on gold, the records."""
    noisy = [r for r in records if r.get("noise_ratio") not in (0, None, evaluate.UNKNOWN)]
    return dict(overall=evaluate.accuracy_grid(records, by=())[0],
                by_noise=evaluate.accuracy_grid(records, by=("noise_ratio",)),
                by_position=evaluate.accuracy_grid(noisy or records, by=("gold_position",)),
                gold_ratio=evaluate.gold_attention_ratio(records), records=records)


def compare(model_name: str = "smollm2-135m", methods=DEFAULT_METHODS, tests="test_1hop", per_cell: int | None = None,
            root=None, profile=None, device: str | None = None, seeds=None, progress: bool = True) -> dict:
    """Evaluate every method on the same questions of every test set; trained methods once per
    training seed; cost measured against ``base``.

    Returns ``{"meta", "tests": {test: {"n", "methods": {name: {"runs", "mean", "sd"}}}},
    "cost": {name: {"prefill", "memory", "training"}}}``. A *run* is one model on one test set:
    ``{"seed", "overall", "by_noise", "by_position", "gold_ratio", "paired", "records"}`` with
    accuracies as :func:`minimal.evaluate.accuracy_grid` rows, ``gold_ratio`` the per-document
    attention on the gold document over a distractor (mean over layers, noisy questions) and
    ``paired`` the questions fixed and broken against base (:func:`paired`, when base is among
    the methods). ``seed`` is None for methods without training; ``mean`` and ``sd`` are the
    accuracy over the runs (sd over seeds, 0 for one run). ``prefill`` is the paired time ratio
    to base and ``memory`` the peak prefill memory (MiB) and its ratio, both on the longest prompt
    of the first test set, with the first seed's weights; ``training`` the one-off seconds of the
    weights used (from their records, per seed).
    """
    names = parse_methods(methods)
    tests = parse_tests(tests)
    profile = profile or get_profile()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_cell = per_cell or profile.compare_per_cell
    seeds = list(profile.compare_seeds if seeds is None else seeds)
    sets = {t: evaluate.select_per_cell(data.load_test_set(t), per_cell) for t in tests}
    needs_training = any(set(n.split("+")) & TRAINED for n in names)
    training = {seed: ensure_weights(model_name, names, root, profile, device, seed, progress)
                for seed in (seeds if needs_training else [])}

    base, tokenizer = models.load_model(model_name, device=device)
    prompt = _cost_prompt(tokenizer, sets[tests[0]], device)
    sra_config = default_sra_config(tokenizer)
    runs, costs, start = {t: {} for t in tests}, {}, time.time()
    for name in names:
        trained = set(name.split("+")) & TRAINED
        for seed in (seeds if trained else [None]):
            model = base if name == "base" else build(name, model_name, root, device, sra_config, seed or 0)[0]
            for t, examples in sets.items():
                label = name if seed is None else f"{name} seed {seed}"
                records = evaluate.evaluate(model, tokenizer, examples, batch_size=profile.batch_size,
                                            max_new_tokens=profile.max_new_tokens, progress=progress,
                                            desc=f"{label} on {Path(t).stem}")
                runs[t].setdefault(name, []).append(dict(seed=seed, **_scored(records)))
            if name not in costs:
                timing = cost.latency_ratio(base, model, prompt, repeats=profile.compare_repeats, warmup=1)
                # after the timings (both warm), base then method, one right after the other
                base_memory = cost.peak_memory_mb(lambda: base(prompt), device)
                memory = cost.peak_memory_mb(lambda: model(prompt), device)
                costs[name] = dict(prefill=timing, memory=dict(
                    mb=memory, base_mb=base_memory, ratio=memory / base_memory if memory and base_memory else None))
            costs[name].setdefault("training", {})[seed] = {
                p: training[seed][p].get("seconds") for p in trained} if trained else {}
            if model is not base:
                del model
    results = {}
    for t, by_method in runs.items():
        base_records = by_method["base"][0]["records"] if "base" in by_method else None
        summary = {}
        for name, method_runs in by_method.items():
            if base_records is not None:  # question by question against the base model
                for run in method_runs:
                    run["paired"] = paired(base_records, run["records"])
            acc = torch.tensor([r["overall"]["accuracy"] for r in method_runs], dtype=torch.float64)
            summary[name] = dict(runs=method_runs, mean=float(acc.mean()), sd=float(acc.std()) if len(acc) > 1 else 0.0)
        results[t] = dict(n=len(sets[t]), methods=summary)
    meta = dict(command="compare", model=model_name, methods=names, tests=tests, per_cell=per_cell, seeds=seeds,
                profile=profile.name, device=device, prompt_tokens=int(prompt.shape[1]), sra=asdict(sra_config),
                seconds=time.time() - start, date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    return dict(meta=meta, tests=results, cost=costs)


def paired(base_records: list[dict], other_records: list[dict], metric: str = "lenient") -> dict:
    """Question by question against the base model: how many the method fixes and breaks.

    Both lists must hold the same questions in the same order. ``p_value`` is the exact
    two-sided sign test (McNemar) on the discordant questions: the chance of a split at least
    this uneven if fixing and breaking were equally likely.
    """
    if [r["id"] for r in base_records] != [r["id"] for r in other_records]:
        raise ValueError("paired() needs the same questions in the same order for both methods")
    fixed = sum(bool(o[metric]) and not b[metric] for b, o in zip(base_records, other_records))
    broken = sum(bool(b[metric]) and not o[metric] for b, o in zip(base_records, other_records))
    n, k = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail)}


# ----------------------------------------------------------------------------- output


def _pct(row) -> str:
    return f"{100 * row['accuracy']:5.1f}% [{100 * row['low']:2.0f}-{100 * row['high']:3.0f}]".center(17)


def _seconds(s) -> str:
    return "-" if not s else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def _summary(m: dict) -> str:
    """One method on one test set: its Wilson interval, or with several seeds the mean +- sd and
    each seed's accuracy."""
    if len(m["runs"]) == 1:
        return _pct(m["runs"][0]["overall"]).strip()
    each = "/".join(f"{100 * r['overall']['accuracy']:.1f}" for r in m["runs"])
    return f"{100 * m['mean']:.1f}% +-{100 * m['sd']:.1f} ({each})"


def _mean_cell(m: dict, grid: str, key: str, value):
    """Accuracy in the cell ``key == value`` of each run's ``grid``: one run's interval, or the mean."""
    rows = [next((r for r in run[grid] if r[key] == value), None) for run in m["runs"]]
    rows = [r for r in rows if r is not None]
    if not rows:
        return " " * 17
    if len(rows) == 1:
        return _pct(rows[0])
    return f"{100 * sum(r['accuracy'] for r in rows) / len(rows):5.1f}% (mean)".center(17)


def format_table(result: dict) -> str:
    """The comparison as text: every method on every test set first, then one table per test set
    (by noise ratio and gold position, question by question against base, attention on gold),
    then the cost."""
    meta, tests = result["meta"], result["tests"]
    names = meta["methods"]
    seeds = (f"{len(meta['seeds'])} training seeds ({', '.join(map(str, meta['seeds']))})" if len(meta["seeds"]) > 1
             else f"one training seed ({meta['seeds'][0]})")
    cols = {t: f"{Path(t).stem} (n={tests[t]['n']})" for t in tests}
    width = {t: max(len(cols[t]), max(len(_summary(tests[t]["methods"][m])) for m in names)) for t in tests}
    head = f"{'method':<11} | " + " | ".join(f"{cols[t]:^{width[t]}}" for t in tests)
    lines = [f"Accuracy on every test set (lenient match). One run: 95% Wilson interval. Trained methods: mean "
             f"+- sd over {seeds}, then each seed.", head, "-" * len(head)]
    for name in names:
        lines.append(f"{name:<11} | " + " | ".join(f"{_summary(tests[t]['methods'][name]):^{width[t]}}" for t in tests))

    for t, block in tests.items():
        methods = block["methods"]
        first = methods[names[0]]["runs"][0]
        ratios = [r["noise_ratio"] for r in first["by_noise"]]
        positions = [r["gold_position"] for r in first["by_position"]]
        head = (f"{'method':<11} | " + " | ".join(f"noise {r}".center(17) for r in ratios) + " | "
                + " | ".join(f"gold {p}".center(17) for p in positions) + " | vs base: fixed/broken per run | gold/distr.")
        lines += ["", f"{Path(t).stem}: {block['n']} questions; by noise ratio, and by gold position on the noisy "
                  "ones; one run's interval, or the mean over seeds", head, "-" * len(head)]
        for name in names:
            m = methods[name]
            noise = " | ".join(_mean_cell(m, "by_noise", "noise_ratio", r) for r in ratios)
            where = " | ".join(_mean_cell(m, "by_position", "gold_position", p) for p in positions)
            vs = ", ".join(f"+{r['paired']['fixed']}/-{r['paired']['broken']} (p={r['paired']['p_value']:.2g})"
                           for r in m["runs"] if r.get("paired")) if name != "base" else ""
            gold = [r["gold_ratio"] for r in m["runs"] if r["gold_ratio"] is not None]
            gold = f"{sum(gold) / len(gold):.2f}x" if gold else "n/a"
            lines.append(f"{name:<11} | {noise} | {where} | {vs:<30} | {gold:>8}")

    head = f"{'method':<11} | prefill / base | memory / base | training (one-off, per seed)"
    lines += ["", f"Cost, side by side with base on the longest prompt of {Path(meta['tests'][0]).stem} "
              f"({meta['prompt_tokens']} tokens)", head,
              "-" * len(head)]
    for name in names:
        c = result["cost"][name]
        memory = f"{c['memory']['ratio']:.2f}x" if c["memory"]["ratio"] is not None else "n/a"
        train = [sum(s or 0 for s in parts.values()) for parts in c["training"].values()]
        train = ", ".join(_seconds(s) for s in train) if any(train) else "-"
        lines.append(f"{name:<11} | {c['prefill']['ratio']:13.2f}x | {memory:>13} | {train}")
    lines.append(
        f"\n{meta['model']}; {meta['per_cell']} questions per noise x position cell of each test set; profile "
        f"{meta['profile']}; {meta['device']} ({meta['machine']}, {meta['threads']} threads); {meta['date']}.\n"
        "gold/distr.: attention of the last prompt token per gold document over per distractor (mean over layers). "
        "fixed/broken: questions a run gets right that base missed, and the reverse; p: exact sign test.\n"
        "prefill, memory: ratios to base, timed side by side (median of paired ratios; base vs itself shows the "
        "noise). training: one-off, from the records of the weights used.")
    return "\n".join(lines)


def plot(result: dict, path=None):
    """Accuracy of every method on every test set (each seed a dot), and accuracy by noise ratio
    on each test set (mean over seeds)."""
    import matplotlib.pyplot as plt

    meta, tests = result["meta"], result["tests"]
    names = meta["methods"]
    fig, axes = plt.subplots(1, 1 + len(tests), figsize=(5.5 * (1 + len(tests)), 4.2), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tests))]
        ax.bar(xs, [100 * tests[t]["methods"][name]["mean"] for t in tests], width, label=name, alpha=0.8)
        for x, t in zip(xs, tests):
            ax.plot([x] * len(tests[t]["methods"][name]["runs"]),
                    [100 * r["overall"]["accuracy"] for r in tests[t]["methods"][name]["runs"]], "k.", ms=4)
    ax.set_xticks(range(len(tests)), [Path(t).stem for t in tests])
    ax.set_ylabel("accuracy (%)")
    ax.set_title("every method on every test set (dots: seeds)")
    ax.legend(fontsize=8)
    for ax, (t, block) in zip(axes[0, 1:], tests.items()):
        for name in names:
            runs = block["methods"][name]["runs"]
            ratios = [r["noise_ratio"] for r in runs[0]["by_noise"] if isinstance(r["noise_ratio"], (int, float))]
            if not ratios:
                continue
            acc = [100 * sum(next(r["accuracy"] for r in run["by_noise"] if r["noise_ratio"] == x) for run in runs)
                   / len(runs) for x in ratios]
            ax.plot(ratios, acc, marker="o", label=name)
        ax.set_xlabel("noise ratio")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{Path(t).stem} (n={block['n']})")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{meta['model']}, profile {meta['profile']}, seeds {meta['seeds']}", y=1.02)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


# ----------------------------------------------------------------------------- command line


def add_parser(subparsers):
    p = subparsers.add_parser("compare", help="every method on the same questions, with accuracy and cost",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model name or Hub id (default: %(default)s)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; '+' combines (default: %(default)s)")
    p.add_argument("--test", default=DEFAULT_TESTS,
                   help="comma-separated shipped test set names or JSONL paths (default: %(default)s)")
    p.add_argument("--seeds", default=None,
                   help="comma-separated training seeds of the trained methods (default: the profile's)")
    p.add_argument("--per-cell", type=int, default=None,
                   help="questions per (noise, position) cell of each test set; a file without those fields is "
                        "one cell, 'unknown' (default: profile)")
    p.add_argument("--profile", default=None, help="smoke|cpu|gpu (default: $MINIMAL_PROFILE, else by hardware)")
    p.add_argument("--weights", default=None, help=f"trained weights root (default: {WEIGHTS_DIR})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    p.set_defaults(func=cli)
    return p


def cli(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    try:  # the user's mistakes, before any model is loaded: a message, not a traceback
        parse_methods(args.methods)
        tests = parse_tests(args.test)
        profile = get_profile(args.profile)
        seeds = None if args.seeds is None else [x.strip() for x in args.seeds.split(",") if x.strip()]
        if seeds is not None and (not seeds or not all(x.isdigit() for x in seeds)):
            raise ValueError(f"--seeds {args.seeds!r}: give comma-separated integers >= 0, e.g. 0,1,2")
        seeds = None if seeds is None else [int(x) for x in seeds]
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"python -m minimal compare: error: {err}") from None
    result = compare(args.model, args.methods, tests, args.per_cell, args.weights, profile, args.device, seeds)
    print()
    print(format_table(result))
    out = Path(args.out)
    path = evaluate.save_json(result, out / "compare.json")
    plot(result, out / "compare.png")
    print(f"\nwrote {path} and {out / 'compare.png'} in {result['meta']['seconds']:.0f} s")
    return 0
