"""python -m minimal {compare,evaluate,train-opamp} --help. compare: every method (minimal/compare.py); evaluate:
one model's accuracy and attention on gold, to <out>/evaluate.json and .png; train-opamp: minimal/train.py."""

import argparse
import platform
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from . import compare, data, evaluate, models, plots, profiles, train


def cmd_evaluate(args) -> int:
    profile, start = profiles.get_profile(args.profile), time.time()
    per_cell = args.per_cell or profile.examples_per_cell
    model, tokenizer = models.load_model(args.model, device=args.device)
    records = evaluate.evaluate(model, tokenizer, evaluate.select_per_cell(data.load_test_set(args.test), per_cell),
                                batch_size=profile.batch_size, max_new_tokens=profile.max_new_tokens)
    grids = {m: evaluate.accuracy_grid(records, metric=m) for m in ("lenient", "strict")}
    strict, layers = evaluate.accuracy_grid(records, by=(), metric="strict")[0], evaluate.attention_by_layer(records)
    print("\n" + evaluate.format_grid(grids["lenient"], title="Accuracy (lenient match), 95% Wilson interval, (n)"))
    print(f"Strict exact match overall: {strict['correct']}/{strict['n']} ({evaluate.percent(strict).strip()}); the"
          f" model answers in sentences, so the lenient rule is the one to read.\n\n{len(records)} examples in "
          f"{time.time() - start:.0f} s on {platform.processor() or platform.machine()}, torch {torch.__version__}")
    meta = dict(command="evaluate", model=args.model, test=args.test, profile=profile.name, per_cell=per_cell,
                device=args.device, seconds=time.time() - start, date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__, machine=platform.machine())
    path = evaluate.save_json(dict(meta=meta, grids=grids, attention_by_layer=layers, records=records),
                              Path(args.out) / "evaluate.json")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plots.plot_accuracy(grids["lenient"], "noise_ratio", "gold_position", axes[0]).set_title(f"{args.model}: accuracy")
    plots.plot_layer_attention(layers, axes[1]).set_title("attention of the last prompt token, per document")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=120)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minimal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="accuracy of a model on a noisy-context test set")
    for flag, default, what in [
            ("--model", "smollm2-135m", "model name or Hub id"), ("--test", "test_1hop", "test set name or JSONL path"),
            ("--profile", None, "smoke|cpu|gpu (default: $MINIMAL_PROFILE, else by hardware)"),
            ("--per-cell", None, "examples per cell (default: profile)"), ("--out", "results", "output folder"),
            ("--device", "cuda" if torch.cuda.is_available() else "cpu", "cpu or cuda")]:
        ev.add_argument(flag, type=int if flag == "--per-cell" else str, default=default,
                        help=what + (" (default: %(default)s)" if default else ""))
    ev.set_defaults(func=cmd_evaluate)
    compare.add_parser(sub)
    train.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
