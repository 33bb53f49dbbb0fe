"""Every figure the report draws, and the one guard around matplotlib, which is optional: without
it a figure is skipped and that is said, never an error."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from .claims import PAPER_TABLE3
from .markdown import label

SKIPPED = "skipped (matplotlib not installed; pip install 'sqt[plot]')"


def pyplot():
    """matplotlib.pyplot on the file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, path: Path) -> str:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def throughput_plot(result: dict, path: Path) -> str:
    """Log-log seconds per step against length for the paper model, ours beside the paper's
    claims. Returns the path written, or why nothing was."""
    plt = pyplot()
    if plt is None:
        return SKIPPED
    cases = [c for c in result["cases"] if c["part"] == "model" and c["model"] == "paper"
             and c["status"] == "ok"]
    modes = sorted({c["mode"] for c in cases}, key=lambda m: (m != "forward", m))
    if not modes:
        return "skipped (no paper-model results)"
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    variants = list(dict.fromkeys(c["variant"] for c in cases))
    colors = {v: plt.cm.tab20(i % 20) for i, v in enumerate(variants)}
    for ax, mode in zip(axes[0], modes):
        for fam, style in (("sdpa", "-"), ("flex", "--"), ("flash", "-.")):
            for v in variants:
                pts = sorted((c["seq"], c["seconds"]) for c in cases
                             if c["mode"] == mode and c["family"] == fam and c["variant"] == v)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[v],
                            label=f"{label(v)} ({fam})")
        if mode == "forward":
            for i, v in enumerate(PAPER_TABLE3["columns"]):
                pts = sorted((s, row[i]) for s, row in PAPER_TABLE3["rows"].items())
                ax.plot(*zip(*pts), ":", marker="x", color=colors.get(v, "grey"), alpha=0.5,
                        label=f"{label(v)} (paper's claim)")
        ax.set(xscale="log", yscale="log", xlabel="sequence length (batch shrinks: paper's)",
               ylabel="seconds per step", title=f"paper model, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, plt, path)


def learning_curves(runs: list[dict], path: Path) -> str:
    """Validation and training loss against step, one panel per size, the mean over seeds.
    `runs` are a sweep's per-run JSON (each with its `curves`)."""
    plt = pyplot()
    if plt is None:
        return SKIPPED
    sizes = list(dict.fromkeys(r["size"] for r in runs))
    if not sizes:
        return "skipped (no runs)"
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in runs
                                                  if r["size"] == size)):
            rs = [r for r in runs if r["size"] == size and r["variant"] == variant]
            steps = [c["step"] for c in rs[0]["curves"]]
            for key, style in (("val_loss", "-"), ("train_loss", ":")):
                ys = [statistics.fmean(r["curves"][j][key] for r in rs) for j in range(len(steps))]
                ax.plot(steps, ys, style, color=f"C{i}",
                        label=f"{variant} {'val' if key == 'val_loss' else 'train'}")
        ax.set_title(size)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / char)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def written(note: Optional[str]) -> bool:
    """Whether a figure function's answer is a written file (not a reason for skipping)."""
    return bool(note) and note.endswith(".png")
