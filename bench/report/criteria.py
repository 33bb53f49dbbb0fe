"""A criterion: what was measured, the target it is held against, and the verdict, which follows
from the numbers alone. Every section that judges builds its criteria here; targets come from
claims.py. The dict shape is the one older throughput JSON stored."""

from __future__ import annotations

from typing import Optional

# PASS / MISS: a target judged a measurement. INFO: measured, no target to judge it against.
# N/A: this run did not measure it.
WORD = {"PASS": "meets", "MISS": "misses"}
HOLDS = {"PASS": "holds", "MISS": "does not hold", "N/A": "was not measured", "INFO": "reported"}


def criterion(name: str, measured: Optional[str], target: str, passed: Optional[bool],
              note: str = "") -> dict:
    status = ("N/A" if not measured else "INFO") if passed is None else (
        "PASS" if passed else "MISS")
    return {"name": name, "measured": measured or "not measured", "target": target,
            "status": status, "note": note or ""}


def at_most(value: Optional[float], limit: float) -> Optional[bool]:
    return None if value is None else value <= limit


def at_least(value: Optional[float], floor: float) -> Optional[bool]:
    return None if value is None else value >= floor


def word(k: dict) -> str:
    """The verdict in prose: meets / misses."""
    return WORD[k["status"]]


def holds(k: dict) -> str:
    """The verdict as a reading states it: holds / does not hold / reported / was not measured."""
    return HOLDS[k["status"]]
