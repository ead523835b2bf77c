"""Every method on the same questions, with what it costs: ``python -m minimal compare``.

Methods: base (the model as it is), lora (LoRA on train-split questions: OpAmp's fair control), opamp (OpAmp adapters,
K = 10, + LoRA, trained together), sra (Scaled ReAttention, no weights), pear (PEAR coefficients folded into o_proj),
and parts joined by ``+`` where they compose: not opamp+sra (both replace the attention map), nor opamp+lora. Trained
weights (fp16) live in weights/<model>/seed<N>/ (--weights): lora/, opamp/, pear.json; shipped for the default model,
trained once (the profile's recipe) and saved for another; another model's are refused. Every method answers the same
questions (greedy, lenient match, Wilson 95% intervals); prefill time and peak memory are measured beside base.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import cost, data, evaluate, models, pear, sra
from .opamp import load_opamp, save_opamp
from .profiles import get_profile
from .train import TrainConfig, adapt, training_mix

PARTS = ("base", "lora", "opamp", "sra", "pear")
TRAINED = {"lora", "opamp", "pear"}  # parts whose weights depend on a training seed
DEFAULT_METHODS, DEFAULT_TESTS = "base,lora,opamp,sra,pear", "test_1hop,test_heldout,test_nq"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CLASHES = {frozenset({"opamp", "sra"}): "both replace the attention map of every layer",
           frozenset({"opamp", "lora"}): "opamp already includes LoRA (trained together)"}
K = 10.0  # OpAmp's CMRR (the paper's choice)
# SRA's gain (authors: 4) and PEAR's heads, chosen by scripts/choose_on_validation.py on 60 validation questions
SRA_GAIN, PEAR_K = 2.0, 20


def _names(text) -> list[str]:  # "a, b" or a list -> ["a", "b"]
    return [str(m).strip() for m in (text.split(",") if isinstance(text, str) else text) if str(m).strip()]


def parse_methods(text) -> list[str]:
    """``"base,opamp,pear+sra"`` -> ``["base", "opamp", "pear+sra"]``, or a ValueError that says why not."""
    if not (names := _names(text)):
        raise ValueError(f"methods is empty: choose from {', '.join(PARTS)} (or combine with '+')")
    for name in names:
        parts = name.split("+")
        for unknown in [p for p in parts if p not in PARTS][:1]:
            raise ValueError(f"unknown method {unknown!r} in {name!r}: known methods are {', '.join(PARTS)}; "
                             "combine them with '+', e.g. pear+sra")
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


def parse_tests(text) -> list[str]:
    """``"test_1hop,test_nq"`` (a list, or a Path) -> the names or paths, each one loadable; else an error."""
    if not (tests := _names([text] if isinstance(text, Path) else text)):
        raise ValueError("test is empty: name shipped test sets (test_1hop, test_heldout, test_nq) or JSONL paths")
    for t in tests:
        data.load_test_set(t)  # FileNotFoundError naming the shipped sets, ValueError naming line and field
    return tests


def weights_dir(model_name: str, root=None) -> Path:
    """``<root>/<model name, '/' as '--'>``; the default model's GGUF copy and Hub checkpoint share one."""
    name = models.DEFAULT_MODEL if models.default_model_source(model_name) else model_name
    return Path(root or WEIGHTS_DIR) / name.replace("/", "--")


def train_part(model_name: str, part: str, folder: Path, profile, device="cpu", seed=0, progress=True) -> None:
    """Train ``part`` of training seed ``seed`` into ``folder``: lora and opamp (+ LoRA) on the same ``training_mix``
    data, steps and seed (LoRA stays OpAmp's fair control); pear with notebook 06's recipe, sequences from ``seed``."""
    start, date = time.time(), time.strftime("%Y-%m-%d")
    if part == "pear":
        model, tokenizer = models.load_model(model_name, device=device)
        scores = pear.head_scores(model, pear.proxy_dataset(tokenizer, profile.pear_settings, seed=seed),
                                  variant="path", progress=progress)
        heads = pear.top_heads(scores, min(PEAR_K, scores.scores.numel()))
        scales, history = pear.train_coefficients(
            model, heads, sequences=profile.pear_train_sequences, n=profile.pear_train_n, seed=seed + 1,
            batch_size=profile.pear_train_batch, lr=profile.pear_lr, tokenizer=tokenizer, progress=progress)
        pear.save_coefficients(folder / "pear.json", model, scales.coefficients(), variant=scores.variant,
                               k=len(heads), seed=seed, profile=profile.name, seconds=time.time() - start,
                               settings=[list(s) for s in profile.pear_settings], loss=history["loss"], date=date)
        return
    steps, batch, k = profile.compare_train_steps, profile.opamp_train_batch, K if part == "opamp" else None
    model, _, history = adapt(model_name, training_mix(steps * batch, seed=seed), TrainConfig(steps, batch, seed=seed),
                              K=k, stride=profile.opamp_stride, lora_r=profile.opamp_lora_r, progress=progress,
                              lora_alpha=profile.opamp_lora_alpha, desc=f"train {part} (seed {seed})")
    model.half()  # stored in fp16 (the shipped weights live in git), loaded into the model's dtype: the rounding
    if part == "opamp":  # (relative 5e-4) is far below what changes a greedy answer here
        save_opamp(model, folder / part / "adapters")
    model.save_pretrained(folder / part / "lora")  # makes the folders
    record = dict(part=part, model=model_name, profile=profile.name, recipe="training_mix", nq_share=0.5, steps=steps,
                  batch=batch, seed=seed, K=k, stride=profile.opamp_stride, lora_r=profile.opamp_lora_r,
                  seconds=history["seconds"], loss=history["loss"], date=date, machine=platform.machine())
    (folder / part / "train.json").write_text(json.dumps(record, indent=1))


def ensure_weights(model_name: str, methods, root=None, profile=None, device="cpu", seed=0, progress=True) -> dict:
    """Train the parts ``methods`` need that ``weights_dir(...)/seed<seed>`` lacks; ``{part: training record}``."""
    folder, records = weights_dir(model_name, root) / f"seed{seed}", {}
    for part in sorted({p for m in parse_methods(methods) for p in m.split("+")} & TRAINED):
        path = folder / "pear.json" if part == "pear" else folder / part / "train.json"
        if not path.exists():
            print(f"{part} weights for {model_name}: none in {path.parent}; training them once, then saved there")
            train_part(model_name, part, folder, profile or get_profile(), device, seed, progress)
        records[part] = json.loads(path.read_text())
    return records


def build(method: str, model_name: str, root=None, device="cpu", sra_config=None, seed: int = 0):
    """A fresh ``(model, tokenizer)``, ``method`` on (seed ``seed``'s weights): OpAmp, LoRA merged, PEAR folded, SRA."""
    parts, folder = set(parse_methods([method])[0].split("+")), weights_dir(model_name, root) / f"seed{seed}"
    model, tokenizer = models.load_model(model_name, device=device)
    if "opamp" in parts:
        load_opamp(model, folder / "opamp" / "adapters")
    for part in {"opamp", "lora"} & parts:  # one of them at most
        model = load_lora(model, folder / part / "lora")
    if "pear" in parts:
        pear.fold(model, pear.load_coefficients(folder / "pear.json", model))
    if "sra" in parts:
        sra.apply_sra(model, sra_config or default_sra_config(tokenizer))
    return model.eval(), tokenizer


def load_lora(model, path: Path):
    """LoRA weights saved by PEFT in ``path``, checked to belong to ``model``, merged into it."""
    from peft import PeftConfig, PeftModel
    if saved := PeftConfig.from_pretrained(str(path)).base_model_name_or_path:
        models.check_same_model(saved, model, f"LoRA weights in {path}")
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


def default_sra_config(tokenizer, **factors) -> sra.SRAConfig:
    """SRA's begin/tail read off training prompts of every kind compare meets, gain ``SRA_GAIN``."""
    examples = [e for r in (0.0, 0.5, 0.8, 0.9) for family in ("default", "varied")
                for e in data.generate(8, noise_ratio=r, split="train", family=family, seed=7)]
    examples += data.nq_examples("train", 32, noise_ratios=(0.0,), seed=7)
    return sra.config_for_prompts(tokenizer, examples, **{"gain": SRA_GAIN, **factors})


def compare(model_name: str = "smollm2-135m", methods=DEFAULT_METHODS, tests="test_1hop", per_cell: int | None = None,
            root=None, profile=None, device: str | None = None, seeds=None, progress: bool = True) -> dict:
    """Every method on the same questions of every test set, trained ones once per training seed: ``{"meta", "tests":
    {test: {"n", "methods": {name: {"runs", "mean", "sd"}}}}, "cost": {name: ...}}``. A run (``seed`` None untrained)
    holds accuracy_grid rows (overall, by noise, by position when noisy), gold_ratio, paired (vs base), records."""
    names, tests, profile = parse_methods(methods), parse_tests(tests), profile or get_profile()
    device, per_cell = device or ("cuda" if torch.cuda.is_available() else "cpu"), per_cell or profile.compare_per_cell
    seeds = list(profile.compare_seeds if seeds is None else seeds)
    sets = {t: evaluate.select_per_cell(data.load_test_set(t), per_cell) for t in tests}
    training = {seed: ensure_weights(model_name, names, root, profile, device, seed, progress)
                for seed in (seeds if any(set(n.split("+")) & TRAINED for n in names) else [])}
    base, tokenizer = models.load_model(model_name, device=device)
    prompt = max((data.build_prompt(tokenizer, e).input_ids for e in sets[tests[0]]), key=len)[None].to(device)
    sra_config, runs, costs, start = default_sra_config(tokenizer), {t: {} for t in tests}, {}, time.time()
    for name in names:
        trained = set(name.split("+")) & TRAINED
        for seed in (seeds if trained else [None]):
            model = base if name == "base" else build(name, model_name, root, device, sra_config, seed or 0)[0]
            for t, examples in sets.items():
                records = evaluate.evaluate(model, tokenizer, examples, batch_size=profile.batch_size,
                                            max_new_tokens=profile.max_new_tokens, progress=progress,
                                            desc=f"{name if seed is None else f'{name} seed {seed}'} on {Path(t).stem}")
                noisy = [r for r in records if r.get("noise_ratio") not in (0, None, evaluate.UNKNOWN)]
                runs[t].setdefault(name, []).append(dict(
                    seed=seed, overall=evaluate.accuracy_grid(records, by=())[0],
                    by_noise=evaluate.accuracy_grid(records, by=("noise_ratio",)),
                    by_position=evaluate.accuracy_grid(noisy or records, by=("gold_position",)),
                    gold_ratio=evaluate.gold_attention_ratio(records), records=records))
            if name not in costs:  # timed warm, base and method side by side
                timing = cost.latency_ratio(base, model, prompt, repeats=profile.compare_repeats, warmup=1)
                base_mb, mb = (cost.peak_memory_mb(lambda m=m: m(prompt), device) for m in (base, model))
                costs[name] = dict(prefill=timing, memory=dict(mb=mb, base_mb=base_mb,
                                                               ratio=mb / base_mb if mb and base_mb else None))
            costs[name].setdefault("training", {})[seed] = {p: training[seed][p].get("seconds") for p in trained}
            del model
    results = {}
    for t, by in runs.items():
        for run in (r for rs in by.values() for r in rs if "base" in by):  # question by question against base
            run["paired"] = evaluate.paired(by["base"][0]["records"], run["records"])
        acc = {n: torch.tensor([r["overall"]["accuracy"] for r in rs], dtype=torch.float64) for n, rs in by.items()}
        results[t] = dict(n=len(sets[t]), methods={n: dict(runs=rs, mean=float(acc[n].mean()), sd=float(
            acc[n].std()) if len(rs) > 1 else 0.0) for n, rs in by.items()})
    return dict(meta=dict(
        command="compare", model=model_name, methods=names, tests=tests, per_cell=per_cell, seeds=seeds,
        profile=profile.name, device=device, prompt_tokens=int(prompt.shape[1]), sra=asdict(sra_config),
        seconds=time.time() - start, date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__,
        gpu=torch.cuda.get_device_name() if device == "cuda" else None), tests=results, cost=costs)


def _summary(m: dict) -> str:  # one run's Wilson interval, or mean +- sd and each seed's accuracy
    if len(m["runs"]) == 1:
        return evaluate.percent(m["runs"][0]["overall"]).strip()
    each = "/".join(f"{100 * r['overall']['accuracy']:.1f}" for r in m["runs"])
    return f"{100 * m['mean']:.1f}% +-{100 * m['sd']:.1f} ({each})"


def _cell(m: dict, grid: str, key: str, value) -> str:  # cell key == value of each run's grid: interval or mean
    rows = [r for run in m["runs"] for r in run[grid] if r[key] == value]
    return "" if not rows else evaluate.percent(rows[0]) if len(rows) == 1 else \
        f"{100 * sum(r['accuracy'] for r in rows) / len(rows):5.1f}% (mean)"


def _table(title: str, head: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:  # centred columns
    cols = [[f"{c:^{max(map(len, col))}}" for c in col] for col in zip(head, *(cells for _, cells in rows))]
    lines = [" | ".join([f"{name:<11}", *cells]) for name, cells in zip(["method"] + [n for n, _ in rows], zip(*cols))]
    return ["", title, lines[0], "-" * len(lines[0]), *lines[1:]]


def format_table(result: dict) -> str:
    """Every method on every test set; per test set by noise and position, against base, gold attention; cost."""
    meta, tests, names, seeds = result["meta"], result["tests"], result["meta"]["methods"], result["meta"]["seeds"]
    seeds = (f"{len(seeds)} training seeds" if seeds[1:] else "one training seed") + f" ({', '.join(map(str, seeds))})"
    lines = _table(f"Accuracy on every test set (lenient match). One run: 95% Wilson interval. Trained methods: mean "
                   f"+- sd over {seeds}, then each seed.", [f"{Path(t).stem} (n={tests[t]['n']})" for t in tests],
                   [(n, [_summary(tests[t]["methods"][n]) for t in tests]) for n in names])[1:]
    for t, block in tests.items():
        ratios = [r["noise_ratio"] for r in block["methods"][names[0]]["runs"][0]["by_noise"]]
        positions = [r["gold_position"] for r in block["methods"][names[0]]["runs"][0]["by_position"]]
        rows = []
        for name, m in block["methods"].items():
            vs = ", ".join(f"+{r['paired']['fixed']}/-{r['paired']['broken']} (p={r['paired']['p_value']:.2g})"
                           for r in m["runs"] if r.get("paired")) if name != "base" else ""
            gold = [r["gold_ratio"] for r in m["runs"] if r["gold_ratio"] is not None]
            rows.append((name, [_cell(m, "by_noise", "noise_ratio", r) for r in ratios]
                         + [_cell(m, "by_position", "gold_position", p) for p in positions]
                         + [vs, f"{sum(gold) / len(gold):.2f}x" if gold else "n/a"]))
        lines += _table(f"{Path(t).stem}: {block['n']} questions; by noise ratio, and by gold position on the noisy "
                        "ones; one run's interval, or the mean over seeds", [f"noise {r}" for r in ratios]
                        + [f"gold {p}" for p in positions] + ["vs base: fixed/broken per run", "gold/distr."], rows)
    rows = []
    for name, c in result["cost"].items():
        train = [sum(s or 0 for s in parts.values()) for parts in c["training"].values()]
        train = ", ".join("-" if not s else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" for s in train)
        memory = f"{c['memory']['ratio']:.2f}x" if c["memory"]["ratio"] is not None else "n/a"
        rows.append((name, [f"{c['prefill']['ratio']:.2f}x", memory, train if train.strip("-, ") else "-"]))
    lines += _table(f"Cost, side by side with base on the longest prompt of {Path(meta['tests'][0]).stem} "
                    f"({meta['prompt_tokens']} tokens)", ["prefill / base", "memory / base", "training per seed"], rows)
    return "\n".join(lines) + (
        f"\n\n{meta['model']}; {meta['per_cell']} questions per noise x position cell of each test set; profile "
        f"{meta['profile']}; {meta['device']} ({meta['machine']}, {meta['threads']} threads); {meta['date']}.\n"
        "gold/distr.: attention of the last prompt token per gold document over per distractor (mean over layers). "
        "fixed/broken: questions a run gets right that base missed, and the reverse; p: exact sign test.\n"
        "prefill, memory: ratios to base, timed side by side (median of paired ratios; base vs itself shows the "
        "noise). training: one-off, from the records of the weights used.")


def plot(result: dict, path=None):
    """Accuracy of every method on every test set (dots: seeds), then by noise ratio (mean over seeds)."""
    import matplotlib.pyplot as plt
    meta, tests, names = result["meta"], result["tests"], result["meta"]["methods"]
    fig, axes = plt.subplots(1, 1 + len(tests), figsize=(5.5 * (1 + len(tests)), 4.2), squeeze=False)
    ax, width = axes[0, 0], 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tests))]
        ax.bar(xs, [100 * tests[t]["methods"][name]["mean"] for t in tests], width, label=name, alpha=0.8)
        for x, runs in zip(xs, (tests[t]["methods"][name]["runs"] for t in tests)):
            ax.plot([x] * len(runs), [100 * r["overall"]["accuracy"] for r in runs], "k.", ms=4)
    ax.set(xticks=range(len(tests)), xticklabels=[Path(t).stem for t in tests], ylabel="accuracy (%)",
           title="every method on every test set (dots: seeds)")
    ax.legend(fontsize=8)
    for ax, (t, block) in zip(axes[0, 1:], tests.items()):
        for name in names:
            runs = block["methods"][name]["runs"]
            xs = [r["noise_ratio"] for r in runs[0]["by_noise"] if isinstance(r["noise_ratio"], (int, float))]
            ax.plot(xs, [100 * sum(r["accuracy"] for run in runs for r in run["by_noise"] if r["noise_ratio"] == x)
                         / len(runs) for x in xs], marker="o", label=name)
        ax.set(xlabel="noise ratio", ylabel="accuracy (%)", title=f"{Path(t).stem} (n={block['n']})")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{meta['model']}, profile {meta['profile']}, seeds {meta['seeds']}", y=1.02)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def add_parser(subparsers) -> None:
    """The ``compare`` subcommand."""
    p = subparsers.add_parser("compare", help="every method on the same questions, with accuracy and cost",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, what in [
            ("--model", "smollm2-135m", "model name or Hub id"),
            ("--methods", DEFAULT_METHODS, "comma-separated; '+' combines"),
            ("--test", DEFAULT_TESTS, "comma-separated shipped test set names or JSONL paths"),
            ("--seeds", None, "comma-separated training seeds of the trained methods (default: the profile's)"),
            ("--per-cell", None, "questions per noise x position cell of each test set (default: profile)"),
            ("--profile", None, "smoke|cpu|gpu (default: $MINIMAL_PROFILE, else by hardware)"),
            ("--weights", None, f"trained weights root (default: {WEIGHTS_DIR})"),
            ("--device", None, "cpu or cuda (default: cuda when available)"), ("--out", "results", "output folder")]:
        p.add_argument(flag, type=int if flag == "--per-cell" else str, default=default,
                       help=what + (" (default: %(default)s)" if default else ""))
    p.set_defaults(func=cli)


def cli(args) -> int:
    """Run ``compare`` from the command line: the tables printed, compare.json and compare.png written to --out."""
    try:  # the user's mistakes, before any model is loaded: a message, not a traceback
        parse_methods(args.methods)
        tests, profile = parse_tests(args.test), get_profile(args.profile)
        seeds = None if args.seeds is None else [int(x) if x.isdigit() else None for x in _names(args.seeds)]
        if seeds is not None and (not seeds or None in seeds):
            raise ValueError(f"--seeds {args.seeds!r}: give comma-separated integers >= 0, e.g. 0,1,2")
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"python -m minimal compare: error: {err}") from None
    result = compare(args.model, args.methods, tests, args.per_cell, args.weights, profile, args.device, seeds)
    print("\n" + format_table(result))
    path = evaluate.save_json(result, Path(args.out) / "compare.json")
    plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')} in {result['meta']['seconds']:.0f} s")
    return 0
