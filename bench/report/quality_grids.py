"""The quality benchmark's results as the report reads them: the run and part records under
<results>/quality, grouped into grids by identity (the parts of a grid merged, wherever their
folders are), and per grid the numbers its section shows: mean ± std over seeds per variant,
Δ against a baseline with the seed spread, the GPU time of its parts, and where each SQA variant
sits in the GQA–MQA band."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from .sources import load_json

REGIME_ORDER = ("dense", "micro")
ROLE_ORDER = ("primary", "secondary")
# The SQA family as the band question asks it (the hybrid is SQA with static queries in front).
SQA_FAMILY = ("sqa", "ssqa", "xsqa", "xsmqa", "lsqa", "sqt2+sqa")
STATS = ("best_val_loss", "final_val_loss", "best_val_ppl", "final_val_ppl", "best_val_acc",
         "final_val_acc", "ms_per_step", "tokens_per_s")


def mean_std(values) -> dict:
    """{mean, std, n} of the values that exist (std 0 for one value; None for none)."""
    xs = [v for v in values if v is not None]
    return {"mean": statistics.fmean(xs) if xs else None,
            "std": (statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else None, "n": len(xs)}


def _newer(a: dict, b: dict) -> bool:
    """Whether record a should stand for its (variant, seed) rather than b: a trained run over a
    failed one, else the later one."""
    rank = {"ok": 1}
    ka = (rank.get(a.get("status"), 0), (a.get("run_record") or {}).get("date") or "")
    kb = (rank.get(b.get("status"), 0), (b.get("run_record") or {}).get("date") or "")
    return ka > kb


def load_grids(results: Path, folders=None) -> list[dict]:
    """Every grid under results/quality (or in the folders named), its parts merged by the
    grid's id; ordered dense before micro, primary before secondary, newest first."""
    paths = ([Path(f) / "grid.json" for f in folders] if folders
             else sorted(Path(results).glob("quality/*/grid.json")))
    grids: dict = {}
    for path in paths:
        meta = load_json(path, made_by="bench.quality")
        g = grids.setdefault(meta["id"], {"id": meta["id"], "identity": meta["identity"],
                                          "about": meta.get("about", ""),
                                          "variants": meta.get("variants") or {},
                                          "folders": [], "runs": {}, "parts": {}})
        g["folders"].append(path.parent)
        for run_path in sorted((path.parent / "runs").glob("*.json")):
            r = load_json(run_path, made_by="bench.quality")
            key = (r.get("variant"), r.get("seed"))
            if key not in g["runs"] or _newer(r, g["runs"][key]):
                g["runs"][key] = r
        for part_path in sorted((path.parent / "parts").glob("*.json")):
            part = load_json(part_path, made_by="bench.quality")
            g["parts"][part["id"]] = part
    for g in grids.values():
        g["newest"] = max([p.get("run_record", {}).get("date") or "" for p in g["parts"].values()]
                          or [""])

    def order(g):
        ident = g["identity"]
        return (_index(REGIME_ORDER, ident["regime"]), _index(ROLE_ORDER, ident["role"]),
                _desc(g["newest"]))
    return sorted(grids.values(), key=order)


def _index(seq, item) -> int:
    return seq.index(item) if item in seq else len(seq)


def _desc(text: str) -> tuple:
    return tuple(-ord(c) for c in text)


def variant_order(g: dict) -> list[str]:
    seen = {v for v, _ in g["runs"]}
    listed = [v for v in g["variants"] if v in seen]
    return listed + sorted(seen - set(listed))


def rows(g: dict) -> list[dict]:
    """One row per variant: mean ± std over its trained seeds, its parameters, device time and
    the seeds that failed (excluded from every figure)."""
    out = []
    for v in variant_order(g):
        runs = [r for (name, _), r in sorted(g["runs"].items(), key=lambda kv: kv[0][1])
                if name == v]
        ok = [r for r in runs if r.get("status") == "ok"]
        row = {"variant": v, "seeds": [r["seed"] for r in ok],
               "failed": [{"seed": r["seed"], "failure": r.get("failure"),
                           "error": r.get("error")} for r in runs if r.get("status") != "ok"],
               "layouts": (ok[0].get("layouts") if ok else None) or [],
               "params": ok[0]["params"] if ok else None,
               "active_params": ok[0].get("active_params") if ok else None,
               "gpu_s": sum(r.get("gpu_s") or 0.0 for r in ok),
               "busiest_expert_share": max((r["busiest_expert_share"] for r in ok
                                            if r.get("busiest_expert_share") is not None),
                                           default=None),
               "samples": next((r.get("samples") for r in ok if r.get("samples")), [])}
        row.update({k: mean_std(r.get(k) for r in ok) for k in STATS})
        out.append(row)
    return out


def delta(row: dict, base: Optional[dict], key: str = "best_val_loss") -> Optional[dict]:
    """row - base of a mean over seeds, with the spread s = sqrt(std_row² + std_base²) (the
    seed-to-seed spread of a difference); beyond the spread when |Δ| > 2 s and both have at
    least two seeds."""
    if base is None or row[key]["mean"] is None or base[key]["mean"] is None:
        return None
    d = row[key]["mean"] - base[key]["mean"]
    s = math.hypot(row[key]["std"] or 0.0, base[key]["std"] or 0.0)
    several = row[key]["n"] > 1 and base[key]["n"] > 1
    return {"delta": d, "spread": s, "beyond": several and abs(d) > 2 * s,
            "pct": 100 * (row[key]["mean"] / base[key]["mean"] - 1) if base[key]["mean"] else None}


def band(row: dict, gqa: Optional[dict], mqa: Optional[dict]) -> Optional[str]:
    """Where a variant's mean best validation loss sits against GQA's and MQA's, in words."""
    dg, dm = delta(row, gqa), delta(row, mqa)
    if dg is None or dm is None:
        return None
    if not dg["beyond"]:
        return "level with GQA (within the seed spread)"
    if dg["delta"] < 0:
        return "better than GQA beyond the seed spread"
    if not dm["beyond"]:
        return "level with MQA (within the seed spread)"
    if dm["delta"] < 0:
        return "inside the GQA–MQA band, beyond the spread of both"
    return "worse than MQA beyond the seed spread"


def claim_holds(verdict: Optional[str]) -> Optional[bool]:
    """The card's claim for one variant: its quality is not below MQA's (between GQA and MQA, or
    better). None where the grid cannot say."""
    return None if verdict is None else not verdict.startswith("worse than MQA")


def gpu_minutes(g: dict) -> float:
    """The wall time of the grid's parts (process start to end, preparation and compilation
    included): the device time the grid took."""
    return sum(p.get("wall_s") or 0.0 for p in g["parts"].values()) / 60


def planned(g: dict, seeds: int = 3) -> int:
    return len(g["variants"]) * seeds


def complete(g: dict, seeds: int = 3) -> bool:
    return all(g["runs"].get((v, s), {}).get("status") == "ok"
               for v in g["variants"] for s in range(seeds))
