"""The decode section (bench.decode's newest JSON): engine vs eager loop vs Hugging Face per
token, K/V-cache size against the bytes-moved bound, the criteria, and whether the seed's SQT
inference claim survives once launch overhead is gone."""

from __future__ import annotations

from typing import Optional

from ..claims import DECODE_TARGETS, SEED_CLAIM
from ..criteria import at_least, at_most, criterion, word
from ..markdown import table_lines, us
from ..sources import load_json, newest


def section(ctx) -> Optional[str]:
    path = newest(ctx.results, "decode_*.json")
    if path is None:
        return None
    return render_markdown(load_json(path, made_by="bench.decode"), str(path))


def _find(rows, **kw):
    for row in rows:
        if all(row.get(k) == v for k, v in kw.items()):
            return row
    return None


def criteria(res: dict) -> list[dict]:
    """The judged figures of a run: the small model's per-token latency at batch 1 on the
    engine, and its speedup over Hugging Face generate at the same context."""
    small = _find(res.get("cases", []), size="small", variant="mha", batch=1, status="ok")
    if not small:
        return []
    limit, floor = DECODE_TARGETS["small_b1_us_per_token"], DECODE_TARGETS["speedup_vs_hf"]
    value = small["engine"]["median_ms"] * 1e3
    out = [criterion("small, batch 1", f"{value:.1f} µs/token", f"≤ {limit:.0f}",
                     at_most(value, limit))]
    hf = _find(res.get("hf", []), size="small", batch=1, context=small["context"])
    if hf:
        sp = hf["hf"]["median_ms"] / small["engine"]["median_ms"]
        out.append(criterion("vs Hugging Face generate", f"{sp:.2f}x", f"≥ {floor:.0f}x",
                             at_least(sp, floor)))
    return out


def eager_loop_speedup(res: dict) -> Optional[float]:
    """How much faster the engine decodes than our eager loop (small, batch 1): reported, no
    target."""
    small = _find(res.get("cases", []), size="small", variant="mha", batch=1, status="ok")
    if not small or "eager" not in small:
        return None
    return small["eager"]["median_ms"] / small["engine"]["median_ms"]


def seed_claim(size: str) -> str:
    return SEED_CLAIM["rows"].get(size, {}).get("inference", "no figure")


def kv_size_lines(res: dict, size: str = "large", batch: int = 64, ctx: int = 4096) -> list:
    """How K/V-cache size moves tokens/s where decoding is bandwidth-bound: the larger model at
    a long context and a large batch, against the bytes-moved bound of each variant."""
    rows = [r for r in res.get("cases", []) if r.get("status") == "ok" and r["size"] == size
            and r["batch"] == batch and r["context"] == ctx]
    if not rows:
        return []
    rows.sort(key=lambda r: -r["kv_bytes_per_token"])
    base = rows[0]["engine"]["tokens_per_s"]
    cells = [[r["variant"], str(r["kv_bytes_per_token"]), f"{r['engine']['tokens_per_s']:.0f}",
              f"{r['engine']['tokens_per_s'] / base:.2f}x",
              us(r.get("bound", {}).get("ms_per_token")), us(r["engine"]["median_ms"]),
              f"{r.get('bound', {}).get('fraction_of_bound', 0) * 100:.0f}%"] for r in rows]
    return ["", f"### K/V-cache size and decode throughput ({size}, batch {batch}, context {ctx})",
            ""] + table_lines(["variant", "KV bytes / token", "tokens/s", "vs largest cache",
                               "bytes-moved bound µs/token", "measured µs/token", "% of bound"],
                              cells)


def fallback_lines(res: dict) -> list:
    """Rows marked compiled whose profiled step launched clearly more kernels than the fewest any
    compiled row of that size launched: their step most likely ran uncompiled (dynamo stops
    compiling a function after its recompile limit and runs it eagerly, without an error)."""
    flagged = []
    for size in {r["size"] for r in res.get("cases", [])}:
        rows = [r for r in res["cases"] if r["size"] == size and r.get("compiled")
                and isinstance(r.get("kernels"), dict) and r["kernels"].get("per_step")]
        if len(rows) < 2:
            continue
        least = min(r["kernels"]["per_step"] for r in rows)
        flagged += [(r, least) for r in rows if r["kernels"]["per_step"] > 1.15 * least]
    if not flagged:
        return []
    names = ", ".join(f"{r['size']} {r['variant']} b{r['batch']} ({r['kernels']['per_step']:.0f} "
                      f"vs {least:.0f} kernels/step)" for r, least in flagged)
    return ["", f"**Caution:** rows marked compiled whose profiled step launched clearly more "
            f"kernels than the leanest compiled row of their size most likely ran uncompiled "
            f"(dynamo's recompile limit): {names}. Their timings, and SQT-vs-MHA ratios at a "
            "compiled size that involve them, compare a compiled step with an uncompiled one."]


def pair_lines(res: dict) -> list[str]:
    """SQT against MHA from the alternating rounds, beside what the seed claims for that size."""
    lines = []
    for p in res.get("sqt_vs_baseline", []):
        compiled = " (compiled step)" if p.get("compiled") else ""
        for k in ("engine", "eager"):
            if k in p:
                q = p[k]
                how = (f"SQT {q['sqt_faster_pct']:.1f}% faster" if q["sqt_faster_pct"] >= 0
                       else f"SQT {-q['sqt_faster_pct']:.1f}% slower")
                lines.append(f"- SQT vs MHA, {p['size']}, batch {p['batch']}, {k}"
                             f"{compiled if k == 'engine' else ''}: {how} (SQT/MHA time "
                             f"{q['ratio_median']:.3f}, range {q['ratio_min']:.3f}–"
                             f"{q['ratio_max']:.3f} over {q['rounds']} rounds); the seed claims "
                             f"{seed_claim(p['size'])}.")
    return lines


def render_markdown(res: dict, source: str = "") -> str:
    rec = res.get("run_record", {})
    lines = ["## Decode: engine vs eager loop vs Hugging Face", "",
             f"Source: `{source}`. Device: {rec.get('device')}; torch {rec.get('torch')}; "
             f"{res.get('dtype')}; copy bandwidth {res.get('copy_bandwidth_gbs', 0):.0f} GB/s. "
             "Per-token latency in µs (median); context = cache length at the end of the timed "
             "tokens. Method: see the JSON's `method`.", ""]
    hf = {(h["size"], h["batch"], h["context"]): h["hf"]["median_ms"] for h in res.get("hf", [])}
    # Written row by row, not with markdown.table_lines: a skipped row's empty cells are "| |".
    lines += ["| size | variant | batch | context | compiled | engine µs/tok | tok/s | "
              "eager µs/tok | HF µs/tok | KV B/token | % of bytes bound | prefill ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.get("cases", []):
        if r.get("status") != "ok":
            lines.append(f"| {r['size']} | {r['variant']} | {r['batch']} | {r['context']} | | "
                         f"{r.get('status')} | | | | {r['kv_bytes_per_token']} | | |")
            continue
        hf_ms = hf.get((r["size"], r["batch"], r["context"])) if r["variant"] == "mha" else None
        bound = f"{r['bound']['fraction_of_bound'] * 100:.0f}%" if "bound" in r else "–"
        prefill = f"{r['prefill']['median_ms']:.2f}" if "prefill" in r else "–"
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['batch']} | {r['context']} | "
            f"{'yes' if r.get('compiled') else 'no'} | "
            f"{us(r['engine']['median_ms'])} | {r['engine']['tokens_per_s']:.0f} | "
            f"{us(r.get('eager', {}).get('median_ms'))} | {us(hf_ms)} | "
            f"{r['kv_bytes_per_token']} | {bound} | {prefill} |")
    if res.get("hf_status"):
        lines += ["", f"Hugging Face: {res['hf_status']}."]
    lines += kv_size_lines(res) + fallback_lines(res)
    lines += ["", "### Criteria", ""]
    lines += [f"- {k['name']}: {k['measured']} (target {k['target']}): {word(k)}."
              for k in criteria(res)]
    lines += pair_lines(res)
    verdict = sqt_verdict(res.get("sqt_vs_baseline", []), res.get("cases", []))
    if verdict:
        lines += ["", verdict]
    if res.get("skipped"):
        lines += ["", f"Skipped: {len(res['skipped'])} case(s) (see the JSON)."]
    return "\n".join(lines) + "\n"


def sqt_verdict(pairs: list[dict], rows: list[dict]) -> Optional[str]:
    """Whether the seed's SQT speedup survives once launch overhead is gone, read from the
    engine's alternating rounds: the claim holds only where SQT's whole range is faster; with
    the kernels each profiled step launched, where the run has them."""
    engine = [(p["size"], p["batch"], p["engine"]) for p in pairs if "engine" in p]
    if not engine:
        return None
    faster = [f"{s} b{b}" for s, b, q in engine if q["ratio_max"] < 1]
    slower = [f"{s} b{b}" for s, b, q in engine if q["ratio_min"] > 1]
    pct = [(1 - q["ratio_median"]) * 100 for _, _, q in engine]
    text = (f"**Reading.** On the engine (CUDA graphs, no launch overhead), SQT's median decode "
            f"time ranges from {-max(pct):+.1f} % to {-min(pct):+.1f} % against MHA "
            f"(negative: faster). Faster over every round at: {', '.join(faster) or 'none'}; "
            f"slower over every round at: {', '.join(slower) or 'none'}.")
    if not faster:
        text += " The seed's 8–16 % speedup does not hold once launch overhead is gone."
    counts = [(r["size"], r["variant"], r["kernels"]["per_step"]) for r in rows
              if r.get("batch") == 1 and r.get("variant") in ("mha", "sqt")
              and (r.get("kernels") or {}).get("per_step")]
    n: dict = {}
    for sz, v, k in counts:            # rows run shortest context first: keep that one
        n.setdefault((sz, v), k)
    sizes = list(dict.fromkeys(sz for sz, v in n if v == "mha" and (sz, "sqt") in n))
    if sizes:
        text += (" Kernels per profiled step at batch 1, MHA vs SQT: " + ", ".join(
            f"{sz} {n[(sz, 'mha')]:.0f} vs {n[(sz, 'sqt')]:.0f}" for sz in sizes)
            + "; a static query drops one slice of the fused Q/K/V matmul but adds its "
            "table lookup, and at these sizes a step's time follows its kernels, not its FLOPs.")
    return text
