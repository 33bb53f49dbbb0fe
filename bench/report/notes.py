"""Run notes: caveats about how particular runs were made that their JSON cannot record
(bench/results/notes.json), keyed by run folder or result file relative to the results folder."""

from __future__ import annotations

import json
from pathlib import Path


def run_notes(results: Path) -> dict:
    path = Path(results) / "notes.json"
    return json.loads(path.read_text())["notes"] if path.is_file() else {}


def note_for(notes: dict, results: Path, summary_path: Path) -> list[str]:
    """The note on the run folder that holds `summary_path`, as a paragraph (or nothing)."""
    try:
        key = summary_path.parent.resolve().relative_to(Path(results).resolve()).as_posix()
    except ValueError:
        return []
    return [f"**Note on this run:** {notes[key]}"] if key in notes else []


def with_file_notes(text: str, notes: dict) -> str:
    """A section followed by the notes on the result files it names and has not placed itself."""
    return "\n\n".join([text.strip()] + [
        f"**Note on `{key}`:** {note}" for key, note in notes.items()
        if key.endswith(".json") and key in text and note not in text])
