"""The judged criteria of the quality benchmark: each regime's grid in GPU-minutes, the packed
character-level grid's wall time (bench.sweep), and the mixture-of-experts checks — the grouped
path against the reference and the step against a dense model (bench.moe_check's newest JSON),
the busiest expert's share at the end of the micro runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .. import quality_grids as qg
from ..claims import MOE_BUSIEST_SHARE, MOE_STEP_RATIO, QUALITY_GRID_GPU_MIN
from ..criteria import at_most, criterion, holds
from ..markdown import table
from ..sources import load_json, newest
from .sweeps import char_grid_criterion

def quality_criteria(grids: list, sweeps: list, results: Path) -> list[dict]:
    out = [regime_minutes(grids, regime) for regime in qg.REGIME_ORDER]
    out.append(char_grid_criterion(sweeps))
    out += moe_checks(newest(results, "moe_check/moe_check_*.json"))
    out.append(busiest_expert(grids))
    return out


def chosen(grids: list, regime: str) -> list:
    """The grids a regime is judged on: per role, the newest complete grid, else the newest."""
    out = []
    for role in qg.ROLE_ORDER:
        mine = [g for g in grids if g["identity"]["regime"] == regime
                and g["identity"]["role"] == role]
        done = [g for g in mine if qg.complete(g)]
        if done or mine:
            out.append((done or mine)[0])
    return out


def regime_minutes(grids: list, regime: str) -> dict:
    judged = chosen(grids, regime)
    name = f"{regime} grid (every variant × 3 seeds), GPU-minutes on one device"
    if not judged:
        return criterion(name, None, f"≤ {QUALITY_GRID_GPU_MIN} min", None)
    parts = {pid: p for g in judged for pid, p in g["parts"].items()}
    minutes = sum(p.get("wall_s") or 0.0 for p in parts.values()) / 60
    done = sum(sum(r.get("status") == "ok" for r in g["runs"].values()) for g in judged)
    planned = sum(qg.planned(g) for g in judged)
    full = all(qg.complete(g) for g in judged)
    devices = sorted({(p.get("run_record") or {}).get("device", "?") for p in parts.values()})
    return criterion(name, f"{minutes:.1f} min in {len(parts)} part(s), {done}/{planned} runs",
                     f"≤ {QUALITY_GRID_GPU_MIN} min",
                     at_most(minutes, QUALITY_GRID_GPU_MIN) if full else None,
                     ("" if full else "incomplete: judged once every run is trained; ")
                     + ", ".join(devices))


def moe_checks(path: Optional[Path]) -> list[dict]:
    eq_name = "MoE grouped path equals the reference loop (bf16 tolerance, forward and backward)"
    step_name = "sqat-micro training step vs a dense model with its active parameters"
    if path is None:
        return [criterion(eq_name, None, "equal", None),
                criterion(step_name, None, f"≤ {MOE_STEP_RATIO:g}x", None)]
    res = load_json(path, made_by="bench.moe_check")
    eq = [res.get(k) or {} for k in ("equality", "idle_expert")]
    errs = [v["grouped_bf16_vs_fp32"] for part in eq for v in part.values()
            if isinstance(v, dict) and "grouped_bf16_vs_fp32" in v]
    eq_ok = all(part.get("ok") for part in eq) if all("ok" in p for p in eq) else None
    step = res.get("step_time") or {}
    ratio = step.get("ratio")
    trainer = (res.get("trainer") or {}).get("ratio")
    return [
        criterion(eq_name, f"largest relative error vs fp32 {max(errs):.2e}" if errs else None,
                  "within bf16 tolerance", eq_ok, f"`{path.name}`"),
        criterion(step_name, f"{ratio:.2f}x" if ratio else None, f"≤ {MOE_STEP_RATIO:g}x",
                  at_most(ratio, MOE_STEP_RATIO),
                  f"captured steps; in the trainer {trainer:.2f}x" if trainer else ""),
    ]


def busiest_expert(grids: list) -> dict:
    name = "busiest expert's token share at the end of training (micro runs), x uniform"
    shares = [(r["busiest_expert_share"], g["identity"]["role"], r["variant"], r["seed"])
              for g in chosen(grids, "micro") for r in g["runs"].values()
              if r.get("status") == "ok" and r.get("busiest_expert_share") is not None]
    if not shares:
        return criterion(name, None, f"≤ {MOE_BUSIEST_SHARE:g}x", None)
    worst = max(shares)
    return criterion(name, f"{worst[0]:.2f}x at most ({worst[1]} {worst[2]} s{worst[3]}; "
                           f"{len(shares)} runs)", f"≤ {MOE_BUSIEST_SHARE:g}x",
                     at_most(worst[0], MOE_BUSIEST_SHARE), "the busiest layer of each run")


def criteria_lines(crit: list[dict]) -> list[str]:
    rows = [[k["name"], k["measured"], k["target"], k["status"], k["note"]] for k in crit]
    verdicts = [f"{k['name']}: {holds(k)}" for k in crit if k["status"] in ("PASS", "MISS")]
    return ["### Criteria (printed by the benchmarks, never asserted)",
            table(["criterion", "measured", "target", "", "note"], rows)] + (
        ["Verdicts: " + "; ".join(verdicts) + "."] if verdicts else [])
