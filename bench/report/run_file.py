"""One result file -> what a reader sees of that run: its section (and its figure beside it).
Runners call this in a separate process after a run (`python -m bench.report --run FILE`), so
they print or write their report without importing it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .plots import learning_curves, throughput_plot
from .sections import decode, layer_sweep, query, sweeps
from .sections.quality import quality_run_markdown
from .sections.throughput_analysis import analyse, criteria_lines
from .sections.throughput_run import render_markdown as throughput_markdown
from .sources import load_json, summary_path


def kind_of(path: Path, data: dict) -> str:
    """throughput, decode, sweep, layer_sweep, query or quality, from the file's name or its
    `kind` field."""
    for kind in ("throughput", "decode"):
        if path.name.startswith(kind + "_"):
            return kind
    if path.name == "summary.json" and data.get("kind") in ("sweep", "layer_sweep", "query"):
        return data["kind"]
    if path.name == "grid.json" and data.get("kind") == "quality_grid":
        return "quality"
    raise ValueError(f"--run {str(path)!r}: expected a throughput_*.json, a decode_*.json, a "
                     "sweep, layer-sweep or query run folder (or its summary.json), or a quality "
                     "grid folder (or its grid.json)")


def render_run(path, *, doc_dir: Optional[Path] = None, plot: bool = True) -> tuple[str, list]:
    """(markdown, console lines) for one run; links are relative to doc_dir where given. `plot`
    draws the run's figure beside its JSON (throughput: <name>.png; sweep: curves.png). Console
    lines say what else a reader should see at once: the criteria and where the figure went."""
    path = Path(path)
    path = path / "grid.json" if (path / "grid.json").is_file() else summary_path(path)
    data = load_json(path, made_by="the benchmark that writes it")
    kind = kind_of(path, data)
    console = []
    if kind == "quality":
        return quality_run_markdown(path.parent, plot=plot)
    if kind == "throughput":
        if plot:
            data["plot"] = throughput_plot(data, path.with_suffix(".png"))
            console.append(f"plot: {data['plot']}")
        if "criteria" not in data:        # older runs stored theirs; their .md was made from it
            data = {**data, **analyse(data)}
        return throughput_markdown(data), criteria_lines(data["criteria"]) + console
    if kind == "decode":
        eager = decode.eager_loop_speedup(data)
        if eager is not None:
            console.append(f"speedup vs our eager loop (small b1): {eager:.2f}x")
        return decode.render_markdown(data, str(path)), console
    if kind == "layer_sweep":
        return layer_sweep.layer_section(data, path), console
    if kind == "query":   # its figures beside its summary.json
        return query.query_section(data, path, path.parent if plot else None), console
    if plot:
        runs = [load_json(path.parent / r, made_by="bench.sweep") for r in data["runs"]]
        console.append(f"plot: {learning_curves(runs, path.parent / sweeps.CURVES)}")
    return sweeps.sweep_section(data, path, doc_dir), console
