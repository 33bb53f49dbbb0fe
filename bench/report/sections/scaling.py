"""Training on several GPUs (bench.scaling's newest dense and fsdp JSON): tokens/s, ms/step and
the scaling efficiency of DDP at each world size with the same global batch, the validation
loss against one process, and FSDP2's step time and peak memory per GPU at 32k tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..criteria import at_least, criterion, word
from ..markdown import label, table_lines
from ..sources import load_json, newest

TITLE = "## Training on several GPUs"
COMMANDS = ("`python -m bench.scaling dense --data DATA_DIR --gpus 1,2,4` and "
            "`python -m bench.scaling fsdp --gpus 1,2,4`")
TARGET_W = 4


def section(ctx) -> str:
    parts = [TITLE]
    for mode, render in (("dense", dense_lines), ("fsdp", fsdp_lines)):
        path = newest(Path(ctx.results) / "scaling", f"*-{mode}.json")
        if path is not None:
            parts.append("\n".join(render(load_json(path, made_by="bench.scaling"),
                                          path.as_posix())))
    if len(parts) == 1:
        return f"{TITLE}\n\nNo runs yet: {COMMANDS} write bench/results/scaling/."
    return "\n\n".join(parts)


def _num(x, digits: int = 0, scale: float = 1.0) -> str:
    return "–" if x is None else f"{x * scale:,.{digits}f}"


def _header(res: dict, source: str) -> str:
    rec = res.get("run_record", {})
    return (f"Source: `{source}`. Device: {rec.get('device', rec.get('device_type'))}; torch "
            f"{rec.get('torch')}; git {rec.get('git')}; {rec.get('date')}. Method: "
            f"{res.get('method', 'see the JSON')}")


def criteria(res: dict) -> list[dict]:
    """Efficiency at 4 processes against the target, one per layout (not measured: N/A)."""
    target = res.get("efficiency_target", 0.90)
    out = []
    for layout in res.get("layers", []):
        row = next((r for r in res.get("rows", []) if r.get("layout") == layout
                    and r.get("world_size") == TARGET_W and r.get("status") == "ok"), None)
        eff = row and row.get("efficiency")
        out.append(criterion(f"{label(layout)}, DDP efficiency at {TARGET_W} GPUs",
                             None if eff is None else f"{eff:.3f}", f"≥ {target:.2f}",
                             at_least(eff, target)))
    return out


def _loss_cell(r: dict) -> str:
    diff = r.get("val_loss_diff")
    if r.get("world_size") == 1 or diff is None:
        return "reference" if r.get("world_size") == 1 else "–"
    text = f"{diff:+.3g} ({100 * r.get('val_loss_rel_diff', 0):+.3g} %)"
    if r.get("within_seed_spread") is not None:
        text += (" within" if r["within_seed_spread"] else " outside") + \
            f" 2σ of seeds ({r['seed_spread']:.4f})"
    return text


def dense_lines(res: dict, source: str = "") -> list[str]:
    lines = ["### DDP: the same global batch on 1, 2, 4 GPUs", "", _header(res, source), ""]
    cells = []
    for r in res.get("rows", []):
        if r.get("status") != "ok":
            cells.append([label(r["layout"]), str(r["world_size"]), "failed", "", "", "", "",
                          r.get("error", "")[:80].replace("|", "/")])
            continue
        cells.append([label(r["layout"]), str(r["world_size"]), _num(r.get("tokens_per_s")),
                      _num(r.get("ms_per_step"), 1), _num(r.get("efficiency"), 3),
                      _num(r.get("val_loss"), 4), _loss_cell(r), str(r.get("seeds", 1))])
    lines += table_lines(["layout", "GPUs", "tokens/s", "ms/step", "efficiency", "val loss",
                          "vs 1 GPU", "seeds"], cells)
    lines += ["", "Efficiency = tokens/s at W ÷ (W × tokens/s at 1 GPU); the val loss "
              "difference is the mean at W minus the mean at 1 GPU (same seeds, same batches)."]
    lines += ["", "Criteria:", ""]
    lines += [f"- {k['name']}: {k['measured']} (target {k['target']})"
              + (f": {word(k)}." if k["status"] in ("PASS", "MISS") else ".")
              for k in criteria(res)]
    return lines


def fsdp_lines(res: dict, source: str = "") -> list[str]:
    rows = res.get("rows", [])
    seq = next((r.get("seq_len") for r in rows if r.get("seq_len")), None)
    lines = [f"### FSDP2: the wide model at {_num(seq)} tokens a sequence", "",
             _header(res, source), ""]
    cells = []
    for r in rows:
        if r.get("status") != "ok":
            cells.append([str(r["world_size"]), "failed", "", "", "",
                          r.get("error", "")[:80].replace("|", "/")])
            continue
        cells.append([str(r["world_size"]), str(r.get("batch_size")), _num(r.get("ms_per_step"), 1),
                      _num(r.get("tokens_per_s")), _num(r.get("peak_memory_gib"), 2),
                      _num(r.get("memory_vs_w1"), 2)])
    lines += table_lines(["GPUs", "sequences a step", "ms/step", "tokens/s",
                          "peak GiB per GPU", "memory vs 1 GPU"], cells)
    return lines


def render_markdown(res: dict, source: str = "") -> Optional[str]:
    """One scaling JSON, as its part of the section."""
    render = dense_lines if res.get("mode") == "dense" else fsdp_lines
    return "\n".join([TITLE, ""] + render(res, source)) + "\n"
