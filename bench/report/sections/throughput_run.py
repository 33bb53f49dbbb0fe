"""One throughput run's section: its method, the paper's Table 3 beside ours, every case, the
matched comparisons, its criteria and a reading. Also what `--run` writes beside the JSON."""

from __future__ import annotations

from typing import Optional

from ..claims import PAPER_BATCH, PAPER_TABLE3
from ..criteria import holds
from ..markdown import label, table_lines, variant_order
from .throughput_analysis import MATCHED, analyse, peak_used, series_families, tflops
from .throughput_flash import flash_md

STATUS_CELL = {"oom": "OOM", "skipped": "skipped", "error": "error"}
# Method notes that newer runs record (older runs read as they did).
NEWER_SETTINGS = (("op_method", "Op level"), ("weights", "Weights"),
                  ("layer_memory", "Layer memory"), ("kernel_time", "Kernel time"))


def cell(c: Optional[dict], op: bool, peak: float) -> str:
    if c is None:
        return ""
    if c["status"] != "ok":
        return STATUS_CELL.get(c["status"], c["status"])
    if op:
        return f"{c['seconds'] * 1e3:.3g} ms, {tflops(c):.3g} TF ({tflops(c) / peak:.0%})"
    sp = f", {c['vs_mha']:.2f}x" if c.get("vs_mha") else ""
    mem = f", {c['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in c else ""
    return f"{c['seconds']:.4f}{sp}{mem}"


def groups_of(items: list[dict]) -> list[tuple]:
    """The (part, model, mode, family) tables, model level first."""
    return sorted({(c["part"], c["model"], c["mode"], c["family"]) for c in items},
                  key=lambda g: (g[0] != "model", g[1], g[2], g[3]))


def paper_tables(cases, seqs) -> list[str]:
    by = {(c["family"], c["seq"], c["variant"]): c for c in cases
          if c["part"] == "model" and c["model"] == "paper" and c["mode"] == "forward"}
    cols = PAPER_TABLE3["columns"]
    out = []
    for fam, note in (("flex", "every column on FlexAttention (the one family that runs SWA)"),
                      ("sdpa", "full-causal columns on SDPA; SWA has no SDPA kernel")):
        if not any(k[0] == fam for k in by):
            continue
        secs, speed = [], []
        for seq, paper in PAPER_TABLE3["rows"].items():
            if seq not in seqs:
                continue
            mine = [by.get((fam, seq, v)) for v in cols]
            ok = [m if m and m["status"] == "ok" else None for m in mine]
            name = f"{seq:,} ({PAPER_BATCH[seq]})"
            secs.append([name] + [f"{p:.4f} / " + (f"{m['seconds']:.4f}" if m else
                                                   (mm["status"] if mm else "—"))
                                  for p, m, mm in zip(paper, ok, mine)])
            speed.append([name] + [f"{paper[-1] / p:.2f}x / " +
                                   (f"{m['vs_mha']:.2f}x" if m and m.get("vs_mha") else "—")
                                   for p, m in zip(paper, ok)])
        if not secs:
            continue
        hdr = ["seq (batch)"] + [label(v) for v in cols]
        out += [f"**Seconds per forward step, paper / ours** — ours: {note}.", ""]
        out += table_lines(hdr, secs) + ["", f"**Speedup over MHA, paper / ours** ({fam}).", ""]
        out += table_lines(hdr, speed) + [""]
    return out


def render_markdown(result: dict, source: str = "", note: Optional[str] = None) -> str:
    """One run's section; `note` is a caveat about the run that its JSON cannot record. A run
    whose JSON holds no criteria (newer runs, or a killed one) is analysed here."""
    if "criteria" not in result:
        result = {**result, **analyse(result)}
    cases, peak = result["cases"], peak_used(result)
    run, st = result["run"], result["settings"]
    seqs = sorted({c["seq"] for c in cases})
    n_skip = sum(c["status"] == "skipped" for c in cases)
    n_oom = sum(c["status"] == "oom" for c in cases)
    L = ["## Long-sequence throughput (SQA paper, Table 3, re-measured)", "",
         (f"Source: `{source}` · " if source else "") +
         f"Command: `python -m bench.throughput {' '.join(st.get('argv') or [])}` · " +
         f"Device: {run.get('device')} · torch {run.get('torch')} · git {run.get('git')} · "
         f"{run.get('date')} · matmul peak measured in this run: **{peak:.0f} TFLOP/s** "
         f"(bf16, the higher of start/end) · {len(cases)} cases, {n_oom} out of memory, "
         f"{n_skip} skipped by the time budget" +
         ("" if result.get("complete") else " · **run incomplete (killed?)**"), "",
         f"Method: each case builds its model, runs its own warm-up, then up to {st['repeats']} "
         "timed calls (CUDA events on a GPU; at least 3, fewer once a case passes "
         f"{st['max_seconds']} s); cases run in a random order within each (mode, length) "
         "block; median shown, quartiles in the JSON. "
         f"Forward: {st['forward']}. Train: {st['train']} (lengths up to "
         f"{st.get('train_max_seq') or 'any'})"
         + "".join(f"; {m}: {st[m]}" for m in st.get("modes", [])
                   if m not in ("forward", "train") and m in st)
         + f". {st['compiled']}. "
         + "".join(f"{name}: {st[key]}. " for key, name in NEWER_SETTINGS if key in st)
         + "Model-level SDPA family: " +
         (f"forced to the `{st['sdpa_kernel']}` kernel so every head layout runs the same "
          "kernel." if st['sdpa_kernel'] != "none" else "torch's own kernel choice (recorded).")
         + " Attention FLOPs count causal pairs only. Flex rows are a subset of variants by "
         "default (each new shape compiles); see `settings` in the JSON."
         + (f" Log-log plot: `{result['plot']}`." if result.get("plot", "").endswith(".png")
            else ""), ""] + ([f"**Note on this run:** {note}", ""] if note else [])
    paper = paper_tables(cases, seqs)
    if paper:
        L += ["### Beside the paper's Table 3 (paper's claim: A100 40GB; ours: the device above)",
              ""] + paper
    fams = series_families(cases)
    L += ["### All cases", "",
          "Model level: seconds per step, speedup over MHA of the same family, peak memory. "
          "Op level: the attention op alone (no projections), time, achieved TFLOP/s and % of "
          "the measured matmul peak.", ""]
    for g in groups_of(cases):
        part, model, mode, family = g
        sub = [c for c in cases if (c["part"], c["model"], c["mode"], c["family"]) == g]
        by = {(c["seq"], c["variant"]): c for c in sub}
        rows = [[label(v)] + [cell(by.get((s, v)), part == "op", peak) for s in seqs]
                for v in sorted({c["variant"] for c in sub}, key=variant_order)]
        kernels = sorted({k for c in sub for k in c.get("kernels", [])})
        L += [f"**{model} · {mode} · {family}** — kernel family seen: "
              f"{', '.join(sorted(fams.get(g, {'not profiled'})))}"
              + (f" (`{'`, `'.join(k[:80] for k in kernels[:3])}`)" if kernels else ""), ""]
        L += table_lines(["variant"] + [f"{s:,}" for s in seqs], rows) + [""]
    L += matched_md(result["matched"])
    L += flash_md(cases)
    measured = [k for k in result["criteria"] if k["status"] != "N/A"]
    unmeasured = [k["name"] for k in result["criteria"] if k["status"] == "N/A"]
    L += ["### Criteria (printed by the benchmark, measured in this run)", ""]
    L += table_lines(["criterion", "measured", "target", ""],
                     [[k["name"], str(k["measured"]), k["target"], k["status"]]
                      for k in measured]) + [""]
    if unmeasured:
        L += ["Outside this run's grid: " + "; ".join(unmeasured) + ".", ""]
    L += reading(measured, result["matched"], any(c["part"] == "op" for c in cases))
    return "\n".join(L) + "\n"


def matched_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["### Matched comparisons: how much of a speedup is just fewer FLOPs", "",
           "Measured speedup of the variant over its baseline (same model, mode, family and "
           "length), beside the head-count ratio theory predicts for the attention op and the "
           "FLOP ratio of what was timed (for a whole model this includes projections and MLP, "
           "so it is below the head ratio). Measured / FLOP ratio near 1 means the speedup is "
           "the FLOP cut and nothing else.", ""]
    for src in groups_of(rows):
        sub = {(r["variant"], r["baseline"], r["seq"]): r for r in rows
               if (r["part"], r["model"], r["mode"], r["family"]) == src}
        own = sorted({k[2] for k in sub})          # the lengths this table measured
        long_seqs = [s for s in own if s >= 32768] or own
        found = []
        for v, base, what in MATCHED:
            hits = [sub.get((v, base, s)) for s in long_seqs]
            if not any(hits):
                continue
            first = next(h for h in hits if h)
            found.append([f"{label(v)} vs {label(base)}", what, f"{first['head_ratio']:.2f}x",
                          f"{hits[-1]['flop_ratio']:.2f}x" if hits[-1] else "—"] +
                         [f"{h['measured']:.2f}x" if h else "—" for h in hits])
        out += [f"**{src[1]} · {src[2]} · {src[3]}**", ""]
        out += table_lines(["pair", "held equal", "head ratio",
                            f"FLOP ratio ({long_seqs[-1]:,})"]
                           + [f"measured {s:,}" for s in long_seqs], found) + [""]
    return out


def _equal_flop_reading(rows: list[dict]) -> list[str]:
    """One data-driven line: pairs with equal attention FLOPs (theory 1.00x) at the longest
    length measured for the paper model's forward pass, so KV size's own effect is visible."""
    rows = [r for r in rows if r["model"] == "paper" and r["mode"] == "forward"
            and r["head_ratio"] == 1.0]
    if not rows:
        return []
    out = []
    for fam in sorted({r["family"] for r in rows}):
        sub = [r for r in rows if r["family"] == fam]
        seq = max(r["seq"] for r in sub)
        pairs = ", ".join(f"{label(r['variant'])}/{label(r['baseline'])} {r['measured']:.2f}x"
                          for r in sub if r["seq"] == seq)
        out.append(f"- Equal attention FLOPs, different KV size (paper model, forward, {fam}, "
                   f"seq {seq:,}; theory 1.00x): {pairs}.")
    return out


def reading(crit: list[dict], matched_rows: list[dict], op_rows: bool = True) -> list[str]:
    out = ["### Reading", ""]
    for k in crit:
        out.append(f"- {k['name']}: {k['measured']} against {k['target']}: {holds(k)}."
                   + (f" {k['note']}." if k["note"] else ""))
    out += [] if not op_rows else [
            "- Why head dim 16 sits far below the matmul peak: each query-key pair costs "
            "4 x 16 = 64 matmul FLOPs but one exponential, so the softmax (special-function "
            "units), not the tensor cores, bounds the kernel; head dim 64 has 4x and 128 has 8x "
            "the FLOPs per exponential. The op-level rows give the measured rates."]
    out += _equal_flop_reading(matched_rows)
    out.append("")
    return out
