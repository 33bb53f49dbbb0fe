"""What `sqt probe` writes: the probe as JSON, a markdown table, and a layers x heads heatmap
(matplotlib is optional: without it the heatmap is skipped and the reason returned)."""

from __future__ import annotations

from pathlib import Path

from .utils import atomic_write_bytes, atomic_write_json

JSON_FILE, MARKDOWN_FILE, HEATMAP_FILE = "probe.json", "probe.md", "probe.png"
NO_MATPLOTLIB = "skipped: matplotlib is not installed (pip install 'sqt[plot]')"


def _shares(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _rotated(r: dict) -> str:
    """The rotated share (probes written before it was measured have none)."""
    v = r.get("q_share_rotated_layer")
    return "-" if v is None else f"{v:.3f}"


def probe_markdown(report: dict, *, title: str = "Query probe") -> str:
    """The probe as a markdown table, one row per layer, with the definitions under it."""
    lines = [f"# {title}", "",
             f"{report['windows']} windows of {report['seq_len']} tokens "
             f"({report['tokens']:,} tokens); loss of the unchanged model "
             f"{report['base_loss']:.4f} nats/token.", "",
             "| layer | spec | q share (layer) | q share per head | q share after RoPE "
             "(layer) | k share (layer) | Δ loss, queries → positional mean |",
             "|---|---|---|---|---|---|---|"]
    for r in report["layers"]:
        lines.append(f"| {r['layer']} | `{r['spec']}` | {r['q_share_layer']:.3f} | "
                     f"{_shares(r['q_share'])} | {_rotated(r)} | {r['k_share_layer']:.3f} | "
                     + ("-" if r["delta_loss"] is None else f"{r['delta_loss']:+.4f}") + " |")
    if any(r.get("delta_loss_heads") for r in report["layers"]):
        lines += ["", "Δ loss with one head's queries replaced:", "",
                  "| layer | per head |", "|---|---|"]
        lines += [f"| {r['layer']} | " + " ".join(f"{d:+.4f}" for d in r["delta_loss_heads"])
                  + " |" for r in report["layers"] if r.get("delta_loss_heads")]
    rho = report.get("share_delta_spearman")
    if rho is not None:
        lines += ["", f"Rank correlation over layers of q share and Δ loss: {rho:+.2f} "
                      "(negative: the more positional a layer's query, the less a static one "
                      "costs)."]
    lines += ["", "Definitions:", ""] + [f"- {k}: {v}" for k, v in report["definitions"].items()]
    return "\n".join(lines) + "\n"


def _grid(rows: list[list[float]]):
    width = max(len(r) for r in rows)
    return [r + [float("nan")] * (width - len(r)) for r in rows]


def probe_heatmap(report: dict, path) -> str:
    """Layers x heads: the query's positional share, the key's, and (when measured) each head's
    Δ loss. Returns the path written, or why nothing was."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return NO_MATPLOTLIB
    layers = report["layers"]
    panels = [("query: positional share", _grid([r["q_share"] for r in layers]), (0, 1),
               "viridis"),
              ("key: positional share", _grid([r["k_share"] for r in layers]), (0, 1), "viridis")]
    if any(r.get("q_share_rotated", r["q_share"]) != r["q_share"] for r in layers):   # RoPE
        panels.insert(1, ("query after RoPE: positional share",
                          _grid([r["q_share_rotated"] for r in layers]), (0, 1), "viridis"))
    if all(r.get("delta_loss_heads") for r in layers):
        grid = _grid([r["delta_loss_heads"] for r in layers])
        top = max(abs(v) for row in grid for v in row if v == v) or 1.0
        panels.append(("Δ loss, one head's queries → mean", grid, (-top, top), "coolwarm"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.5 * len(layers) + 2),
                             squeeze=False)
    for ax, (title, grid, (lo, hi), cmap) in zip(axes[0], panels):
        im = ax.imshow(grid, vmin=lo, vmax=hi, cmap=cmap, aspect="auto")
        ax.set(title=title, xlabel="head", ylabel="layer",
               yticks=range(len(layers)), yticklabels=[f"{r['layer']} {r['spec']}" for r in layers])
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_probe(report: dict, out_dir, *, title: str = "Query probe") -> dict:
    """probe.json, probe.md and probe.png in `out_dir`; returns {kind: path or reason}."""
    out = Path(out_dir)
    atomic_write_json(out / JSON_FILE, report)
    atomic_write_bytes(out / MARKDOWN_FILE, probe_markdown(report, title=title).encode())
    return {"json": str(out / JSON_FILE), "markdown": str(out / MARKDOWN_FILE),
            "heatmap": probe_heatmap(report, out / HEATMAP_FILE)}


def probe_run(run, *, data=None, tokens: int = 32768, seq_len=None, batch_size: int = 16,
              per_head: bool = False, out=None, device="cpu") -> tuple[dict, dict]:
    """`sqt probe RUN`: probe the model of a checkpoint directory on validation windows of its
    own data (or `data`), and write probe.json, probe.md and probe.png into `out` (default: the
    run directory). Returns (report, {kind: path or reason})."""
    from .checkpoint import load_model
    from .probe import query_probe
    from .rundata import check_count, default_seq_len, open_data, token_windows
    check_count("seq_len", seq_len, 2, optional=True)
    check_count("eval_batch_size", batch_size, 1)
    if out is not None and Path(out).is_file():
        raise ValueError(f"out={str(out)!r} is a file: expected a directory for the probe's files")
    model, meta = load_model(run, device)
    spec, dataset = open_data(run, meta, model, data)
    seq_len = seq_len or default_seq_len(model, meta)
    windows = token_windows(dataset.val, tokens, seq_len)
    report = query_probe(model, windows, batch_size=batch_size, per_head=per_head)
    report.update(run=str(run), data=spec, layers_spec=model.config.to_dict()["layers"])
    return report, write_probe(report, out or run, title=f"Query probe of {run}")
