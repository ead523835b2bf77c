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
from .train import TrainConfig, adapt, training_examples

PARTS = ("base", "lora", "opamp", "sra", "pear")
DEFAULT_METHODS = "base,lora,opamp,sra,pear"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CLASHES = {
    frozenset({"opamp", "sra"}): "both replace the attention map of every layer",
    frozenset({"opamp", "lora"}): "opamp already includes LoRA (trained together)",
}
K, SEED = 10.0, 0  # OpAmp's CMRR (the paper's choice) and the training seed


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


def train_adapters(model_name: str, part: str, folder: Path, profile, progress: bool = True) -> dict:
    """Train ``part`` ("lora" or "opamp" = OpAmp + LoRA) with notebook 03's recipe and save it.

    Writes ``folder/lora/`` (PEFT), ``folder/adapters/`` (OpAmp, if any) and ``folder/train.json``.
    """
    steps, batch = profile.opamp_train_steps, profile.opamp_train_batch
    examples = training_examples(steps * batch, seed=SEED)
    config = TrainConfig(steps=steps, batch_size=batch, seed=SEED)
    model, _, history = adapt(model_name, examples, config, K=K if part == "opamp" else None,
                              stride=profile.opamp_stride, lora_r=profile.opamp_lora_r,
                              lora_alpha=profile.opamp_lora_alpha, progress=progress,
                              desc=f"train {part}")
    folder.mkdir(parents=True, exist_ok=True)
    if part == "opamp":
        save_opamp(model, folder / "adapters")
    model.save_pretrained(folder / "lora")
    for path in folder.glob("*/*.safetensors"):
        _store_half(path)
    record = dict(part=part, model=model_name, profile=profile.name, steps=steps, batch=batch, seed=SEED,
                  K=K if part == "opamp" else None, stride=profile.opamp_stride, lora_r=profile.opamp_lora_r,
                  seconds=history["seconds"], loss=history["loss"],
                  date=time.strftime("%Y-%m-%d"), machine=platform.machine())
    (folder / "train.json").write_text(json.dumps(record, indent=1))
    return record


def train_pear(model_name: str, path: Path, profile, device: str, progress: bool = True) -> dict:
    """Detect suppression heads and learn their coefficients with notebook 06's recipe; save."""
    model, tokenizer = models.load_model(model_name, device=device)
    start = time.time()
    dataset = pear.proxy_dataset(tokenizer, profile.pear_settings, seed=0)
    scores = pear.head_scores(model, dataset, variant="path", progress=progress)
    heads = pear.top_heads(scores, min(profile.pear_k, scores.scores.numel()))
    scales, history = pear.train_coefficients(
        model, heads, sequences=profile.pear_train_sequences, n=profile.pear_train_n,
        batch_size=profile.pear_train_batch, lr=profile.pear_lr, seed=1, tokenizer=tokenizer, progress=progress)
    seconds = time.time() - start
    pear.save_coefficients(path, model, scales.coefficients(), variant=scores.variant, k=len(heads),
                           profile=profile.name, seconds=seconds, settings=[list(s) for s in profile.pear_settings],
                           loss=history["loss"], date=time.strftime("%Y-%m-%d"))
    return json.loads(Path(path).read_text())


def ensure_weights(model_name: str, methods, root=None, profile=None, device: str = "cpu",
                   progress: bool = True) -> dict:
    """Make sure every trained part the ``methods`` need exists under ``weights_dir``; train the
    missing ones. Returns ``{part: training record}`` (with the seconds it took)."""
    profile = profile or get_profile()
    folder = weights_dir(model_name, root)
    needed = {p for m in parse_methods(methods) for p in m.split("+")} & {"lora", "opamp", "pear"}
    records = {}
    for part in sorted(needed):
        if part == "pear":
            path = folder / "pear.json"
            if not path.exists():
                _announce("PEAR coefficients", model_name, path)
                train_pear(model_name, path, profile, device, progress)
            records[part] = json.loads(path.read_text())
        else:
            path = folder / part / "train.json"
            if not path.exists():
                _announce(f"{part} weights", model_name, path.parent)
                train_adapters(model_name, part, path.parent, profile, progress)
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


def build(method: str, model_name: str, root=None, device: str = "cpu", sra_config: sra.SRAConfig | None = None):
    """A fresh model with ``method`` applied, from saved weights (see :func:`ensure_weights`).

    Order: the trained weights (LoRA merged into the linears; OpAmp adapters attached), then
    PEAR folded into ``o_proj``, then SRA switched on. Returns ``(model, tokenizer)``.
    """
    (name,) = parse_methods([method])
    parts = set(name.split("+"))
    folder = weights_dir(model_name, root)
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


def default_sra_config(tokenizer, **factors) -> sra.SRAConfig:
    """SRA's begin/tail read off train-split prompts (all noise ratios); the authors' g and f."""
    examples = [e for r in (0.0, 0.5, 0.8, 0.9) for e in data.generate(8, noise_ratio=r, split="train", seed=7)]
    return sra.config_for_prompts(tokenizer, examples, **factors)


# ----------------------------------------------------------------------------- the comparison


def _cost_prompt(tokenizer, examples, device):
    """The prompt of the example with the most documents, as a batch of one: (1, T)."""
    longest = max(examples, key=lambda e: len(e["documents"]))
    return data.build_prompt(tokenizer, longest).input_ids[None].to(device)


def compare(model_name: str = "smollm2-135m", methods=DEFAULT_METHODS, test="test_1hop", per_cell: int | None = None,
            root=None, profile=None, device: str | None = None, progress: bool = True) -> dict:
    """Evaluate every method on the same test questions; cost measured against ``base``.

    Returns ``{"meta", "methods": {name: {"overall", "by_noise", "by_position", "gold_ratio",
    "prefill", "memory", "training", "paired", "records"}}}``: accuracies as :func:`minimal.evaluate.accuracy_grid`
    rows; ``gold_ratio`` the per-document attention on the gold document over a distractor
    (mean over layers, noisy questions); ``prefill`` the paired time ratio to base;
    ``memory`` the peak prefill memory (MiB) and its ratio to base; ``training`` the one-off
    training seconds of the weights used (from their records); ``paired`` the questions fixed
    and broken against base (:func:`paired`, when base is among the methods).
    """
    names = parse_methods(methods)
    profile = profile or get_profile()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_cell = per_cell or profile.compare_per_cell
    examples = evaluate.select_per_cell(data.load_test_set(test), per_cell)
    training = ensure_weights(model_name, names, root, profile, device, progress)

    base, tokenizer = models.load_model(model_name, device=device)
    prompt = _cost_prompt(tokenizer, examples, device)
    sra_config = default_sra_config(tokenizer)
    results, start = {}, time.time()
    for name in names:
        model = base if name == "base" else build(name, model_name, root, device, sra_config)[0]
        records = evaluate.evaluate(model, tokenizer, examples, batch_size=profile.batch_size,
                                    max_new_tokens=profile.max_new_tokens, progress=progress, desc=name)
        timing = cost.latency_ratio(base, model, prompt, repeats=profile.compare_repeats, warmup=1)
        # after the timings (both warm), base then method, one right after the other
        base_memory = cost.peak_memory_mb(lambda: base(prompt), device)
        memory = cost.peak_memory_mb(lambda: model(prompt), device)
        noisy = [r for r in records if r["noise_ratio"]]
        results[name] = dict(
            overall=evaluate.accuracy_grid(records, by=())[0],
            by_noise=evaluate.accuracy_grid(records, by=("noise_ratio",)),
            by_position=evaluate.accuracy_grid(noisy or records, by=("gold_position",)),
            gold_ratio=evaluate.gold_attention_ratio(records),
            prefill=timing,
            memory=dict(mb=memory, base_mb=base_memory, ratio=memory / base_memory if memory and base_memory else None),
            training={p: training[p].get("seconds") for p in name.split("+") if p in training},
            records=records,
        )
        if model is not base:
            del model
    if "base" in results:  # question by question against the base model
        for m in results.values():
            m["paired"] = paired(results["base"]["records"], m["records"])
    meta = dict(command="compare", model=model_name, methods=names, test=str(test), per_cell=per_cell,
                n=len(examples), profile=profile.name, device=device, prompt_tokens=int(prompt.shape[1]),
                sra=asdict(sra_config),
                seconds=time.time() - start, date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if device == "cuda" else None)
    return dict(meta=meta, methods=results)


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


def format_table(result: dict) -> str:
    """The comparison as two text tables: accuracy by noise ratio, then by gold position with
    the attention on the gold document and the costs."""
    methods, meta = result["methods"], result["meta"]
    first = next(iter(methods.values()))
    ratios = [r["noise_ratio"] for r in first["by_noise"]]
    positions = [r["gold_position"] for r in first["by_position"]]
    blank = " " * 17

    head = f"{'method':<11} | {'all':^17} {'n':>4} | " + " | ".join(f"noise {r}".center(17) for r in ratios)
    lines = ["Accuracy (lenient match, 95% Wilson interval)", head, "-" * len(head)]
    for name, m in methods.items():
        noise = {r["noise_ratio"]: r for r in m["by_noise"]}
        cells = " | ".join(_pct(noise[r]) if r in noise else blank for r in ratios)
        lines.append(f"{name:<11} | {_pct(m['overall'])} {m['overall']['n']:>4} | {cells}")

    head = (f"{'method':<11} | " + " | ".join(f"gold {p}".center(17) for p in positions)
            + " | vs base: fixed/broken (p) | gold/distr. | prefill | memory | training")
    lines += ["", "Noisy questions (noise > 0) by gold position; attention and cost", head, "-" * len(head)]
    for name, m in methods.items():
        pos = {r["gold_position"]: r for r in m["by_position"]}
        where = " | ".join(_pct(pos[p]) if p in pos else blank for p in positions)
        gold = f"{m['gold_ratio']:.2f}x" if m["gold_ratio"] is not None else "n/a"
        memory = f"{m['memory']['ratio']:.2f}x" if m["memory"]["ratio"] is not None else "n/a"
        train = sum(s or 0 for s in m["training"].values())
        vs = m.get("paired")
        vs = f"+{vs['fixed']:<3} -{vs['broken']:<3} (p={vs['p_value']:.2g})" if vs else "n/a"
        lines.append(f"{name:<11} | {where} | {vs:^25} | {gold:^11} | {m['prefill']['ratio']:6.2f}x | {memory:>6} | "
                     f"{_seconds(train):>8}")
    lines.append(
        f"\n{meta['model']} on {meta['test']}: {meta['per_cell']} questions per noise x position cell, n={meta['n']} "
        f"per method; profile {meta['profile']}; {meta['device']} ({meta['machine']}, {meta['threads']} threads); "
        f"{meta['date']}.\ngold/distr.: attention of the last prompt token per gold document over per distractor "
        f"(mean over layers). fixed/broken: questions the method gets right that base missed, and the reverse; p: exact sign test. prefill, memory: ratios to base on the longest test prompt ({meta['prompt_tokens']} "
        "tokens), timed side by side (median of paired ratios; base vs itself shows the noise).\ntraining: one-off, "
        "from the records of the weights used.")
    return "\n".join(lines)


def plot(result: dict, path=None):
    """Accuracy vs noise ratio per method, accuracy by gold position, and accuracy vs prefill cost."""
    import matplotlib.pyplot as plt

    from . import plots

    methods = result["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    for i, (name, m) in enumerate(methods.items()):
        shift = 0.01 * (i - (len(methods) - 1) / 2)  # keep the error bars apart
        plots.plot_accuracy([dict(r, noise_ratio=r["noise_ratio"] + shift) for r in m["by_noise"]],
                            x="noise_ratio", ax=axes[0], label=name)
    axes[0].set_title("accuracy vs noise ratio")
    positions = [r["gold_position"] for r in next(iter(methods.values()))["by_position"]]
    width = 0.8 / len(methods)
    for i, (name, m) in enumerate(methods.items()):
        rows = {r["gold_position"]: r for r in m["by_position"]}
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(positions))]
        acc = [100 * rows[p]["accuracy"] for p in positions]
        err = [[100 * (rows[p]["accuracy"] - rows[p]["low"]) for p in positions],
               [100 * (rows[p]["high"] - rows[p]["accuracy"]) for p in positions]]
        axes[1].bar(xs, acc, width, yerr=err, capsize=2, label=name)
    axes[1].set_xticks(range(len(positions)), positions)
    axes[1].set_ylabel("accuracy (%), noisy questions")
    axes[1].set_title("accuracy by gold position (r > 0)")
    axes[1].legend(fontsize=8)
    for name, m in methods.items():
        o = m["overall"]
        axes[2].errorbar(m["prefill"]["ratio"], 100 * o["accuracy"], capsize=3, marker="o",
                         yerr=[[100 * (o["accuracy"] - o["low"])], [100 * (o["high"] - o["accuracy"])]])
        axes[2].annotate(name, (m["prefill"]["ratio"], 100 * o["accuracy"]), textcoords="offset points", xytext=(6, 4))
    axes[2].set_xlabel("prefill time / base (side by side)")
    axes[2].set_ylabel("accuracy (%), all questions")
    axes[2].set_title("what it buys vs what it costs")
    axes[2].grid(alpha=0.3)
    meta = result["meta"]
    fig.suptitle(f"{meta['model']} on {meta['test']}, n={meta['n']} per method, profile {meta['profile']}", y=1.02)
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
    p.add_argument("--test", default="test_1hop", help="shipped test set name or JSONL path (default: %(default)s)")
    p.add_argument("--per-cell", type=int, default=None, help="questions per (noise, position) cell (default: profile)")
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
        data.load_test_set(args.test)
        profile = get_profile(args.profile)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"python -m minimal compare: error: {err}") from None
    result = compare(args.model, args.methods, args.test, args.per_cell, args.weights, profile, args.device)
    print()
    print(format_table(result))
    out = Path(args.out)
    path = evaluate.save_json(result, out / "compare.json")
    plot(result, out / "compare.png")
    print(f"\nwrote {path} and {out / 'compare.png'} in {result['meta']['seconds']:.0f} s")
    return 0
