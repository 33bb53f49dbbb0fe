"""The report's cross-run summaries, on synthetic sweep summaries: which run each row comes from,
what it is compared with, and when a step time may be shown."""

from pathlib import Path

from bench import decode, report


def stat(mean, std=0.0):
    return {"mean": mean, "std": std, "n": 3}


def row(size, variant, ppl, std=0.001, ms=1.0):
    return {"size": size, "variant": variant, "params": 1e6, "best_val_loss": stat(1.5, 0.01),
            "best_val_ppl": stat(ppl, std), "best_val_acc": stat(0.5), "ms_per_step": stat(ms),
            "tokens_per_s": stat(1e6), "mfu": stat(0.1), "seeds": 3}


def summary(rows, seeds=3, jobs=8, slots=None, variants=None, wall=None):
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    rec = {"jobs": jobs, "device_slots": slots, "device": "GPU", "device_type": "cuda",
           "matmul_peak_tflops": 700.0}
    if wall is not None:
        rec.update(total_wall_s=wall, wall_from="process start")
    return {"steps": 2000, "batch_size": 64, "seq_len": 256, "seeds": seeds, "sizes": sizes,
            "variants": variants or list(dict.fromkeys(r["variant"] for r in rows)),
            "rows": rows, "run_record": rec}


def test_grid_takes_each_row_from_the_newest_sweep_and_its_own_baseline():
    old = summary([row("tiny", "mha", 5.0), row("tiny", "sqt", 6.0)])
    new = summary([row("tiny", "mha", 4.0), row("tiny", "sqa", 4.4)], slots=1)
    text = report.quality_grid([(old, Path("sweep/20260101-old/summary.json")),
                                (new, Path("sweep/20260102-new/summary.json"))])
    lines = {ln.split("|")[2].strip(): ln for ln in text.splitlines() if ln.startswith("| tiny")}
    assert "20260102-new" in lines["mha"] and "20260101-old" in lines["sqt"]
    assert "+10.0 %" in lines["sqa"] and "+20.0 %" in lines["sqt"]   # each against its own mha
    assert "shared" in lines["sqt"] and "shared" not in lines["sqa"]  # time-sliced vs one slot
    assert "sqa +10.0 %" in text and "sqt +20.0 %" in text            # beyond twice the spread


def test_grid_ignores_single_seed_or_short_sweeps():
    one_seed = summary([row("tiny", "mha", 5.0)], seeds=1)
    short = {**summary([row("tiny", "mha", 5.0)]), "steps": 200}
    assert report.quality_grid([(one_seed, Path("a/summary.json")),
                                (short, Path("b/summary.json"))]) is None


def test_seed_sweep_speed_judges_the_newest_timed_seed_sweep():
    rows = [row(s, v, 4.0) for s in ("tiny", "small", "medium") for v in ("mha", "sqt")]
    slow = summary(rows, seeds=1, jobs=6, wall=97.0)
    fast = summary(rows, seeds=1, jobs=6, slots=1, wall=86.0)
    text = report.seed_sweep_speed([(fast, Path("sweep/2-fast/summary.json")),
                                    (slow, Path("sweep/1-slow/summary.json"))])
    assert "**86.0 s**" in text and "meets" in text and "ms / train step" in text
    text = report.seed_sweep_speed([(slow, Path("sweep/1-slow/summary.json"))])
    assert "misses" in text and "ms / train step" not in text   # shared step times not shown


def test_decode_verdict_needs_sqt_faster_over_every_round():
    def pair(size, lo, mid, hi):
        return {"size": size, "batch": 1,
                "engine": {"ratio_min": lo, "ratio_median": mid, "ratio_max": hi}}
    text = decode.sqt_verdict([pair("tiny", 1.02, 1.05, 1.08), pair("small", 0.97, 1.0, 1.03)],
                              [])
    assert "does not hold" in text and "slower over every round at: tiny b1" in text
    text = decode.sqt_verdict([pair("tiny", 0.85, 0.9, 0.95)], [])
    assert "Faster over every round at: tiny b1" in text and "does not hold" not in text


def test_paper_dense_table_compares_changes_against_each_studys_own_mha():
    base = row("medium", "mha", 4.0, ms=5.0)
    sqa = row("medium", "sqa", 4.08, ms=4.0)
    isolated = summary([base, sqa], slots=1)
    chosen = {("medium", "mha"): (base, base, isolated, Path("s/summary.json")),
              ("medium", "sqa"): (sqa, base, isolated, Path("s/summary.json"))}
    lines = {ln.split("|")[1].strip(): ln
             for ln in report.paper_dense_table(chosen, ["medium"]).splitlines()
             if ln.startswith("| ")}
    # The paper's SQA: loss 1.2272 vs MHA 1.1976 -> exp(0.0296) = +3.0 % ppl; 241 vs 269 min.
    assert "| +3.0 % | -10.4 % | -0.38 |" in lines["sqa"]
    assert "+2.0 % / -20.0 %" in lines["sqa"]                 # ours: ppl and ms per step
    assert lines["gqa"].rstrip().endswith("| — |")            # not trained here: no cell
    shared = {**chosen, ("medium", "sqa"): (sqa, base, summary([base, sqa]), Path("t"))}
    assert "+2.0 % / shared" in report.paper_dense_table(shared, ["medium"])
