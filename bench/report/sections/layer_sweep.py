"""The layer sweep (bench.layer_sweep's summary.json): perplexity and latency against the number
N of static-query layers, and the largest N within the tolerance."""

from __future__ import annotations

from pathlib import Path

from ..markdown import fmt, ms3, pct, table
from ..notes import note_for
from ..sources import load_summary, newest, summary_path
from .sweeps import failed_runs, provenance, speed_note


def section(ctx) -> str | None:
    path = ctx.layer_sweep_folder or newest(ctx.results, "layer_sweep/*/summary.json")
    if path is None:
        return None
    path = summary_path(path)
    return "\n\n".join([layer_section(load_summary(path), path)]
                       + note_for(ctx.notes, ctx.results, path))


def layer_section(summary: dict, path: Path) -> str:
    if summary.get("ppl_limit") is None:
        verdict = "The N = 0 baseline failed, so no N is compared against it."
    else:
        verdict = (f"Largest N whose best-val ppl stays within {100 * summary['tolerance']:g} % "
                   f"of N = 0 (≤ {summary['ppl_limit']:.3f}): "
                   f"**N = {summary['largest_n_within']}**.")
    failed = failed_runs(summary)
    return "\n\n".join([
        "## Layer sweep", provenance(summary, path),
        f"Size {summary['size']}: the first N of {summary['n_layers']} layers `{summary['sqt']}`, "
        f"the rest `{summary['rest']}`; {summary['steps']} steps, {summary['seeds']} seed(s).",
        *([failed] if failed else []),
        rows_table(summary["rows"]), verdict,
        speed_note(summary["rows"], summary["run_record"])])


def rows_table(rows: list[dict]) -> str:
    if not rows:
        return "No run finished."
    base = rows[0]
    out = [[str(r["n_sqt"]), str(r["params"]), fmt(r["best_val_ppl"], 3),
            pct(r["best_val_ppl"]["mean"], base["best_val_ppl"]["mean"]),
            fmt(r["final_val_ppl"], 3), fmt(r["best_val_acc"], 2, 100), ms3(r["forward_ms"]),
            pct(r["forward_ms"], base["forward_ms"]), ms3(r["decode_ms_per_token"]),
            pct(r["decode_ms_per_token"], base["decode_ms_per_token"])] for r in rows]
    return table(["N (SQT layers)", "params", "ppl (best)", "Δ ppl", "ppl (final)",
                  "val accuracy (%)", "forward ms", "Δ forward", "decode ms / token",
                  "Δ decode"], out)
