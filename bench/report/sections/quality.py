"""The quality benchmark (bench.quality): per grid, every variant's quality and speed with the
seed spread against GQA and MHA, the source's table beside ours (the SQA blog's dense models,
the SQAT-mm card's micro MoE), a reading of what holds, validation loss against training time,
and samples; before them, the judged criteria (bench/report/sections/quality_criteria.py)."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Optional

from .. import quality_grids as qg
from ..claims import SQA_PAPER_DENSE, SQAT_CARD_MICRO
from ..markdown import fmt, label, params_str, table
from ..plots import quality_curves, written
from .quality_criteria import busiest_expert, criteria_lines, quality_criteria, regime_minutes

CLAIMS = {"dense": SQA_PAPER_DENSE, "micro": SQAT_CARD_MICRO}
PLOT = "quality-{regime}-{role}.png"   # a grid's figure, in the document's figure folder
CURVES = "curves.png"                  # or beside the grid's folder (python -m bench.report --run)
SAMPLE_CHARS = 240


def section(ctx) -> Optional[str]:
    grids = qg.load_grids(ctx.results)
    crit = quality_criteria(grids, ctx.sweeps[0], ctx.results)
    if not grids and all(k["status"] == "N/A" for k in crit):
        return None
    parts = ["## Quality in SQA's own regimes",
             "`python -m bench.quality dense|micro` (one command per regime, run in parts and "
             "merged by the grid's identity): every variant × 3 seeds at one token budget; mean ± "
             "std over seeds; Δ is the difference of means, ± the seed spread √(s₁² + s₂²); "
             "\"beyond the spread\" means |Δ| > 2 × that. Step times are each run's own, measured "
             "alone even where runs shared the GPU.", *criteria_lines(crit)]
    for g in grids:
        img = None
        if ctx.figure_dir is not None:
            name = PLOT.format(regime=g["identity"]["regime"], role=g["identity"]["role"])
            if written(draw(g, Path(ctx.figure_dir) / name)):
                img = name    # figures are linked by name, as every section links them
        parts.append(grid_section(g, img))
    return "\n\n".join(parts)


def quality_run_markdown(folder: Path, *, plot: bool = True) -> tuple[str, list]:
    """One grid folder as `python -m bench.report --run` shows it after a part: the regime's
    criteria, then the grid's section, its figure drawn beside the folder."""
    (g,) = qg.load_grids(folder.parent, [folder])
    regime = g["identity"]["regime"]
    crit = [regime_minutes([g], regime)] + ([busiest_expert([g])] if regime == "micro" else [])
    img, console = None, []
    if plot:
        note = draw(g, folder / CURVES)
        console.append(f"plot: {note}")
        img = (folder / CURVES).as_posix() if written(note) else None
    return "\n\n".join(criteria_lines(crit) + [grid_section(g, img)]), console


def draw(g: dict, path: Path) -> str:
    runs = {v: [r for (name, _), r in g["runs"].items() if name == v and r.get("status") == "ok"]
            for v in qg.variant_order(g)}
    ident = g["identity"]
    return quality_curves(runs, path, f"{ident['preset']} on {ident['corpus']['name']}")


def grid_section(g: dict, img: Optional[str]) -> str:
    ident = g["identity"]
    rows = qg.rows(g)
    by = {r["variant"]: r for r in rows}
    trained = sum(len(r["seeds"]) for r in rows)
    parts = [f"### {ident['regime'].capitalize()} ({ident['role']}): `{ident['preset']}` on "
             f"{ident['corpus']['name']}", provenance(g, trained)]
    if not trained:
        return "\n\n".join(parts + ["No runs yet: every run of this grid failed or is still to "
                                    "train (`python -m bench.quality ... --plan` lists them)."])
    parts += [grid_table(rows, by), failures(rows)]
    claims = claims_table(ident["regime"], by)
    if claims:
        parts += [claims]
    parts += [reading(ident, by)]
    if img:
        parts += [f"![validation loss against training time]({img})"]
    parts += [samples(rows)]
    return "\n\n".join(p for p in parts if p)


def provenance(g: dict, trained: int) -> str:
    ident, b = g["identity"], g["identity"]["budget"]
    rec = ident["recipe"]
    devices = sorted({(p.get("run_record") or {}).get("device", "?") for p in g["parts"].values()})
    mps = sorted({"on" if (p.get("mps") or {}).get("running") else "off"
                  for p in g["parts"].values()})
    slots = sorted({str(p.get("device_slots")) for p in g["parts"].values()})
    return (f"{g['about']}. Budget: {b['tokens']:,} tokens a run = {b['steps']:,} steps of "
            f"{b['tokens_per_step']:,} ({b['epochs']:.2f} epochs of the {ident['train_tokens']:,}"
            f"-token training split; asked: {_asked(b['asked'])}), the same for every variant. "
            f"Recipe: lr {rec['lr']:g}, warm-up {rec['warmup']}, cosine to "
            f"{rec['min_lr'] if rec['min_lr'] is not None else rec['lr'] / 10:g}, batch "
            f"{rec['batch_size']} × {rec['seq_len']}, weight decay {rec['weight_decay']:g}; "
            f"evaluation every {rec['eval_every']} steps on {rec['eval_batches']} fixed batches "
            f"of the {ident['val_tokens']:,}-token validation split. Grid `{g['id']}` (corpus "
            f"sha256 {ident['corpus']['sha256'][:12]}…, tokenizer {ident['tokenizer_sha256'][:12]}"
            f"…, vocabulary {ident['vocab_size']:,}): {trained} of {qg.planned(g)} runs trained "
            f"in {len(g['parts'])} part(s), {qg.gpu_minutes(g):.1f} GPU-minutes from process "
            f"start to end (preparation and compilation included), on {', '.join(devices)}; "
            f"device slots {', '.join(slots)}, MPS {', '.join(mps)}. Folder(s): "
            + ", ".join(f"`{f.as_posix()}`" for f in g["folders"]) + ".")


def _asked(asked: dict) -> str:
    return ", ".join(f"{v:g} {k}" if isinstance(v, float) else f"{v:,} {k}"
                     for k, v in asked.items())


def _delta_cell(d: Optional[dict], digits: int = 4) -> str:
    if d is None:
        return "–"
    return (f"{d['delta']:+.{digits}f} ± {d['spread']:.{digits}f}"
            + (" ✱" if d["beyond"] else ""))


def _pct_cell(d: Optional[dict]) -> str:
    return "–" if d is None or d["pct"] is None else f"{d['pct']:+.1f} %"


def grid_table(rows: list[dict], by: dict) -> str:
    gqa, mha = by.get("gqa"), by.get("mha")
    out = []
    for r in rows:
        params = params_str(r["params"]) if r["params"] else "–"
        if r["active_params"] and r["active_params"] != r["params"]:
            params += f" ({params_str(r['active_params'])} active)"
        out.append([label(r["variant"]), ", ".join(r["layouts"]) or "–", params,
                    fmt(r["best_val_loss"], 4),
                    "–" if r is gqa else _delta_cell(qg.delta(r, gqa)),
                    "–" if r is mha else _delta_cell(qg.delta(r, mha)), fmt(r["best_val_ppl"], 2),
                    fmt(r["best_val_acc"], 2, 100), fmt(r["ms_per_step"], 2),
                    "–" if r is gqa else _pct_cell(qg.delta(r, gqa, "ms_per_step")),
                    fmt(r["tokens_per_s"], 0, 1e-3),
                    f"{r['gpu_s'] / 60:.1f}", str(len(r["seeds"]))])
    return "\n\n".join([
        table(["variant", "heads (q/kv)", "params", "best val loss", "Δ vs GQA", "Δ vs MHA",
               "best val ppl", "val acc (%)", "ms / step alone", "Δ ms vs GQA", "k tokens / s",
               "GPU min", "seeds"], out),
        "Losses in nats per token of this grid's tokenizer; ✱: beyond twice the seed spread. "
        "GPU min: the seeds' time holding a device slot (training, evaluation, samples)."])


def failures(rows: list[dict]) -> Optional[str]:
    failed = [f"{label(r['variant'])} seed {f['seed']} ({f.get('failure') or 'failed'}: "
              f"{(f.get('error') or '')[:160]})" for r in rows for f in r["failed"]]
    return ("**Failed runs (left out of every figure):** " + "; ".join(failed) + ".") if failed \
        else None


def claims_table(regime: str, by: dict) -> Optional[str]:
    claim = CLAIMS.get(regime)
    if claim is None or "gqa" not in claim["rows"]:
        return None
    theirs_gqa = claim["rows"]["gqa"][0]
    ours_gqa = by.get("gqa")
    out = []
    for v, (minutes, loss, acc, *params) in claim["rows"].items():
        r = by.get(v)
        ours = ([fmt(r["best_val_loss"], 4), fmt(r["best_val_acc"], 2, 100),
                 _pct_cell(qg.delta(r, ours_gqa, "ms_per_step"))] if r else ["–", "–", "–"])
        out.append([label(v), str(loss), f"{acc:.2f}",
                    f"{minutes} ({100 * (minutes / theirs_gqa - 1):+.1f} %)",
                    *([f"{params[0]:.2f} M"] if params else []), *ours,
                    *([params_str(r["params"]) if r else "–"] if params else [])])
    head = ["variant", "their loss", "their acc (%)", "their minutes (vs GQA)"]
    head += ["their params"] if len(next(iter(claim["rows"].values()))) > 3 else []
    head += ["our best val loss", "our acc (%)", "our ms / step vs GQA"]
    head += ["our params"] if len(next(iter(claim["rows"].values()))) > 3 else []
    return "\n\n".join([f"**Beside the source's table** ({claim['source']}; their claim, one run "
                        "each; their tokenizer, data and budget differ from ours, so compare the "
                        "order and the gaps, not the absolute losses).", table(head, out)])


def reading(ident: dict, by: dict) -> str:
    """Is each SQA variant inside the GQA–MQA band, beyond the seed spread? Does it train faster
    than GQA at this context?"""
    gqa, mqa = by.get("gqa"), by.get("mqa")
    context = ident["recipe"]["seq_len"]
    band, speed = [], []
    for v in qg.SQA_FAMILY:
        r = by.get(v)
        if r is None:
            continue
        verdict = qg.band(r, gqa, mqa)
        if verdict:
            band.append(f"{label(v)} {verdict}")
        d = qg.delta(r, gqa, "ms_per_step")
        if d is not None and d["pct"] is not None:
            speed.append(f"{label(v)} {d['pct']:+.1f} %")
    if gqa is None or mqa is None:
        text = "**Reading.** GQA and MQA must both be trained to place the SQA variants."
    else:
        gm = qg.delta(mqa, gqa)
        text = (f"**Reading.** MQA's best validation loss is {gm['delta']:+.4f} ± "
                f"{gm['spread']:.4f} from GQA's ("
                + ("beyond" if gm["beyond"] else "within") + " the seed spread). "
                + ("; ".join(band) + "." if band else ""))
        claimed = [v for v in qg.SQA_FAMILY if v in by and v in CLAIMS.get(ident["regime"], {})
                   .get("rows", {})]
        held = [qg.claim_holds(qg.band(by[v], gqa, mqa)) for v in claimed]
        if held and all(h is not None for h in held):
            text += (" The source's claim, that its SQA variants ("
                     + ", ".join(label(v) for v in claimed) + ") lose no more than MQA, "
                     + ("holds for every one." if all(held) else
                        f"fails for {sum(not h for h in held)} of {len(held)}."))
    if speed:
        text += (f" Step time alone against GQA at context {context}: " + ", ".join(speed)
                 + " (negative: faster).")
    return text


def printable(text: str) -> str:
    """Generated text as a code block can hold it: control characters (a byte-level BPE model
    can emit any byte) shown as �, no fence, line breaks kept."""
    text = "".join(c if c == "\n" or unicodedata.category(c)[0] != "C" else "�" for c in text)
    return text.replace("```", "'''")


def samples(rows: list[dict]) -> Optional[str]:
    """The first fixed prompt of the grid, continued by each variant (its first trained seed)."""
    lines = []
    for r in rows:
        if not r["samples"]:
            continue
        s = r["samples"][0]
        text = printable(s["prompt"]) + "⟦" + printable(s["completion"])[:SAMPLE_CHARS] + "⟧"
        lines.append(f"{label(r['variant'])}: {text}")
    if not lines:
        return None
    return ("**Samples** (a fixed validation prompt, continuation at temperature 0.8, fixed seed; "
            "the continuation in ⟦ ⟧):\n\n```text\n" + "\n\n".join(lines) + "\n```")
