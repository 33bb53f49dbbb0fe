"""bench.scaling's arithmetic, from the runs' records alone (no torch): per (layout, world size)
the mean over seeds of tokens/s, ms/step and the validation loss, the scaling efficiency against
one process, and the loss's difference from one process."""

from __future__ import annotations

import statistics
from typing import Optional

GIB = 2 ** 30


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _std(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def efficiency(tokens_per_s: Optional[float], world_size: int,
               one: Optional[float]) -> Optional[float]:
    """tokens_per_s(W) / (W x tokens_per_s(1)): 1.0 is perfect scaling; None without both."""
    if not tokens_per_s or not one:
        return None
    return tokens_per_s / (world_size * one)


def _group(records: list[dict]) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault((r["layout"], r["world_size"]), []).append(r)
    return groups


def _failed_row(layout: str, w: int, runs: list[dict]) -> dict:
    bad = [r for r in runs if r["status"] != "ok"]
    return {"layout": layout, "world_size": w, "status": "failed", "runs": len(runs),
            "failed": len(bad), "error": bad[0].get("error", "")}


def dense_rows(records: list[dict]) -> list[dict]:
    """One row per (layout, world size), in the order the runs ran. A group with a failed run is
    a failed row (its figures would mix fewer seeds than the others)."""
    groups = _group(records)
    rows = []
    for (layout, w), runs in groups.items():
        if any(r["status"] != "ok" for r in runs):
            rows.append(_failed_row(layout, w, runs))
            continue
        res = [r["result"] for r in runs]
        losses = [x.get("final_val_loss") for x in res]
        rows.append({"layout": layout, "world_size": w, "status": "ok", "seeds": len(runs),
                     "parallel": res[0].get("parallel"),
                     "tokens_per_s": _mean([x.get("tokens_per_s") for x in res]),
                     "ms_per_step": _mean([x.get("ms_per_step") for x in res]),
                     "val_loss": _mean(losses), "val_loss_std": _std(losses),
                     "best_val_loss": _mean([x.get("best_val_loss") for x in res])})
    one = {r["layout"]: r for r in rows if r["world_size"] == 1 and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        base = one.get(r["layout"])
        r["efficiency"] = efficiency(r["tokens_per_s"], r["world_size"],
                                     base and base["tokens_per_s"])
        if base is None or r["val_loss"] is None or base["val_loss"] is None:
            r.update(val_loss_diff=None, seed_spread=None, within_seed_spread=None)
            continue
        diff = r["val_loss"] - base["val_loss"]
        spread = base["val_loss_std"]
        r.update(val_loss_diff=diff, val_loss_rel_diff=diff / base["val_loss"],
                 seed_spread=spread,
                 within_seed_spread=None if spread is None else abs(diff) <= 2 * spread)
    return rows


def fsdp_rows(records: list[dict]) -> list[dict]:
    """One row per world size: ms/step, tokens/s, peak memory per GPU (GiB, the largest over
    the ranks) and its ratio to one process's."""
    rows = []
    for (layout, w), runs in _group(records).items():
        if runs[0]["status"] != "ok":
            rows.append(_failed_row(layout, w, runs))
            continue
        res = runs[0]["result"]
        peak = res.get("peak_memory_bytes")
        rows.append({"layout": layout, "world_size": w, "status": "ok",
                     "parallel": res.get("parallel"), "ms_per_step": res.get("ms_per_step"),
                     "tokens_per_s": res.get("tokens_per_s"),
                     "seq_len": (res.get("train_config") or {}).get("seq_len"),
                     "batch_size": (res.get("train_config") or {}).get("batch_size"),
                     "params": res.get("params"),
                     "peak_memory_gib": None if peak is None else peak / GIB})
    one = next((r for r in rows if r["world_size"] == 1 and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] == "ok":
            base = one and one.get("peak_memory_gib")
            r["memory_vs_w1"] = (r["peak_memory_gib"] / base
                                 if base and r["peak_memory_gib"] is not None else None)
    return rows
