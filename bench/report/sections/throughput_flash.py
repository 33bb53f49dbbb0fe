"""What a throughput run says about FlashAttention-4 and memory: the op's share of the matmul peak
at long lengths, the realistic-width training step on flash over cuDNN with the loss of each,
where flash loses and whether `auto` avoids it there, and one layer's peak memory beside the
unfused layout. Nothing for runs that measured none of it, so older runs read as they did."""

from __future__ import annotations

from typing import Optional

from ..claims import FLASH_OP_PEAK, FLASH_SEQS, FLASH_TRAIN_CELLS, FLASH_TRAIN_SPEEDUP, \
    LOSS_RTOL, MEMORY_SEQ
from ..criteria import at_least, criterion
from ..markdown import label, table_lines, variant_order

TRAIN = ("train", "train-ckpt", "train-compiled", "train-ckpt-compiled")
# The training step judged at a length, first measured of: the trainer's own step (compiled, as
# `sqt train` runs on CUDA), the eager one, then the same with blocks recomputed (what fits where a
# plain step does not).
JUDGED_STEP = ("train-compiled", "train", "train-ckpt-compiled", "train-ckpt")
PASS_NAME = {"forward": "forward", "train": "forward+backward"}


def _index(cases: list[dict]) -> dict[tuple, dict]:
    return {(c["part"], c["model"], c["mode"], c["family"], c["seq"], c["variant"]): c
            for c in cases if c.get("status") == "ok"}


def baseline_family(part: str) -> str:
    """What flash is compared with: cuDNN, forced at the op level, the model's sdpa family (run
    on cuDNN by default) at the model level."""
    return "sdpa-cudnn" if part == "op" else "sdpa"


def pairs(cases: list[dict]) -> list[dict]:
    """Every flash case with its cuDNN twin of the same run (part, model, mode, length, variant):
    `ratio` is the cuDNN time over flash's (above 1: flash is faster)."""
    idx, out = _index(cases), []
    for key, c in idx.items():
        part, model, mode, family, seq, variant = key
        base = idx.get((part, model, mode, baseline_family(part), seq, variant))
        if family == "flash" and base is None and part == "op":
            base = idx.get((part, model, mode, "sdpa", seq, variant))
        if family == "flash" and base:
            out.append(dict(part=part, model=model, mode=mode, seq=seq, variant=variant,
                            flash=c, base=base, ratio=base["seconds"] / c["seconds"],
                            head_dim=c.get("head_dim")))
    return sorted(out, key=lambda p: (p["part"] != "model", p["model"], p["mode"],
                                      variant_order(p["variant"]), p["seq"]))


def _measured_something(cases: list[dict]) -> bool:
    return any(c.get("family") == "flash" or "layer_mem_mib" in c for c in cases)


def flash_criteria(result: dict, cases: list[dict], peak: float) -> list[dict]:
    if not _measured_something(cases):
        return []
    idx, found = _index(cases), pairs(cases)
    lo, hi = FLASH_SEQS[0], FLASH_SEQS[-1]
    out = []
    for hd, targets in FLASH_OP_PEAK.items():
        for mode, target in targets.items():
            rows = []
            for seq in sorted({c["seq"] for c in cases if lo <= c["seq"] <= hi}):
                c = idx.get(("op", f"attn{hd}", mode, "flash", seq, "mha"))
                if c:
                    base = idx.get(("op", f"attn{hd}", mode, "sdpa-cudnn", seq, "mha"))
                    rows.append((seq, _tflops(c) / peak, base and _tflops(base) / peak))
            text = ", ".join(f"{s:,}: {f:.0%}" + (f" (cuDNN {b:.0%})" if b else "")
                             for s, f, b in rows)
            out.append(criterion(
                f"FlashAttention-4 op, head dim {hd}, causal MHA, {PASS_NAME[mode]}, "
                f"{lo // 1000}k-{hi // 1000}k: share of the matmul peak", text or None,
                f">= {target:.0%} of {peak:.0f} TFLOP/s at every length",
                at_least(min((f for _, f, _ in rows), default=None), target)))
    for model in FLASH_TRAIN_CELLS["models"]:
        for variant in FLASH_TRAIN_CELLS["variants"]:
            out.append(_training_criterion(found, model, variant))
    out += _memory_criteria(cases)
    auto = _auto_criterion(result, found)
    return out + ([auto] if auto else [])


def _tflops(c: dict) -> float:
    return c["step_flops"] / c["seconds"] / 1e12


def _loss_gap(p: dict) -> Optional[float]:
    a, b = p["flash"].get("first_step_loss"), p["base"].get("first_step_loss")
    return None if a is None or b is None else abs(a - b) / abs(b)


def _training_criterion(found: list[dict], model: str, variant: str) -> dict:
    """The training step at each judged length (JUDGED_STEP's first that both families ran),
    with the most that step could gain from attention alone where both were profiled."""
    rows = []
    for seq in FLASH_SEQS:
        at = {p["mode"]: p for p in found if p["part"] == "model" and p["model"] == model
              and p["variant"] == variant and p["seq"] == seq and p["mode"] in TRAIN}
        p = next((at[m] for m in JUDGED_STEP if m in at), None)
        if p:
            rows.append(p)
    text = "; ".join(
        f"{p['seq']:,} ({p['mode']}): {p['ratio']:.2f}x"
        + (f", loss {p['flash']['first_step_loss']:.5f} vs {p['base']['first_step_loss']:.5f}"
           if _loss_gap(p) is not None else ", loss not recorded")
        + (f" ({_ceiling_text(c)})" if (c := attention_ceiling(p)) else "") for p in rows)
    same_loss = all(_loss_gap(p) is not None and _loss_gap(p) <= LOSS_RTOL for p in rows)
    fast = at_least(min((p["ratio"] for p in rows), default=None), FLASH_TRAIN_SPEEDUP)
    verdict = None if fast is None else fast and same_loss
    missing = [s for s in FLASH_SEQS if s not in {p["seq"] for p in rows}]
    if rows and missing:
        text += "; " + ", ".join(f"{s:,}" for s in missing) + " not measured in this run"
        verdict = None if verdict else verdict    # a miss stands; a pass needs every length
    return criterion(
        f"{model} {label(variant)} training step, flash over cuDNN, "
        + " and ".join(f"{s // 1000}k" for s in FLASH_SEQS), text or None,
        f">= {FLASH_TRAIN_SPEEDUP:.2f}x, first-step loss within {LOSS_RTOL:.2g} (relative)",
        verdict)


def attention_ceiling(p: dict) -> Optional[dict]:
    """What a step could gain if only its attention kernels changed (Amdahl): from the profiled
    kernel times of the cuDNN step (every kernel, attention's) and of the flash step (attention's).
    None unless both steps were profiled."""
    base, fl = p["base"], p["flash"]
    if not all(c.get("attention_kernel_ms") for c in (base, fl)) or not base.get("kernel_ms"):
        return None
    share = base["attention_kernel_ms"] / base["kernel_ms"]
    kernel_ratio = base["attention_kernel_ms"] / fl["attention_kernel_ms"]
    rest = base["kernel_ms"] - base["attention_kernel_ms"]
    return {"share": share, "kernel_ratio": kernel_ratio,
            "ceiling": base["kernel_ms"] / (rest + fl["attention_kernel_ms"])}


def _ceiling_text(c: dict) -> str:
    return (f"attention {c['share']:.0%} of the cuDNN step's kernel time, its kernels "
            f"{c['kernel_ratio']:.2f}x faster on flash: {c['ceiling']:.2f}x if only they changed")


def _memory_rows(cases: list[dict], modes) -> list[tuple]:
    return [(c, c["layer_mem_mib"]) for c in cases if c.get("status") == "ok"
            and c["part"] == "model" and c["seq"] == MEMORY_SEQ and c["mode"] in modes
            and "sqt" in c.get("layer_mem_mib", {})]


def _memory_criteria(cases: list[dict]) -> list[dict]:
    out = []
    for modes, what in ((("forward",), "forward"), (TRAIN, "training step")):
        rows = _memory_rows(cases, modes)
        worst = max(rows, key=lambda r: r[1]["sqt"] / r[1]["unfused"], default=None)
        text = worst and (
            f"worst fused/unfused {worst[1]['sqt'] / worst[1]['unfused']:.2f} ("
            f"{worst[0]['model']} {label(worst[0]['variant'])} {worst[0]['family']}: "
            f"{worst[1]['sqt']:.0f} vs {worst[1]['unfused']:.0f} MiB) over {len(rows)} cases")
        judged = modes == ("forward",)
        out.append(criterion(
            f"One layer's {what} peak memory at {MEMORY_SEQ:,} tokens, fused Q/K/V beside the "
            "unfused layout", text, "<= the unfused layout's" if judged else "reported",
            (all(r[1]["sqt"] <= r[1]["unfused"] for r in rows) if rows else None)
            if judged else None))
    return out


def auto_would_pick(table: dict, head_dim, mode: str, seq: int) -> bool:
    """What sqt.kernels.AUTO_FLASH, as the run recorded it, picks for this cell."""
    win = table.get(str(head_dim)) or {}
    least = win.get("min_seq_train" if mode in TRAIN else "min_seq_forward")
    return bool(least) and seq >= least


def _auto_criterion(result: dict, found: list[dict]) -> Optional[dict]:
    table = result.get("settings", {}).get("auto_flash")
    if table is None or not found:
        return None
    # auto chooses flash only for full causal layers: windowed rows do not count.
    lost = [p for p in found if p["ratio"] < 1.0 and "@" not in p["variant"]]
    wrong = [p for p in lost if auto_would_pick(table, p["head_dim"], p["mode"], p["seq"])]
    return criterion(
        "auto never picks flash where it lost to cuDNN in this run (full causal rows)",
        f"{len(lost)} cells slower on flash; auto picks flash in {len(wrong)}"
        + (": " + ", ".join(_where(p) for p in wrong) if wrong else ""),
        "0 such cells", not wrong,
        "the table is sqt.kernels.AUTO_FLASH as this run recorded it")


def _where(p: dict) -> str:
    return f"{p['model']} {p['mode']} {label(p['variant'])} {p['seq']:,} ({p['ratio']:.2f}x)"


def flash_md(cases: list[dict]) -> list[str]:
    """The flash-over-cuDNN table, where flash loses, and the layer memory table."""
    if not _measured_something(cases):
        return []
    found, out = pairs(cases), []
    if found:
        seqs = sorted({p["seq"] for p in found})
        by = {(p["part"], p["model"], p["mode"], p["variant"], p["seq"]): p for p in found}
        rows = []
        for key in dict.fromkeys(k[:4] for k in by):
            rows.append([" · ".join(key[:3]) + f" · {label(key[3])}"]
                        + [_ratio_cell(by.get(key + (s,))) for s in seqs])
        out += ["### FlashAttention-4 beside cuDNN", "",
                "cuDNN's time over flash's, same run, model, mode, length and variant (above "
                "1: flash is faster); op rows against SDPA forced to cuDNN, model rows against "
                "the sdpa family. Training rows add the first step's loss on each (same weights "
                "and batch).", ""]
        out += table_lines(["case"] + [f"{s:,}" for s in seqs], rows) + [""]
        lost = [p for p in found if p["ratio"] < 1.0]
        out += ["Where flash loses: " + ("; ".join(_where(p) for p in lost) if lost else
                                          "nowhere in this run") + ". At head dim 16 FA4's "
                "backward is wrong, so this benchmark runs no flash training there.", ""]
    out += _memory_md(cases)
    return out


def _ratio_cell(p: Optional[dict]) -> str:
    if p is None:
        return ""
    gap = _loss_gap(p)
    return f"{p['ratio']:.2f}x" + (f", loss Δ {gap:.1e}" if gap is not None else "")


def _memory_md(cases: list[dict]) -> list[str]:
    rows = [c for c in cases if c.get("status") == "ok" and "sqt" in c.get("layer_mem_mib", {})]
    if not rows:
        return []
    seqs = sorted({c["seq"] for c in rows})
    by = {(c["model"], c["mode"], c["family"], c["variant"], c["seq"]): c["layer_mem_mib"]
          for c in rows}
    table = [[" · ".join(k[:3]) + f" · {label(k[3])}"]
             + [(f"{m['sqt']:.0f} / {m['unfused']:.0f}" if (m := by.get(k + (s,))) else "")
                for s in seqs] for k in dict.fromkeys(k[:4] for k in by)]
    return ["### One layer's peak memory beside the unfused layout", "",
            "MiB above weights and input, fused / unfused: sqt's layer (one Q/K/V matmul, RoPE "
            "in place) and the same layer with the same weights written plainly (three "
            "matmuls, RoPE into new tensors), with the case's attention op; forward rows in "
            "inference mode, training rows forward and backward.", ""] \
        + table_lines(["case"] + [f"{s:,}" for s in seqs], table) + [""]
