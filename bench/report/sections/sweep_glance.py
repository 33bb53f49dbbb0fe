"""'At a glance' over every sweep folder: the seed's sweep against its wall-time target, and the
quality grid at the seed's budget (each row from the newest sweep that trained it), beside the
SQA paper's dense-model table."""

from __future__ import annotations

import math

from ..claims import SEED_CLAIM, SEED_SWEEP_WALL_S, SQA_PAPER_DENSE
from ..criteria import at_most, criterion, word
from ..markdown import fmt, pct, table
from .sweeps import at_seed_budget, step_times_isolated


def section(ctx) -> str | None:
    sweeps, _ = ctx.sweeps
    parts = [x for x in (seed_sweep_speed(sweeps), quality_grid(sweeps)) if x]
    if not parts:
        return None
    return "\n\n".join(["## At a glance", "Built from the sweep folders below; the throughput "
                         "and decode sections carry their own criteria."] + parts)


def seed_sweep_speed(sweeps: list) -> str | None:
    """The newest timed run of the seed's own sweep (3 sizes × mha, sqt, one seed, 2000 steps)."""
    runs = [(s, p) for s, p in sweeps
            if at_seed_budget(s) and s["seeds"] == 1 and s["variants"] == ["mha", "sqt"]
            and set(s["sizes"]) == set(SEED_CLAIM["rows"])
            and s["run_record"].get("wall_from") == "process start"
            and s["run_record"].get("device_type") == "cuda"]
    if not runs:
        return None
    summary, path = max(runs, key=lambda sp: sp[1].parent.name)
    rec = summary["run_record"]
    wall = rec["total_wall_s"]
    k = criterion("the seed's sweep, process start to summary", f"{wall:.1f} s",
                  f"≤ {SEED_SWEEP_WALL_S} s on one H100", at_most(wall, SEED_SWEEP_WALL_S))
    text = (f"The seed's sweep (tiny, small, medium × mha, sqt; 2000 steps; one seed) took "
            f"**{k['measured']}** from process start to summary on one {rec['device']}, including "
            f"compilation, evaluation and the inference timings (target {k['target']}: "
            f"{word(k)}); `{path.parent.name}`.")
    if not step_times_isolated(rec):
        return text
    rows = [[r["size"], r["variant"], fmt(r["ms_per_step"], 2), fmt(r["tokens_per_s"], 0),
             fmt(r["mfu"], 1, 100)] for r in summary["rows"]]
    return "\n\n".join([text, "Training speed there, one run on the device at a time "
                         f"(MFU against the {rec['matmul_peak_tflops']:.0f} TFLOP/s bf16 matmul "
                         "peak measured in the same run):",
                         table(["size", "variant", "ms / train step", "tokens / s", "MFU (%)"],
                               rows)])


def grid_choice(sweeps: list) -> dict:
    """(size, variant) -> (row, mha row of the same sweep, summary, path): every pair trained at
    the seed's budget with 3 or more seeds, from the newest sweep that has it."""
    chosen: dict = {}
    for summary, path in sorted(sweeps, key=lambda sp: sp[1].parent.name):
        if summary["seeds"] < 3 or not at_seed_budget(summary):
            continue
        by = {(r["size"], r["variant"]): r for r in summary["rows"]}
        for (size, variant), row in by.items():
            chosen[(size, variant)] = (row, by.get((size, "mha")), summary, path)
    return chosen


def quality_grid(sweeps: list) -> str | None:
    """Every (size, variant) of grid_choice in one table; Δ ppl is against mha of the same
    sweep; then the SQA paper's dense table beside ours."""
    chosen = grid_choice(sweeps)
    if not chosen:
        return None
    sizes = [s for s in SEED_CLAIM["rows"] if any(k[0] == s for k in chosen)]
    order = list(dict.fromkeys(v for sm, _ in sweeps for v in sm["variants"]))
    rows = []
    for size in sizes:
        for variant in order:
            if (size, variant) not in chosen:
                continue
            r, base, summary, path = chosen[(size, variant)]
            ms = (fmt(r["ms_per_step"], 2) if step_times_isolated(summary["run_record"])
                  else "shared")
            rows.append([size, variant, f"{r['params'] / 1e6:.2f} M", fmt(r["best_val_loss"], 4),
                         fmt(r["best_val_ppl"], 3),
                         pct(r["best_val_ppl"]["mean"], base["best_val_ppl"]["mean"])
                         if base else "–", fmt(r["best_val_acc"], 2, 100), ms,
                         str(r["seeds"]), f"`{path.parent.name}`"])
    paper = any(k[1] in SQA_PAPER_DENSE["rows"] and k[1] != "mha" for k in chosen)
    return "\n\n".join([
        "### Variant quality at the seed's budget (every size, 3+ seeds)",
        "2000 steps, batch 64 × 256, Tiny Shakespeare; mean ± std over seeds; each row from the "
        "newest sweep that trained it, Δ ppl against `mha` of that same sweep. ms / train step "
        "only where the sweep trained one run at a time (\"shared\": time-sliced with other "
        "runs; see that sweep's note).",
        table(["size", "variant", "params", "best val loss (nats)", "best val ppl",
               "Δ ppl vs mha", "val accuracy (%)", "ms / train step", "seeds", "sweep"], rows),
        grid_reading(chosen, sizes, order)] + ([paper_dense_table(chosen, sizes)] if paper else []))


def paper_dense_table(chosen: dict, sizes: list) -> str:
    """The SQA paper's dense-model table beside ours, both as changes against MHA of the same
    study (the datasets, tokenizers and budgets differ, so absolute losses do not compare):
    perplexity change, and training time (theirs: total minutes; ours: ms per step, shown only
    where a sweep timed one run at a time)."""
    paper = SQA_PAPER_DENSE["rows"]
    base_min, base_loss, base_acc = paper["mha"]
    rows = []
    for variant, (minutes, loss, acc) in paper.items():
        if variant == "mha":
            continue
        cells = [variant, f"{100 * (math.exp(loss - base_loss) - 1):+.1f} %",
                 f"{100 * (minutes / base_min - 1):+.1f} %", f"{acc - base_acc:+.2f}"]
        for size in sizes:
            got = chosen.get((size, variant))
            if got is None or got[1] is None:
                cells.append("—")
                continue
            r, base, summary, _ = got
            ppl = pct(r["best_val_ppl"]["mean"], base["best_val_ppl"]["mean"])
            ms = (pct(r["ms_per_step"]["mean"], base["ms_per_step"]["mean"])
                  if step_times_isolated(summary["run_record"]) else "shared")
            cells.append(f"{ppl} / {ms}")
        rows.append(cells)
    return "\n\n".join([
        "**Beside the SQA paper's dense models.** Theirs: " + SQA_PAPER_DENSE["source"] +
        " (their claim). Ours: the grid above, Tiny Shakespeare characters, context 256, "
        "2000 steps, mean of the seeds. Every figure is a change against MHA of the same study; "
        "ours per size as Δ best-val ppl / Δ ms per training step.",
        table(["variant", "paper: Δ ppl", "paper: Δ train time", "paper: Δ accuracy (pts)"] +
              [f"ours {size}" for size in sizes], rows)])


def grid_reading(chosen: dict, sizes: list, order: list) -> str:
    """Per size, the variants whose best-val ppl differs from mha's by more than twice the
    combined seed-to-seed spread, and the largest such loss."""
    parts, worst = [], None
    for size in sizes:
        worse, better = [], []
        for variant in order:
            if variant == "mha" or (size, variant) not in chosen:
                continue
            r, base, _, _ = chosen[(size, variant)]
            if base is None:
                continue
            q, b = r["best_val_ppl"], base["best_val_ppl"]
            spread = 2 * ((q["std"] or 0) ** 2 + (b["std"] or 0) ** 2) ** 0.5
            delta = 100 * (q["mean"] / b["mean"] - 1)
            if q["mean"] - b["mean"] > spread:
                worse.append(f"{variant} {delta:+.1f} %")
                if worst is None or delta > worst[0]:
                    worst = (delta, variant, size)
            elif b["mean"] - q["mean"] > spread:
                better.append(f"{variant} {delta:+.1f} %")
        parts.append(f"{size}: worse than mha beyond noise: {', '.join(worse) or 'none'}"
                     + (f"; better: {', '.join(better)}" if better else ""))
    text = ("**Reading.** Differences from mha larger than twice the combined seed-to-seed "
            "spread — " + "; ".join(parts) + ".")
    if worst:
        text += (f" The largest loss is {worst[0]:+.1f} % best-val ppl ({worst[1]} at "
                 f"{worst[2]}); every other variant differs from mha by less or within noise.")
    return text
