"""What the query buys (bench.query's summary.json): does the probe predict which layers tolerate a
static query, does MHA -> SQA/xSQA conversion plus uptraining match training from scratch, and
the parameter-free query controls beside MHA. Each answer is read off the numbers, with their
spread over seeds, whichever way it falls."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..markdown import fmt, label, params_str, table
from ..notes import note_for
from ..plots import query_static_plot, query_uptrain_plot, written
from ..sources import load_json
from .sweeps import provenance

TITLE = "## What the query buys: probe, conversions, controls"
COMMANDS = ("`python -m bench.query --size medium --seeds 3` (Tiny Shakespeare) and "
            "`python -m bench.query --size sqa-dense --data DATA_DIR --seeds 3` (a prepared "
            "Wikipedia corpus)")


def section(ctx) -> str:
    found = newest_per_preset(ctx.results)
    if not found:
        return f"{TITLE}\n\nNo runs yet: {COMMANDS} write bench/results/query/."
    parts = [TITLE]
    for summary, path in found:
        parts.append(query_section(summary, path, ctx.figure_dir))
        parts += note_for(ctx.notes, ctx.results, path)
    return "\n\n".join(parts)


def newest_per_preset(results: Path) -> list[tuple[dict, Path]]:
    """(summary, path) of the newest run of each preset and question: runs that answer different
    experiments (or uptrain different targets) are each shown, a rerun of the same replaces
    the earlier one. Run folders start with a UTC stamp."""
    newest: dict = {}
    for path in sorted(Path(results).glob("query/*/summary.json")):
        summary = load_json(path, made_by="bench.query")
        targets = tuple(dict.fromkeys(r["target"] for r in
                                      summary.get("uptrain", {}).get("rows", [])))
        key = (str(summary.get("preset")), tuple(summary.get("experiments", [])), targets)
        newest[key] = (summary, path)   # later ones win
    return [newest[k] for k in sorted(newest)]


def _se_word(ms: Optional[dict], *, lower_is: str, higher_is: str) -> str:
    """How a paired difference reads: beyond two standard errors either way, or within them."""
    if not ms or ms.get("mean") is None:
        return "not measured"
    se = ms["std"] / math.sqrt(ms["n"]) if ms["n"] > 1 else None
    if se is None:
        return f"{lower_is if ms['mean'] < 0 else higher_is} (one seed: no spread)"
    if abs(ms["mean"]) <= 2 * se:
        return "within the seed-to-seed noise"
    return lower_is if ms["mean"] < 0 else higher_is


def _figure(draw, summary, figure_dir, name) -> Optional[str]:
    if figure_dir is None:
        return None
    return name if written(draw(summary, Path(figure_dir) / name)) else None


def query_section(summary: dict, path: Path, figure_dir=None) -> str:
    preset = summary["preset"]
    parts = [f"### {preset} on {summary['data']}: {summary['seeds']} seed(s), base budget "
             f"{summary['base_steps']} steps", provenance(summary, path)]
    if len(summary.get("commands", [])) > 1:
        parts.append("Made by these commands on one run folder: "
                     + "; ".join(f"`{c}`" for c in summary["commands"]) + ".")
    if "static" in summary:
        parts.append(static_part(summary["static"], _figure(
            query_static_plot, summary, figure_dir, f"query-static-{path.parent.name}.png")))
    if "uptrain" in summary:
        parts.append(uptrain_part(summary["uptrain"], _figure(
            query_uptrain_plot, summary, figure_dir, f"query-uptrain-{path.parent.name}.png")))
    if summary.get("controls"):
        parts.append(controls_part(summary["controls"]))
    return "\n\n".join(parts)


def static_part(s: dict, figure: Optional[str]) -> str:
    n = s["n_layers"]
    layer_rows = [[str(r["layer"]), fmt(r["q_share"], 3), fmt(r.get("q_share_rotated"), 3),
                   fmt(r["k_share"], 3), fmt(r["delta_loss"], 4)] for r in s["layers"]]
    rows = [[str(r["k"]), _layers(r["most"]["layers"]), fmt(r["most"]["delta_before"], 4),
             fmt(r["most"]["delta_after"], 4), _layers(r["least"]["layers"]),
             fmt(r["least"]["delta_before"], 4), fmt(r["least"]["delta_after"], 4),
             fmt(r["least_minus_most_after"], 4)] for r in s["rows"]]
    partial = [r for r in s["rows"] if r["k"] < n]
    verdicts = [_se_word(r["least_minus_most_after"], lower_is="least cost less",
                         higher_is="most cost less") for r in partial]
    wins = verdicts.count("most cost less")
    losses = verdicts.count("least cost less")
    rho = s["share_delta_spearman"]
    answer = ("**Yes**" if partial and wins == len(partial) else
              "**No**" if partial and losses == len(partial) else "**Not clearly**")
    text = [
        "#### Does the probe predict which layers tolerate a static query?",
        "Per layer of the trained MHA: the positional share of its queries and keys (the part of "
        "their variance that position alone explains; `sqt probe`), before RoPE and, for the "
        "query, after it (\"-\": a probe from before that was measured), and the loss change "
        "when its queries are replaced by their per-position mean, no retraining:",
        table(["layer", "q share", "q share after RoPE", "k share", "Δ loss, queries → mean"],
              layer_rows),
        f"Rank correlation of share and Δ over layers: {fmt(rho, 2)} (negative: positional "
        "layers lose less).",
        f"The k most vs the k least positional layers as static tables (`sqt convert --to "
        f"table:...`). Δ loss before: against the MHA; after: against the MHA fine-tuned for the "
        f"same {s['finetune_steps']} steps. Last column: least − most after the fine-tune "
        "(positive: the probe's choice costs less).",
        table(["k", "most positional", "Δ before", "Δ after", "least positional", "Δ before",
               "Δ after", "least − most (after)"], rows)]
    if partial:
        text.append(
            f"{answer}: for k = 1 … {n - 1}, making the most positional layers static cost "
            f"less than the least positional ones beyond two standard errors in {wins} of "
            f"{len(partial)} cases, more in {losses}, and the difference was within the "
            f"seed-to-seed noise in {len(partial) - wins - losses}.")
    if figure:
        text.append(f"Loss against the number of static layers: [`{figure}`]({figure}).")
    return "\n\n".join(text)


def _layers(per_seed: list) -> str:
    distinct = {tuple(x) for x in per_seed}
    return " / ".join(",".join(map(str, x)) for x in sorted(distinct))


def uptrain_part(u: dict, figure: Optional[str]) -> str:
    fractions = [f["fraction"] for f in u["rows"][0]["fractions"]] if u["rows"] else []
    head = ["target", "method", "as converted"] + [
        f"+{100 * f:g} %: loss / Δ vs scratch" for f in fractions]
    rows = [[label(r["target"]), r["method"], fmt(r["converted"], 4)] + [
        f"{fmt(p['loss'], 4)} / {fmt(p['delta_vs_scratch'], 4)}" for p in r["fractions"]]
        for r in u["rows"]]
    scratch = [[label(s["target"]), f"+{100 * s['fraction']:g} %", str(s["steps"]),
                fmt(s["loss"], 4), f"{s['flops'] / u['mha']['flops']:.2f}"] for s in u["scratch"]]
    readings, verdicts = [], []
    for target in dict.fromkeys(r["target"] for r in u["rows"]):
        for f_i, f in enumerate(fractions):
            said = []
            for r in (r for r in u["rows"] if r["target"] == target):
                d = r["fractions"][f_i]["delta_vs_scratch"]
                verdicts.append(_se_word(d, lower_is="better", higher_is="worse"))
                said.append(f"{r['method']} {fmt(d, 4)} ({verdicts[-1]})")
            readings.append(f"- {label(target)}, +{100 * f:g} %: {', '.join(said)}.")
    matched = sum(v.startswith("better") or "noise" in v for v in verdicts)
    text = [
        "#### Does MHA → SQA/xSQA conversion plus uptraining match training from scratch?",
        f"Every layer of the trained MHA ({u['base_steps']} steps, loss "
        f"{fmt(u['mha']['loss'], 4)}) converted (`sqt convert --method ...`), then fine-tuned "
        "for a fraction of that budget; Δ = its loss − the same layout trained from scratch "
        "for the base budget plus that fraction (paired by seed; negative: the conversion is "
        "better).",
        table(head, rows),
        "From scratch (compute relative to the MHA base; a conversion spent the MHA's plus the "
        "fine-tune's):",
        table(["target", "extra budget", "steps", "loss", "compute / MHA base"], scratch),
        f"Conversion matched or beat training from scratch (Δ < 0, or within two standard "
        f"errors of 0) in {matched} of {len(verdicts)} (target, method, budget) cells:",
        "\n".join(readings)]
    if figure:
        text.append(f"Recovery against uptraining tokens: [`{figure}`]({figure}).")
    return "\n\n".join(text)


def controls_part(rows: list) -> str:
    out = [[label(r["variant"]), params_str(r["params"]), fmt(r["loss"], 4),
            fmt(r["delta_vs_mha"], 4), fmt(r["q_share"], 3)] for r in rows]
    return "\n\n".join([
        "#### Controls: what a query with no trained parameters does",
        "`idq`: W_q = I; `rndq`: a frozen random W_q (drawn per seed); `sqt`: a static table. "
        "Δ against MHA of the same seed; q share: the layers' mean positional share.",
        table(["variant", "params", "val loss", "Δ vs MHA", "q share"], out)])
