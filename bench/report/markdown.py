"""Markdown tables and the number formats every section shares: mean ± std over seeds, a change
in percent, parameter counts, microseconds, and how a variant is written in a table."""

from __future__ import annotations

import math

# How a variant is written in throughput tables and plots; the order is the tables' row order.
LABEL = {"mha": "MHA", "gqa": "GQA", "mqa": "MQA", "sqa": "SQA", "ssqa": "sSQA", "xsqa": "xSQA",
         "xsmqa": "xSMQA", "lsqa": "lSQA", "rsqa": "rSQA", "mha@128": "SWA(128)",
         "mha@4096": "SWA(4096)", "sqa@128": "SW-SQA(128)", "sqt": "SQT",
         "sqt2+sqa": "SQT×2 + SQA"}


def table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(table_lines(header, rows))


def fmt(ms: dict, digits: int = 2, scale: float = 1.0) -> str:
    """A {mean, std, n} over seeds as `mean ± std` (the std only where there are several)."""
    if ms is None or ms.get("mean") is None:
        return "-"
    s = f"{ms['mean'] * scale:.{digits}f}"
    return s + (f" ± {ms['std'] * scale:.{digits}f}" if ms["n"] > 1 else "")


def pct(new, old) -> str:
    return "-" if new is None or old is None else f"{100 * (new / old - 1):+.1f} %"


def params_str(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def ms3(x) -> str:
    """A latency in milliseconds with three decimals, '-' where it was not measured."""
    return "-" if x is None else f"{x:.3f}"


def us(ms) -> str:
    """Milliseconds shown as microseconds, '–' where there is no finite figure."""
    return f"{ms * 1e3:.1f}" if isinstance(ms, (int, float)) and math.isfinite(ms) else "–"


def label(variant: str) -> str:
    return LABEL.get(variant, variant)


def variant_order(variant: str):
    order = list(LABEL)
    return (order.index(variant) if variant in order else len(order), variant)
