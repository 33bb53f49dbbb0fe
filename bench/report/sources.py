"""Finding and loading the result files under bench/results: the newest file of a kind, sweep
summaries, and errors that name the file and what to run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def newest(results: Path, pattern: str) -> Optional[Path]:
    """The newest file matching `pattern` under `results`: run ids and file names start with a
    UTC timestamp, so the newest sorts last."""
    found = sorted(Path(results).glob(pattern))
    return found[-1] if found else None


def load_json(path: Path, *, made_by: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"result file {str(path)!r} does not exist: run {made_by} first, "
                                "or name an existing one") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"result file {str(path)!r} is not valid JSON ({e})") from None


def summary_path(path) -> Path:
    """A run folder or its summary.json -> the summary.json."""
    path = Path(path)
    return path / "summary.json" if path.is_dir() else path


def load_summary(path) -> dict:
    return load_json(summary_path(path), made_by="bench.sweep or bench.layer_sweep")


def sweep_summaries(results: Path, chosen=None) -> tuple[list, list]:
    """(sweeps, probes) as (summary, path) pairs: the folders named, or every sweep folder;
    main sweeps ordered by seeds, then breadth; probe folders (tag `probe-...`) apart."""
    paths = ([summary_path(p) for p in chosen] if chosen
             else sorted((Path(results) / "sweep").glob("*/summary.json")))
    loaded = [(load_summary(p), p) for p in paths]
    probes = [(s, p) for s, p in loaded if "-probe-" in p.parent.name]
    sweeps = [(s, p) for s, p in loaded if "-probe-" not in p.parent.name]
    sweeps.sort(key=lambda sp: (-sp[0]["seeds"], -len(sp[0]["variants"]), sp[1].parent.name))
    return sweeps, probes
