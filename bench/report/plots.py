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


def quality_curves(runs: dict, path: Path, title: str) -> str:
    """Validation loss against training time, one line per variant (the mean over its seeds):
    time is steps x the run's step time measured alone, so packing and evaluation do not bend
    it. `runs`: variant -> its trained runs' records (each with `curves` and `ms_per_step`)."""
    plt = pyplot()
    if plt is None:
        return SKIPPED
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn, second = 0, []
    for i, (variant, rs) in enumerate(runs.items()):
        rs = [r for r in rs if r.get("ms_per_step") and r.get("curves")]
        if not rs:
            continue
        n = min(len(r["curves"]) for r in rs)
        xs = [statistics.fmean(r["curves"][j]["step"] * r["ms_per_step"] / 1e3 for r in rs)
              for j in range(n)]
        ys = [statistics.fmean(r["curves"][j]["val_loss"] for r in rs) for j in range(n)]
        ax.plot(xs, ys, marker="o", ms=2.5, color=f"C{i % 10}",
                ls="-" if i < 10 else "--", label=f"{label(variant)} ({len(rs)})")
        drawn += 1
        second.append(ys[min(1, n - 1)])
    if not drawn:
        plt.close(fig)
        return "skipped (no run with a step time and a learning curve)"
    ax.set(xlabel="training time alone (s): steps x isolated ms/step",
           ylabel="validation loss (nats / token)", title=title)
    ax.set_ylim(top=max(second))    # from the second evaluation down: the first squashes the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="variant (seeds)", title_fontsize=7)
    return _save(fig, plt, path)


def written(note: Optional[str]) -> bool:
    """Whether a figure function's answer is a written file (not a reason for skipping)."""
    return bool(note) and note.endswith(".png")


def _band(ax, xs, cells, style, color, label_text):
    ys = [c["mean"] for c in cells]
    ax.errorbar(xs, ys, yerr=[c["std"] or 0 for c in cells], fmt=style, color=color,
                capsize=3, ms=4, label=label_text)


def query_static_plot(summary: dict, path: Path) -> str:
    """Δ loss against the number k of static-table layers, the most and the least positional
    first, before and after the fine-tune (mean ± std over seeds)."""
    plt = pyplot()
    if plt is None:
        return SKIPPED
    rows = summary["static"]["rows"]
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for which, color in (("most", "C0"), ("least", "C3")):
        _band(ax, ks, [r[which]["delta_before"] for r in rows], "--o", color,
              f"{which} positional, as converted")
        _band(ax, ks, [r[which]["delta_after"] for r in rows], "-s", color,
              f"{which} positional, fine-tuned")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="static-table layers k", ylabel="Δ val loss vs MHA (nats / token)",
           title=f"{summary['preset']}: which layers tolerate a static query", xticks=ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, plt, path)


def query_uptrain_plot(summary: dict, path: Path) -> str:
    """Val loss against uptraining tokens (fraction of the base budget), one panel per target:
    each conversion method's curve from 'as converted' (0), the from-scratch runs at the base
    budget plus the same extra, and the MHA base."""
    plt = pyplot()
    if plt is None:
        return SKIPPED
    up = summary["uptrain"]
    targets = list(dict.fromkeys(r["target"] for r in up["rows"]))
    if not targets:
        return "skipped (no conversions)"
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for i, r in enumerate(x for x in up["rows"] if x["target"] == target):
            xs = [0.0] + [p["fraction"] for p in r["fractions"]]
            _band(ax, [100 * x for x in xs], [r["converted"]] + [p["loss"] for p in r["fractions"]],
                  "-o", f"C{i}", f"converted ({r['method']}) + uptraining")
        pts = [s for s in up["scratch"] if s["target"] == target]
        if pts:
            _band(ax, [100 * s["fraction"] for s in pts], [s["loss"] for s in pts], "*", "k",
                  "from scratch, base + extra budget")
        ax.axhline(up["mha"]["loss"]["mean"], color="grey", ls=":", label="MHA base")
        ax.set(xlabel="uptraining tokens (% of the base budget)", ylabel="val loss (nats/token)",
               title=f"MHA → {label(target)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, path)
