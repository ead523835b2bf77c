"""Command line:

    python -m minimal compare --model NAME --methods base,lora,opamp,sra,pear --test FILE   (minimal/compare.py)
    python -m minimal evaluate [--model NAME] [--test FILE] [--out DIR]
    python -m minimal train-opamp --model NAME --K 10 --steps N --out DIR                   (minimal/train.py)

``evaluate`` scores a model on a noisy-context test set and prints accuracy by noise
ratio and gold position (Wilson 95% intervals) with the attention mass on the gold
document; it writes ``<out>/evaluate.json`` and ``<out>/evaluate.png``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch


def cmd_evaluate(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import data, evaluate, plots
    from .models import load_model
    from .profiles import get_profile

    profile = get_profile(args.profile)
    examples = data.load_test_set(args.test)
    per_cell = args.per_cell or profile.examples_per_cell
    examples = evaluate.select_per_cell(examples, per_cell)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"profile={profile.name}  model={args.model}  test={args.test}  "
          f"{len(examples)} examples ({per_cell} per cell)  device={device}")

    start = time.time()
    model, tokenizer = load_model(args.model, device=device)
    records = evaluate.evaluate(model, tokenizer, examples, batch_size=profile.batch_size,
                                max_new_tokens=profile.max_new_tokens)
    seconds = time.time() - start

    grids = {m: evaluate.accuracy_grid(records, metric=m) for m in ("lenient", "strict")}
    layers = evaluate.attention_by_layer(records)
    print()
    print(evaluate.format_grid(grids["lenient"], title="Accuracy (lenient match), 95% Wilson interval, (n)"))
    strict = evaluate.accuracy_grid(records, by=(), metric="strict")[0]
    print(f"Strict exact match overall: {strict['correct']}/{strict['n']} "
          f"({100 * strict['accuracy']:.1f}%, 95% CI {100 * strict['low']:.0f}-{100 * strict['high']:.0f}%): "
          "the model answers in sentences, so the lenient rule is the one to read.")
    print(f"\n{len(records)} examples in {seconds:.0f} s on {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}")

    out = Path(args.out)
    meta = dict(command="evaluate", model=args.model, test=args.test, profile=profile.name,
                per_cell=per_cell, device=device, seconds=seconds, date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__, machine=platform.machine())
    path = evaluate.save_json(dict(meta=meta, grids=grids, attention_by_layer=layers, records=records),
                              out / "evaluate.json")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plots.plot_accuracy(grids["lenient"], x="noise_ratio", group="gold_position", ax=axes[0])
    axes[0].set_title(f"{args.model}: accuracy vs noise ratio")
    plots.plot_layer_attention(layers, ax=axes[1])
    axes[1].set_title("attention of the last prompt token, per document")
    fig.tight_layout()
    fig.savefig(out / "evaluate.png", dpi=120)
    print(f"wrote {path} and {out / 'evaluate.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="accuracy of a model on a noisy-context test set")
    ev.add_argument("--model", default="smollm2-135m", help="model name or Hub id (default: %(default)s)")
    ev.add_argument("--test", default="test_1hop", help="shipped test set name or JSONL path (default: %(default)s)")
    ev.add_argument("--profile", default=None, help="smoke|cpu|gpu (default: $MINIMAL_PROFILE, else by hardware)")
    ev.add_argument("--per-cell", type=int, default=None, help="examples per (noise ratio, position) cell")
    ev.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ev.add_argument("--out", default="results", help="output folder (default: %(default)s)")
    ev.set_defaults(func=cmd_evaluate)
    from .compare import add_parser as add_compare
    from .train import add_parser as add_train_opamp

    add_compare(sub)
    add_train_opamp(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
