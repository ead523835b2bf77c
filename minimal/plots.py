"""The few plot helpers the notebooks and commands share (matplotlib, nothing fancy)."""

from __future__ import annotations

import matplotlib.pyplot as plt

from .sra import SRAConfig, window_table


def plot_accuracy(grid, x: str, group: str | None = None, ax=None, label: str | None = None, marker="o"):
    """Accuracy vs ``x`` with Wilson 95% intervals as error bars; one line per ``group`` value."""
    ax = ax or plt.gca()
    groups = list(dict.fromkeys(r[group] for r in grid)) if group else [None]
    for g in groups:
        rows = [r for r in grid if group is None or r[group] == g]
        # max(0, .): the Wilson bounds can miss 0% or 100% by a rounding error
        err = [[max(0.0, 100 * (r["accuracy"] - r["low"])) for r in rows],
               [max(0.0, 100 * (r["high"] - r["accuracy"])) for r in rows]]
        name = label if group is None else f"{label + ' ' if label else ''}{group}={g}"
        ax.errorbar([r[x] for r in rows], [100 * r["accuracy"] for r in rows], yerr=err, marker=marker, capsize=3,
                    label=name)
    ax.set(xlabel=x.replace("_", " "), ylabel="accuracy (%), 95% Wilson interval", ylim=(-2, 102))
    ax.grid(alpha=0.3)
    if group or label:
        ax.legend(fontsize=8)
    return ax


def plot_layer_attention(profile: dict, ax=None, label: str = ""):
    """Attention mass per document on gold vs distractor documents, layer by layer."""
    ax = ax or plt.gca()
    layers = range(len(profile["gold_per_doc"]))
    ax.plot(layers, profile["gold_per_doc"], marker=".", label=f"{label} gold document".strip())
    if profile.get("distractors_per_doc"):
        ax.plot(layers, profile["distractors_per_doc"], marker=".", ls="--",
                label=f"{label} one distractor (mean)".strip())
    ax.set(xlabel="layer", ylabel="attention mass of the last token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_document_heatmap(mass, gold, ax=None, title: str = "", label: str = "attention mass"):
    """Heat map of attention mass, layers (rows) x documents (columns); gold columns marked."""
    ax = ax or plt.gca()
    im = ax.imshow(mass, aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(mass.shape[1]), [f"[{i + 1}]{'*' if i in gold else ''}" for i in range(mass.shape[1])],
                  fontsize=7)
    ax.set(xlabel="document (* = gold)", ylabel="layer", title=title)
    plt.colorbar(im, ax=ax, label=label)
    return ax


def plot_windows(n: int, num_layers: int, config: SRAConfig | None = None, ax=None, title: str = "", spans=None,
                 gold=()):
    """SRA per layer on n tokens: the window W that receives the removed mass (bars), the rows (thin lines);
    ``spans`` (e.g. a prompt's documents) shaded behind, those indexed by ``gold`` green."""
    ax, config = ax or plt.gca(), config or SRAConfig()
    for i, (s0, s1) in enumerate(spans or []):
        ax.axvspan(s0, s1, color="tab:green" if i in gold else "0.85", alpha=0.35 if i in gold else 0.5, lw=0)
    labelled = set()
    for row in window_table(n, num_layers, config):
        for name, color, dy in (("inner", "tab:blue", -0.18), ("outer", "tab:orange", 0.18)):
            if name in row:
                (w0, w1), (r0, r1), y = row[name]["window"], row[name]["rows"], row["layer"] + dy
                ax.barh(y, w1 - w0, left=w0, height=0.32, color=color,
                        label=None if name in labelled else f"{name} pass: window W (bar), rows (line)")
                ax.plot([r0, r1], [y, y], color=color, lw=0.8, alpha=0.6)
                labelled.add(name)
    ax.axvline(config.begin, color="gray", ls=":", lw=1)
    ax.axvline(n - config.tail, color="gray", ls="--", lw=1)
    ax.set(xlim=(0, n), ylabel="layer", title=title or "SRA windows per layer (bars: W; thin lines: rows re-weighted)",
           xlabel=f"token position (n = {n}; dotted: b = {config.begin}, dashed: n - t = {n - config.tail})")
    if labelled:
        ax.legend(fontsize=8, loc="lower right")
    return ax
