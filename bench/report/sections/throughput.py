"""Every throughput run at once: the criteria of every run in one table with how often each held,
then the newest measurement of each cell across runs (the paper's Table 3 beside ours, every
model, mode and backend, the matched comparisons and a log-log plot), then each run's own
section. Runs are independent measurements: a newer one never averages with an older one, and
every speedup is a ratio of two timings from the same run."""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from ..claims import PAPER_BATCH, THROUGHPUT_SEQ
from ..markdown import label, table_lines, variant_order
from ..plots import throughput_plot, written
from .throughput_analysis import UNIFORM_BACKEND, add_speedups, analyse, case_key, matched, \
    peak_used
from .throughput_run import cell, groups_of, matched_md, paper_tables, render_markdown

PLOT_NAME = "throughput.png"


def section(ctx) -> Optional[str]:
    """The criteria of every throughput JSON, the newest-per-cell view (its plot written into
    ctx.figure_dir), then one section per JSON, newest first; None if there is none."""
    paths = sorted(pathlib.Path(ctx.results).glob("throughput_*.json"), reverse=True)
    if not paths:
        return None
    # Criteria are re-derived from each run's cases, so every run is judged by the same rules.
    loaded = [(p, judged(json.loads(p.read_text()), p)) for p in paths]
    parts = [criteria_across_runs(loaded, ctx.notes), glance(loaded, ctx.figure_dir)]
    return "\n\n".join([x for x in parts if x] + [
        render_markdown(r, source=p.as_posix(), note=ctx.notes.get(p.name)) for p, r in loaded])


def judged(result: dict, path: pathlib.Path) -> dict:
    """A run with its analysis, and its plot where `--run` drew one beside it (newer runs do not
    record the plot in their JSON; older ones did)."""
    plot = path.with_suffix(".png")
    return {**({"plot": plot.as_posix()} if plot.exists() else {}), **result, **analyse(result)}


def run_tag(path: pathlib.Path) -> str:
    """The timestamp part of a run's file name (`throughput_20261123T163911Z.json` ->
    `1123T1639`): short enough for a table cell, and the legend maps it back to the file."""
    stamp = path.stem.split("_", 1)[-1]
    return stamp[4:13] if len(stamp) >= 13 else stamp


def merged_cases(loaded: list[tuple[pathlib.Path, dict]]) -> list[dict]:
    """One case per cell (model, mode, family, variant, length, batch): the newest run whose
    case ran and has its MHA baseline in the same run, else the newest run where it ran, else
    (never ran) its newest out-of-memory or error record. Budget skips are dropped: they
    measured nothing. Each case gains `run` (file name), `tag` and `peak` (its run's matmul
    peak), and keeps vs_mha / vs_gqa from its own run."""
    best: dict[tuple, tuple] = {}
    for path, result in loaded:
        peak = peak_used(result)
        for c in add_speedups(result["cases"]):
            if c.get("status") == "skipped":
                continue
            ok = c.get("status") == "ok"
            rank = (ok, ok and c.get("vs_mha") is not None, path.name)
            key = case_key(c) + (c.get("batch"),)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, {**c, "run": path.name, "tag": run_tag(path), "peak": peak})
    return [case for _, case in best.values()]


def merged_matched(loaded: list[tuple[pathlib.Path, dict]]) -> list[dict]:
    """Each run's matched pairs (both timings from that run), the newest run winning a pair."""
    rows: dict[tuple, dict] = {}
    for path, result in sorted(loaded, key=lambda pr: pr[0].name):
        for r in matched(add_speedups(result["cases"])):
            rows[(r["part"], r["model"], r["mode"], r["family"], r["seq"], r["variant"],
                  r["baseline"])] = r
    return list(rows.values())


def tagged_cell(c: Optional[dict]) -> str:
    """The per-run cell (its own run's peak for op-level %), followed by the run's tag."""
    return "" if c is None else f"{cell(c, c['part'] == 'op', c['peak'])} · {c['tag']}"


def tables(cases: list[dict]) -> list[str]:
    out = []
    for g in groups_of(cases):
        sub = [c for c in cases if (c["part"], c["model"], c["mode"], c["family"]) == g]
        cols = sorted({(c["seq"], c["batch"]) for c in sub})
        by = {(c["seq"], c["batch"], c["variant"]): c for c in sub}
        rows = [[label(v)] + [tagged_cell(by.get((s, b, v))) for s, b in cols]
                for v in sorted({c["variant"] for c in sub}, key=variant_order)]
        out += [f"**{g[1]} · {g[2]} · {g[3]}**", ""]
        out += table_lines(["variant"] + [f"{s:,} × {b}" for s, b in cols], rows) + [""]
    return out


def family_reading(cases: list[dict], pairs: list[dict]) -> list[str]:
    """Where a speedup is read on two families, say how each family runs the baseline too (a
    family that runs MHA better shows a smaller ratio for the same variant time), beside the
    whole-model FLOP ratio: the speedup a model running both at one efficiency would show."""
    by = {(c["family"], c["seq"], c["variant"]): c for c in cases if c["status"] == "ok"
          and c["part"] == "model" and c["model"] == "paper" and c["mode"] == "forward"}
    seqs = sorted({s for f, s, v in by if v == "mha" and ("sdpa", s, "mha") in by
                   and ("flex", s, "mha") in by and ("sdpa", s, "xsqa") in by
                   and ("flex", s, "xsqa") in by})
    if not seqs:
        return []
    s = THROUGHPUT_SEQ if THROUGHPUT_SEQ in seqs else seqs[-1]   # where the criteria are judged
    m_s, m_f = by[("sdpa", s, "mha")], by[("flex", s, "mha")]
    x_s, x_f = by[("sdpa", s, "xsqa")], by[("flex", s, "xsqa")]
    flop = next((r["flop_ratio"] for r in pairs if r["model"] == "paper" and r["seq"] == s
                 and r["mode"] == "forward" and r["variant"] == "xsqa"
                 and r["baseline"] == "mha"), None)
    return [f"- Same length, two families (paper model, forward, {s:,}): MHA takes "
            f"{m_s['seconds']:.4f} s on SDPA and {m_f['seconds']:.4f} s on Flex; xSQA "
            f"{x_s['seconds']:.4f} s and {x_f['seconds']:.4f} s. So xSQA's ratio is "
            f"{x_s['vs_mha']:.2f}x on SDPA and {x_f['vs_mha']:.2f}x on Flex: the ratio also "
            "depends on how well a family runs the 16-head baseline, not only on the variant."
            + (f" The whole model's FLOP ratio at this length is {flop:.2f}x (the head ratio, "
               "4x, applies to attention alone): a ratio above it means the baseline ran less "
               "efficiently than the variant." if flop else "")]


def width_reading(rows: list[dict]) -> list[str]:
    """The same head cut at every model width measured at one length: how the whole-model
    speedup follows the whole-model FLOP ratio as projections and MLP grow with d_model."""
    rows = [r for r in rows if r["part"] == "model" and r["mode"] == "forward"
            and r["family"] == "sdpa" and r["baseline"] == "mha" and r["variant"] == "xsqa"]
    by_seq: dict[int, list[dict]] = {}
    for r in rows:
        by_seq.setdefault(r["seq"], []).append(r)
    shared = [s for s, rs in by_seq.items() if len({r["model"] for r in rs}) >= 2]
    if not shared:
        return []
    s = max(shared)
    ordered = sorted(by_seq[s], key=lambda r: r["flop_ratio"], reverse=True)
    parts = [f"{r['model']} {r['measured']:.2f}x (FLOP ratio {r['flop_ratio']:.2f}x)"
             for r in ordered]
    fit = ", ".join(f"{r['model']} {r['measured'] / r['flop_ratio']:.2f}" for r in ordered)
    return [f"- xSQA over MHA at every width (forward, SDPA, {s:,} tokens; head ratio 4x): "
            + ", ".join(parts) + ". The whole-model FLOP ratio counts the projections and MLP, "
            f"which the head cut does not shrink; measured over FLOP ratio: {fit}."]


def glance(loaded: list[tuple[pathlib.Path, dict]],
           figure_dir: Optional[pathlib.Path]) -> str:
    cases = merged_cases(loaded)
    if not cases:
        return ""
    seqs = sorted({c["seq"] for c in cases})
    plot = None
    if figure_dir is not None:
        paper = [c for c in cases if c["status"] == "ok" and c["part"] == "model"
                 and c["model"] == "paper" and c["batch"] == PAPER_BATCH.get(c["seq"], c["batch"])]
        note = throughput_plot({"cases": paper}, pathlib.Path(figure_dir) / PLOT_NAME)
        plot = PLOT_NAME if written(note) else None
    runs = sorted({(c["tag"], c["run"]) for c in cases})
    L = ["## Long-sequence throughput at a glance (newest measurement of each cell)", "",
         "Each cell comes from the newest run that measured it together with its MHA baseline "
         "(else the newest that measured it); speedups divide two timings of that same run, "
         "and the last field names the run. Out-of-memory is shown where no run of that cell "
         "fit; cells cut by a run's time budget are blank. Method, kernels seen and the "
         "matmul peak of each run are in its own section further down. Runs used: "
         + ", ".join(f"`{t}` = `{r}`" for t, r in runs) + "."
         + (f" Log-log plot of the paper model: [`{plot}`]({plot})." if plot else ""), ""]
    paper = paper_tables(cases, seqs)
    if paper:
        L += ["### Beside the paper's Table 3 (paper's claim: A100 40GB; ours: H100, newest "
              "run per cell)", ""] + paper
    L += ["### Every model, mode and backend", "",
          "Model level: seconds per step, speedup over MHA, peak memory. Op level: the attention "
          "op alone, time, achieved TFLOP/s and % of its run's measured matmul peak. Columns: "
          "length × batch.", ""]
    L += tables(cases)
    pairs = merged_matched(loaded)
    L += matched_md(pairs)
    found = family_reading(cases, pairs) + width_reading(pairs)
    if found:
        L += ["### Reading across runs", ""] + found + [""]
    return "\n".join(L)


def criteria_across_runs(results: list[tuple[pathlib.Path, dict]],
                         notes: Optional[dict] = None) -> str:
    """Every criterion some run measured, one row per run that measured it (runs are
    independent measurements, so none replaces another), then how often each held, pointing
    to the notes on the runs where it did not."""
    notes = notes or {}
    measured = [(p, k) for p, r in results for k in r.get("criteria", []) if k["status"] != "N/A"]
    with_verdict = [(p, k) for p, k in measured if k["status"] in ("PASS", "MISS")]
    rows = sorted(([k["name"], str(k["measured"]), k["target"], k["status"], f"`{p.name}`"]
                   for p, k in measured if k["name"] != UNIFORM_BACKEND), key=lambda x: x[0])
    uniform = [(p, k) for p, k in measured if k["name"] == UNIFORM_BACKEND]
    if uniform:     # a check, not a figure: one row for all runs, naming any run that failed it
        failed = [f"`{p.name}`: {k['note']}" for p, k in uniform if k["status"] != "PASS"]
        rows.append([UNIFORM_BACKEND, f"{len(uniform) - len(failed)} of {len(uniform)} runs"
                     + (" (" + "; ".join(failed) + ")" if failed else ""), "all runs",
                     "MISS" if failed else "PASS", "every run"])
    tally: dict[str, list[tuple[str, str]]] = {}
    for p, k in with_verdict:
        tally.setdefault(k["name"], []).append((k["status"], p.name))
    held = []
    for name, runs in sorted(tally.items()):
        passed = sum(status == "PASS" for status, _ in runs)
        if passed == len(runs):
            continue
        noted = [f"`{run}`" for status, run in runs if status != "PASS" and run in notes]
        held.append(f"{name}: held in {passed} of {len(runs)} run(s)"
                    + (f"; see the note{'s' if len(noted) > 1 else ''} on {', '.join(noted)}"
                       if noted else ""))
    return "\n".join(["## Long-sequence throughput: criteria across runs", "",
                      "Each run's own section below gives its method, cases and reading.", ""]
                     + table_lines(["criterion", "measured", "target", "", "run"], rows)
                     + ([""] + ["Not held in every run that measured it:", ""]
                        + [f"- {h}." for h in held] if held else []))
