"""From a throughput JSON to what a reader sees: speedups, the matched comparisons, the criteria
(measured value against target, PASS/MISS, printed, never asserted), the markdown for
docs/results.md with the SQA paper's Table 3 beside ours, and the log-log plot."""

from __future__ import annotations

import pathlib
from typing import Optional

# The SQA paper's Table 3, as the paper states it (its claim, not our measurement): one A100 40GB,
# 8 layers, d_model 256, 16 heads of dim 16, forward only, bf16 autocast; seconds per step.
PAPER_TABLE3 = {
    "source": "SQA paper (arXiv 2510.01817), Table 3: claimed, A100 40GB, forward, s/step",
    "columns": ["xsqa", "sqa", "ssqa", "mha@128", "mqa", "gqa", "mha"],
    "rows": {
        1024: [0.0570, 0.0642, 0.0669, 0.0759, 0.0760, 0.0785, 0.0869],
        4096: [0.0637, 0.0750, 0.0793, 0.0794, 0.1001, 0.1027, 0.1114],
        32768: [0.1348, 0.1991, 0.2117, 0.1871, 0.3612, 0.3637, 0.3727],
        131072: [0.3759, 0.6308, 0.6630, 0.7531, 1.2530, 1.2558, 1.2648],
        200000: [0.8194, 1.4116, 1.4824, 1.1871, 2.8555, 2.8596, 2.8734],
    },
}
PAPER_BATCH = {1024: 128, 4096: 32, 32768: 4, 131072: 1, 200000: 1}
LABEL = {"mha": "MHA", "gqa": "GQA", "mqa": "MQA", "sqa": "SQA", "ssqa": "sSQA", "xsqa": "xSQA",
         "xsmqa": "xSMQA", "lsqa": "lSQA", "rsqa": "rSQA", "mha@128": "SWA(128)",
         "mha@4096": "SWA(4096)", "sqa@128": "SW-SQA(128)"}

# (variant, baseline, what is held equal). The theory column is the head-count ratio.
MATCHED = [
    ("sqa", "gqa", "equal KV size (4 KV heads): 8 vs 16 query heads"),
    ("xsqa", "gqa", "equal KV size (4 KV heads): 4 vs 16 query heads"),
    ("ssqa", "sqa", "equal attention FLOPs (8 query heads): 8 vs 4 KV heads"),
    ("gqa", "mha", "equal attention FLOPs (16 heads): 4 vs 16 KV heads"),
    ("mqa", "mha", "equal attention FLOPs (16 heads): 1 vs 16 KV heads"),
    ("ssqa", "mha", "8/8 is an 8-head MHA of the same head dim: pure head count"),
    ("lsqa", "mha", "head count 12 vs 16"),
    ("xsqa", "mha", "head count 4 vs 16"),
    ("xsmqa", "mha", "head count 4 vs 16, 1 KV head"),
]
CRITERIA_SEQ = 200000
UNIFORM_BACKEND = "every row of a table on one backend family (profiled)"
PEAK_TARGET = 0.70


def label(v: str) -> str:
    return LABEL.get(v, v)


def _variant_order(v: str):
    order = list(LABEL)
    return (order.index(v) if v in order else len(order), v)


def _key(c: dict) -> tuple:
    return (c["part"], c["model"], c["mode"], c["family"], c["seq"], c["variant"])


def ok_index(cases: list[dict]) -> dict[tuple, dict]:
    return {_key(c): c for c in cases if c.get("status") == "ok"}


def add_speedups(cases: list[dict]) -> list[dict]:
    """Each ok case gains vs_mha / vs_gqa: the baseline's median time over its own, both from
    the same model, mode, backend family and length (so they ran on the same kind of kernel)."""
    idx = ok_index(cases)
    out = []
    for c in cases:
        c = dict(c)
        if c.get("status") == "ok":
            for base in ("mha", "gqa"):
                b = idx.get(_key(c)[:-1] + (base,))
                c[f"vs_{base}"] = b["seconds"] / c["seconds"] if b else None
        out.append(c)
    return out


def peak_used(result: dict) -> float:
    """The higher of the peaks measured before and after the cases: the stricter denominator."""
    p = result.get("matmul_peak_tflops", {})
    return max(v for v in (p.get("start"), p.get("end")) if v)


def tflops(c: dict) -> float:
    return c["step_flops"] / c["seconds"] / 1e12


def series_families(cases: list[dict]) -> dict[tuple, set]:
    """(part, model, mode, family) -> the kernel families the profiler saw across its rows."""
    fam: dict[tuple, set] = {}
    for c in cases:
        if c.get("kernel_family"):
            fam.setdefault(_key(c)[:4], set()).add(c["kernel_family"])
    return fam


def _expected_family(family: str, sdpa_force: Optional[str]) -> Optional[str]:
    if family == "flex":
        return "flex"
    if family.startswith("sdpa-"):
        return family
    return f"sdpa-{sdpa_force}" if sdpa_force and sdpa_force != "none" else None


def _crit(name, measured, target, passed, note="") -> dict:
    # N/A: this run did not measure it; INFO: measured, with no target to judge it against.
    status = ("N/A" if not measured else "INFO") if passed is None else (
        "PASS" if passed else "MISS")
    return {"name": name, "measured": measured or "not measured", "target": target,
            "status": status, "note": note or ""}


def criteria(result: dict, cases: list[dict]) -> list[dict]:
    idx = ok_index(cases)
    seqs = sorted({c["seq"] for c in cases})
    s = CRITERIA_SEQ if CRITERIA_SEQ in seqs else (max(seqs) if seqs else None)
    peak = peak_used(result)
    out = []

    def t(model, fam, v, seq=s, mode="forward", part="model"):
        c = idx.get((part, model, mode, fam, seq, v))
        return c["seconds"] if c else None

    for fam in ("sdpa", "flex"):
        for v, target in (("xsqa", 3.8), ("sqa", 1.9)):
            a, b = t("paper", fam, "mha"), t("paper", fam, v)
            sp = a / b if a and b else None
            out.append(_crit(f"{label(v)} speedup over MHA, paper model, forward, seq {s}, {fam}",
                             sp and f"{sp:.2f}x", f">= {target}x",
                             None if sp is None else sp >= target,
                             "ceiling = head ratio " + ("4x" if v == "xsqa" else "2x")))
    mha_paper = PAPER_TABLE3["rows"].get(s, [None] * 7)[-1]
    for fam in ("sdpa", "flex"):
        m = t("paper", fam, "mha")
        measured = m and (f"{m:.4f} s ({m / mha_paper:.2f}x the paper's)" if mha_paper
                          else f"{m:.4f} s")
        out.append(_crit(f"MHA absolute time, paper model, forward, seq {s}, {fam}", measured,
                         f"well under the paper's {mha_paper} s (<= 0.5x)" if mha_paper
                         else "the paper has no figure at this length",
                         None if not (m and mha_paper) else m <= 0.5 * mha_paper))
    for model in ("attn128", "attn64", "attn16"):
        per_seq = []
        for seq in [x for x in seqs if x >= 32768]:
            best = max(((c["step_flops"] / c["seconds"] / 1e12, c["family"])
                        for c in cases if c.get("status") == "ok" and c["part"] == "op"
                        and c["model"] == model and c["seq"] == seq and c["variant"] == "mha"),
                       default=None)
            if best:
                per_seq.append((seq, best[0] / peak, best[1]))
        worst = min(per_seq, default=None, key=lambda x: x[1])
        text = ", ".join(f"{q:,}: {p:.0%} ({f})" for q, p, f in per_seq) or None
        target = f">= {PEAK_TARGET:.0%} of {peak:.0f} TFLOP/s matmul peak at every seq >= 32k"
        out.append(_crit(f"MHA attention kernel, {model} (head dim {model[4:]}), best kernel",
                         text, target if model == "attn128" else "reported (no target)",
                         (worst[1] >= PEAK_TARGET if worst else None)
                         if model == "attn128" else None))
    swa, x_flex, x_sdpa = (t("paper", "flex", "mha@128"), t("paper", "flex", "xsqa"),
                           t("paper", "sdpa", "xsqa"))
    out.append(_crit(f"SWA(128) faster than xSQA, paper model, forward, seq {s}, both flex",
                     swa and x_flex and f"SWA {swa:.4f} s vs xSQA {x_flex:.4f} s",
                     "SWA faster", None if not (swa and x_flex) else swa < x_flex,
                     x_sdpa and swa and f"xSQA on SDPA ({x_sdpa:.4f} s): "
                     f"SWA {'faster' if swa < x_sdpa else 'slower'} across families" or ""))
    force = result.get("settings", {}).get("sdpa_kernel")
    fams = series_families(cases)
    mixed = [f"{'/'.join(map(str, k))}: {sorted(v)}" for k, v in fams.items()
             if len(v) != 1 or (_expected_family(k[3], force) not in (None, *v))]
    out.append(_crit(UNIFORM_BACKEND,
                     f"{len(fams) - len(mixed)}/{len(fams)} tables uniform", "all",
                     None if not fams else not mixed, "; ".join(mixed)))
    return out


def matched(cases: list[dict]) -> list[dict]:
    """Item 2: measured speedups for pairs that hold KV size or attention FLOPs equal, beside the
    head-count ratio and the FLOP ratio of what was timed (whole model, or the op alone)."""
    idx = ok_index(cases)
    rows = []
    for c in cases:
        if c.get("status") != "ok":
            continue
        for v, base, what in MATCHED:
            if c["variant"] != v:
                continue
            b = idx.get(_key(c)[:-1] + (base,))
            if not b:
                continue
            heads = max(b["n_q_heads"], b["n_kv_heads"]) / max(c["n_q_heads"], c["n_kv_heads"])
            rows.append(dict(part=c["part"], model=c["model"], mode=c["mode"],
                             family=c["family"], seq=c["seq"], variant=v, baseline=base,
                             matched=what, head_ratio=heads,
                             flop_ratio=b["step_flops"] / c["step_flops"],
                             measured=b["seconds"] / c["seconds"]))
    return rows


def analyse(result: dict) -> dict:
    cases = add_speedups(result["cases"])
    crit = criteria(result, cases)
    lines = ["criteria (measured on this run; targets from the issue):"]
    for k in crit:
        lines.append(f"  [{k['status']:4s}] {k['name']}: {k['measured']}  (target {k['target']})"
                     + (f"  -- {k['note']}" if k["note"] else ""))
    return {"cases": cases, "matched": matched(cases), "criteria": crit, "criteria_lines": lines,
            "matmul_peak_tflops": {**result["matmul_peak_tflops"], "used": peak_used(result)}}


# --- markdown --------------------------------------------------------------------------------

def _cell(c: Optional[dict], op: bool, peak: float) -> str:
    if c is None:
        return ""
    if c["status"] != "ok":
        return {"oom": "OOM", "skipped": "skipped", "error": "error"}.get(c["status"], c["status"])
    if op:
        return f"{c['seconds'] * 1e3:.3g} ms, {tflops(c):.3g} TF ({tflops(c) / peak:.0%})"
    sp = f", {c['vs_mha']:.2f}x" if c.get("vs_mha") else ""
    mem = f", {c['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in c else ""
    return f"{c['seconds']:.4f}{sp}{mem}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _paper_tables(cases, seqs) -> list[str]:
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
        out += _table(hdr, secs) + ["", f"**Speedup over MHA, paper / ours** ({fam}).", ""]
        out += _table(hdr, speed) + [""]
    return out


def render_markdown(result: dict, source: str = "", note: Optional[str] = None) -> str:
    """One run's section; `note` is a caveat about the run that its JSON cannot record."""
    if "criteria" not in result:          # a partial (killed) run: analyse what it has
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
         + "".join(f"; {m}: {st[m]}" for m in st.get("modes", []) if m not in ("forward", "train"))
         + f". {st['compiled']}. Model-level SDPA family: " +
         (f"forced to the `{st['sdpa_kernel']}` kernel so every head layout runs the same "
          "kernel." if st['sdpa_kernel'] != "none" else "torch's own kernel choice (recorded).")
         + " Attention FLOPs count causal pairs only. Flex rows are a subset of variants by "
         "default (each new shape compiles); see `settings` in the JSON."
         + (f" Log-log plot: `{result['plot']}`." if result.get("plot", "").endswith(".png")
            else ""), ""] + ([f"**Note on this run:** {note}", ""] if note else [])
    paper = _paper_tables(cases, seqs)
    if paper:
        L += ["### Beside the paper's Table 3 (paper's claim: A100 40GB; ours: the device above)",
              ""] + paper
    groups = sorted({(c["part"], c["model"], c["mode"], c["family"]) for c in cases},
                    key=lambda g: (g[0] != "model", g[1], g[2], g[3]))
    fams = series_families(cases)
    L += ["### All cases", "",
          "Model level: seconds per step, speedup over MHA of the same family, peak memory. "
          "Op level: the attention op alone (no projections), time, achieved TFLOP/s and % of "
          "the measured matmul peak.", ""]
    for g in groups:
        part, model, mode, family = g
        rows = []
        variants = sorted({c["variant"] for c in cases
                           if (c["part"], c["model"], c["mode"], c["family"]) == g},
                          key=_variant_order)
        by = {(c["seq"], c["variant"]): c for c in cases
              if (c["part"], c["model"], c["mode"], c["family"]) == g}
        for v in variants:
            rows.append([label(v)] + [_cell(by.get((s, v)), part == "op", peak) for s in seqs])
        kernels = sorted({k for c in cases if (c["part"], c["model"], c["mode"],
                          c["family"]) == g for k in c.get("kernels", [])})
        L += [f"**{model} · {mode} · {family}** — kernel family seen: "
              f"{', '.join(sorted(fams.get(g, {'not profiled'})))}"
              + (f" (`{'`, `'.join(k[:80] for k in kernels[:3])}`)" if kernels else ""), ""]
        L += _table(["variant"] + [f"{s:,}" for s in seqs], rows) + [""]
    L += _matched_md(result["matched"])
    measured = [k for k in result["criteria"] if k["status"] != "N/A"]
    unmeasured = [k["name"] for k in result["criteria"] if k["status"] == "N/A"]
    L += ["### Criteria (printed by the benchmark, measured in this run)", ""]
    L += _table(["criterion", "measured", "target", ""],
                [[k["name"], str(k["measured"]), k["target"], k["status"]]
                 for k in measured]) + [""]
    if unmeasured:
        L += ["Outside this run's grid: " + "; ".join(unmeasured) + ".", ""]
    L += _reading(measured, result["matched"], any(c["part"] == "op" for c in cases))
    return "\n".join(L) + "\n"


def _matched_md(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = ["### Matched comparisons: how much of a speedup is just fewer FLOPs", "",
           "Measured speedup of the variant over its baseline (same model, mode, family and "
           "length), beside the head-count ratio theory predicts for the attention op and the "
           "FLOP ratio of what was timed (for a whole model this includes projections and MLP, "
           "so it is below the head ratio). Measured / FLOP ratio near 1 means the speedup is "
           "the FLOP cut and nothing else.", ""]
    sources = sorted({(r["part"], r["model"], r["mode"], r["family"]) for r in rows},
                     key=lambda g: (g[0] != "model", g[1], g[2], g[3]))
    for src in sources:
        sub = {(r["variant"], r["baseline"], r["seq"]): r for r in rows
               if (r["part"], r["model"], r["mode"], r["family"]) == src}
        own = sorted({k[2] for k in sub})          # the lengths this table measured
        long_seqs = [s for s in own if s >= 32768] or own
        table = []
        for v, base, what in MATCHED:
            hits = [sub.get((v, base, s)) for s in long_seqs]
            if not any(hits):
                continue
            first = next(h for h in hits if h)
            table.append([f"{label(v)} vs {label(base)}", what, f"{first['head_ratio']:.2f}x",
                          f"{hits[-1]['flop_ratio']:.2f}x" if hits[-1] else "—"] +
                         [f"{h['measured']:.2f}x" if h else "—" for h in hits])
        out += [f"**{src[1]} · {src[2]} · {src[3]}**", ""]
        out += _table(["pair", "held equal", "head ratio", f"FLOP ratio ({long_seqs[-1]:,})"] +
                      [f"measured {s:,}" for s in long_seqs], table) + [""]
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


def _reading(crit: list[dict], matched_rows: list[dict], op_rows: bool = True) -> list[str]:
    out = ["### Reading", ""]
    for k in crit:
        verdict = {"PASS": "holds", "MISS": "does not hold", "N/A": "was not measured",
                   "INFO": "reported"}[
            k["status"]]
        out.append(f"- {k['name']}: {k['measured']} against {k['target']}: {verdict}."
                   + (f" {k['note']}." if k["note"] else ""))
    out += [] if not op_rows else [
            "- Why head dim 16 sits far below the matmul peak: each query-key pair costs "
            "4 x 16 = 64 matmul FLOPs but one exponential, so the softmax (special-function "
            "units), not the tensor cores, bounds the kernel; head dim 64 has 4x and 128 has 8x "
            "the FLOPs per exponential. The op-level rows give the measured rates."]
    out += _equal_flop_reading(matched_rows)
    out.append("")
    return out


def write_plot(result: dict, path: pathlib.Path) -> str:
    """Log-log seconds per step against length for the paper model, ours beside the paper's
    claims. matplotlib is optional: without it the plot is skipped and that is said."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped (matplotlib not installed)"
    cases = [c for c in result["cases"] if c["part"] == "model" and c["model"] == "paper"
             and c["status"] == "ok"]
    modes = sorted({c["mode"] for c in cases}, key=lambda m: (m != "forward", m))
    if not modes:
        return "skipped (no paper-model results)"
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5), squeeze=False)
    variants = list(dict.fromkeys(c["variant"] for c in cases))
    colors = {v: plt.cm.tab20(i % 20) for i, v in enumerate(variants)}
    for ax, mode in zip(axes[0], modes):
        for fam, style in (("sdpa", "-"), ("flex", "--")):
            for v in variants:
                pts = sorted((c["seq"], c["seconds"]) for c in cases
                             if c["mode"] == mode and c["family"] == fam and c["variant"] == v)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[v],
                            label=f"{label(v)} ({fam})")
        if mode == "forward":
            for i, v in enumerate(PAPER_TABLE3["columns"]):
                pts = sorted((s, row[i]) for s, row in PAPER_TABLE3["rows"].items())
                ax.plot(*zip(*pts), ":", marker="x", color=colors.get(v, "grey"), alpha=0.5,
                        label=f"{label(v)} (paper's claim)")
        ax.set(xscale="log", yscale="log", xlabel="sequence length (batch shrinks: paper's)",
               ylabel="seconds per step", title=f"paper model, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
