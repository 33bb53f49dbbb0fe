"""What a throughput JSON means: speedups (always two timings of one run, same model, mode,
backend family and length), the matched comparisons, the matmul peak a run is judged against,
and its criteria."""

from __future__ import annotations

from typing import Optional

from ..claims import MHA_TIME_OF_PAPER, PAPER_TABLE3, PEAK_FRACTION, SPEEDUP_OVER_MHA, \
    THROUGHPUT_SEQ
from ..criteria import at_least, at_most, criterion
from ..markdown import label
from .throughput_flash import flash_criteria

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
UNIFORM_BACKEND = "every row of a table on one backend family (profiled)"
HEAD_CEILING = {"xsqa": "4x", "sqa": "2x"}


def case_key(c: dict) -> tuple:
    return (c["part"], c["model"], c["mode"], c["family"], c["seq"], c["variant"])


def ok_index(cases: list[dict]) -> dict[tuple, dict]:
    return {case_key(c): c for c in cases if c.get("status") == "ok"}


def add_speedups(cases: list[dict]) -> list[dict]:
    """Each ok case gains vs_mha / vs_gqa: the baseline's median time over its own, both from
    the same model, mode, backend family and length (so they ran on the same kind of kernel)."""
    idx = ok_index(cases)
    out = []
    for c in cases:
        c = dict(c)
        if c.get("status") == "ok":
            for base in ("mha", "gqa"):
                b = idx.get(case_key(c)[:-1] + (base,))
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
            fam.setdefault(case_key(c)[:4], set()).add(c["kernel_family"])
    return fam


def _expected_family(family: str, sdpa_force: Optional[str]) -> Optional[str]:
    if family in ("flex", "flash"):
        return family
    if family.startswith("sdpa-"):
        return family
    return f"sdpa-{sdpa_force}" if sdpa_force and sdpa_force != "none" else None


def criteria(result: dict, cases: list[dict]) -> list[dict]:
    idx = ok_index(cases)
    seqs = sorted({c["seq"] for c in cases})
    s = THROUGHPUT_SEQ if THROUGHPUT_SEQ in seqs else (max(seqs) if seqs else None)
    peak = peak_used(result)
    out = []

    def t(model, fam, v, seq=s, mode="forward", part="model"):
        c = idx.get((part, model, mode, fam, seq, v))
        return c["seconds"] if c else None

    for fam in ("sdpa", "flex"):
        for v, target in SPEEDUP_OVER_MHA.items():
            a, b = t("paper", fam, "mha"), t("paper", fam, v)
            sp = a / b if a and b else None
            out.append(criterion(f"{label(v)} speedup over MHA, paper model, forward, seq {s}, "
                                 f"{fam}", sp and f"{sp:.2f}x", f">= {target}x",
                                 at_least(sp, target), f"ceiling = head ratio {HEAD_CEILING[v]}"))
    mha_paper = PAPER_TABLE3["rows"].get(s, [None] * 7)[-1]
    for fam in ("sdpa", "flex"):
        m = t("paper", fam, "mha")
        measured = m and (f"{m:.4f} s ({m / mha_paper:.2f}x the paper's)" if mha_paper
                          else f"{m:.4f} s")
        out.append(criterion(f"MHA absolute time, paper model, forward, seq {s}, {fam}", measured,
                             f"well under the paper's {mha_paper} s (<= {MHA_TIME_OF_PAPER}x)"
                             if mha_paper else "the paper has no figure at this length",
                             at_most(m, MHA_TIME_OF_PAPER * mha_paper) if m and mha_paper
                             else None))
    for model in ("attn128", "attn64", "attn16"):
        per_seq = []
        for seq in [x for x in seqs if x >= 32768]:
            best = max(((tflops(c), c["family"]) for c in cases
                        if c.get("status") == "ok" and c["part"] == "op"
                        and c.get("mode", "forward") == "forward"
                        and c["model"] == model and c["seq"] == seq and c["variant"] == "mha"),
                       default=None)
            if best:
                per_seq.append((seq, best[0] / peak, best[1]))
        worst = min(per_seq, default=None, key=lambda x: x[1])
        text = ", ".join(f"{q:,}: {p:.0%} ({f})" for q, p, f in per_seq) or None
        target = (f">= {PEAK_FRACTION:.0%} of {peak:.0f} TFLOP/s matmul peak at every "
                  "seq >= 32k")
        judged = model == "attn128"
        out.append(criterion(f"MHA attention kernel, {model} (head dim {model[4:]}), best kernel",
                             text, target if judged else "reported (no target)",
                             at_least(worst and worst[1], PEAK_FRACTION) if judged else None))
    swa, x_flex, x_sdpa = (t("paper", "flex", "mha@128"), t("paper", "flex", "xsqa"),
                           t("paper", "sdpa", "xsqa"))
    out.append(criterion(f"SWA(128) faster than xSQA, paper model, forward, seq {s}, both flex",
                         swa and x_flex and f"SWA {swa:.4f} s vs xSQA {x_flex:.4f} s",
                         "SWA faster", None if not (swa and x_flex) else swa < x_flex,
                         x_sdpa and swa and f"xSQA on SDPA ({x_sdpa:.4f} s): "
                         f"SWA {'faster' if swa < x_sdpa else 'slower'} across families" or ""))
    force = result.get("settings", {}).get("sdpa_kernel")
    fams = series_families(cases)
    mixed = [f"{'/'.join(map(str, k))}: {sorted(v)}" for k, v in fams.items()
             if len(v) != 1 or (_expected_family(k[3], force) not in (None, *v))]
    out.append(criterion(UNIFORM_BACKEND, f"{len(fams) - len(mixed)}/{len(fams)} tables uniform",
                         "all", None if not fams else not mixed, "; ".join(mixed)))
    return out + flash_criteria(result, cases, peak)


def matched(cases: list[dict]) -> list[dict]:
    """Measured speedups for pairs that hold KV size or attention FLOPs equal, beside the
    head-count ratio and the FLOP ratio of what was timed (whole model, or the op alone)."""
    idx = ok_index(cases)
    rows = []
    for c in cases:
        if c.get("status") != "ok":
            continue
        for v, base, what in MATCHED:
            if c["variant"] != v:
                continue
            b = idx.get(case_key(c)[:-1] + (base,))
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
    """Everything a run's section needs beyond its measurements, derived from its cases alone."""
    cases = add_speedups(result["cases"])
    return {"cases": cases, "matched": matched(cases), "criteria": criteria(result, cases),
            "matmul_peak_tflops": {**result["matmul_peak_tflops"], "used": peak_used(result)}}


def criteria_lines(found: list[dict]) -> list[str]:
    """The criteria as the console shows them after a run."""
    return ["criteria (measured on this run; targets from the issue):"] + [
        f"  [{k['status']:4s}] {k['name']}: {k['measured']}  (target {k['target']})"
        + (f"  -- {k['note']}" if k["note"] else "") for k in found]
