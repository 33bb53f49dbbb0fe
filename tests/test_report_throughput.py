"""The throughput sections, on synthetic runs: which run each cell comes from, that a speedup
never divides timings of two runs, that criteria follow the timings, how criteria are tallied
across runs, and the paper's Table 3 beside ours."""

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from bench.report.claims import SPEEDUP_OVER_MHA
from bench.report.sections.throughput import (criteria_across_runs, family_reading, glance,
                                              merged_cases, width_reading)
from bench.report.sections.throughput_analysis import UNIFORM_BACKEND, add_speedups, analyse, \
    criteria
from bench.report.sections.throughput_run import render_markdown


def case(variant, seconds=None, status="ok", seq=4096, batch=32, family="sdpa", model="paper"):
    c = dict(part="model", model=model, mode="forward", family=family, seq=seq, batch=batch,
             variant=variant, status=status, n_q_heads=16, n_kv_heads=16, step_flops=1e12)
    if seconds is not None:
        c["seconds"] = seconds
    return c


def run(name, cases, criteria=()):
    return (Path(f"throughput_{name}.json"),
            {"cases": cases, "criteria": list(criteria),
             "matmul_peak_tflops": {"start": 100.0, "end": 100.0}})


OLD = run("20260101T100000Z", [case("mha", 4.0), case("sqa", 2.0), case("xsqa", 1.6),
                               case("gqa", 3.0)])
NEW = run("20260102T100000Z", [case("sqa", 1.0), case("xsqa", 1.0), case("mha", 8.0, seq=8192),
                               case("gqa", status="oom"), case("mqa", status="oom"),
                               case("lsqa", status="skipped")])


def cells():
    return {(c["variant"], c["seq"]): c for c in merged_cases([NEW, OLD])}


def test_newest_run_with_its_own_baseline_wins_and_speedups_stay_inside_a_run():
    got = cells()
    # The newer run timed sqa and xsqa without an MHA at that length: the older run, which has
    # its baseline, supplies them, and the ratio is that run's (4.0 / 2.0), never 4.0 / 1.0.
    assert got[("sqa", 4096)]["run"] == OLD[0].name and got[("sqa", 4096)]["vs_mha"] == 2.0
    assert got[("xsqa", 4096)]["vs_mha"] == 2.5
    assert got[("mha", 8192)]["run"] == NEW[0].name


def test_out_of_memory_shows_only_where_no_run_fit_and_budget_skips_vanish():
    got = cells()
    assert got[("gqa", 4096)]["status"] == "ok"            # an older run fit it
    assert got[("mqa", 4096)]["status"] == "oom"
    assert ("lsqa", 4096) not in got


def test_glance_names_the_run_of_every_cell():
    text = glance([NEW, OLD], figure_dir=None)
    assert "`0101T1000` = `throughput_20260101T100000Z.json`" in text
    assert "2.0000, 2.00x · 0101T1000" in text and "OOM · 0102T1000" in text


def test_criteria_tally_points_to_the_notes_of_the_runs_that_missed():
    def crit(status):
        return {"name": "xSQA speedup", "measured": "3.7x", "target": ">= 3.8x",
                "status": status, "note": ""}
    a = run("20260101T100000Z", [], [crit("PASS")])
    b = run("20260102T100000Z", [], [crit("MISS")])
    text = criteria_across_runs([a, b], {b[0].name: "why"})
    assert "xSQA speedup: held in 1 of 2 run(s); see the note on " \
           "`throughput_20260102T100000Z.json`" in text
    assert "Not held" not in criteria_across_runs([a])


def test_backend_check_folds_into_one_row_naming_the_run_that_failed():
    def crit(status, note=""):
        return {"name": UNIFORM_BACKEND, "measured": "1/1 tables uniform", "target": "all",
                "status": status, "note": note}
    a = run("20260101T100000Z", [], [crit("PASS")])
    b = run("20260102T100000Z", [], [crit("MISS", "paper/forward/sdpa: ['sdpa-flash']")])
    text = criteria_across_runs([a, b])
    assert text.count(UNIFORM_BACKEND) == 2                   # one table row, one tally line
    assert "1 of 2 runs (`throughput_20260102T100000Z.json`: paper/forward/sdpa" in text


def test_width_reading_puts_each_models_speedup_beside_its_own_flop_ratio():
    def pair(model, measured, flops, seq=131072):
        return dict(part="model", model=model, mode="forward", family="sdpa", seq=seq,
                    variant="xsqa", baseline="mha", measured=measured, flop_ratio=flops)
    text = "".join(width_reading([pair("paper", 3.6, 3.6), pair("wide64", 2.7, 3.0),
                                   pair("wide64", 2.0, 2.0, seq=4096)]))
    assert "131,072 tokens" in text and "paper 3.60x (FLOP ratio 3.60x)" in text
    assert "measured over FLOP ratio: paper 1.00, wide64 0.90" in text
    assert width_reading([pair("paper", 3.6, 3.6)]) == []    # one width: nothing to compare


def test_family_reading_sets_both_ratios_beside_the_whole_model_flop_ratio():
    cases = [dict(case(v, t, seq=200000, batch=1, family=f), vs_mha=r)
             for v, t, f, r in (("mha", 1.4, "sdpa", 1.0), ("xsqa", 0.35, "sdpa", 4.0),
                                ("mha", 1.3, "flex", 1.0), ("xsqa", 0.35, "flex", 3.71))]
    pairs = [dict(model="paper", seq=200000, mode="forward", variant="xsqa", baseline="mha",
                  flop_ratio=3.8)]
    text = "".join(family_reading(cases, pairs))
    assert "4.00x on SDPA and 3.71x on Flex" in text
    assert "FLOP ratio at this length is 3.80x" in text
    assert family_reading([c for c in cases if c["family"] == "sdpa"], pairs) == []


VARIANTS = ("mha", "gqa", "sqa", "xsqa")


@given(st.lists(st.dictionaries(st.sampled_from(VARIANTS), st.floats(0.01, 100.0)),
                min_size=1, max_size=4))
def test_every_merged_speedup_divides_two_timings_of_one_run(timings):
    loaded = [run(f"2026010{i}T100000Z", [case(v, t) for v, t in runs.items()])
              for i, runs in enumerate(timings)]
    by_run = {path.name: {c["variant"]: c["seconds"] for c in r["cases"]} for path, r in loaded}
    for c in merged_cases(loaded):
        own = by_run[c["run"]]
        assert c["seconds"] == own[c["variant"]]
        assert c["vs_mha"] == (own["mha"] / c["seconds"] if "mha" in own else None)


@given(st.floats(0.01, 10.0), st.floats(0.01, 10.0))
def test_the_speedup_criterion_holds_exactly_when_the_ratio_reaches_its_target(mha, xsqa):
    cases = add_speedups([case("mha", mha, seq=200000, batch=1),
                          case("xsqa", xsqa, seq=200000, batch=1)])
    found = {k["name"]: k for k in criteria({"matmul_peak_tflops": {"start": 100.0}}, cases)}
    k = found["xSQA speedup over MHA, paper model, forward, seq 200000, sdpa"]
    assert k["status"] == ("PASS" if mha / xsqa >= SPEEDUP_OVER_MHA["xsqa"] else "MISS")
    assert found["xSQA speedup over MHA, paper model, forward, seq 200000, flex"][
        "status"] == "N/A"                                     # no flex rows: not measured


def test_speedups_compare_within_one_family_and_length():
    def case(variant, seconds, family="sdpa", seq=1024):
        return dict(part="model", model="paper", mode="forward", family=family, seq=seq,
                    variant=variant, status="ok", seconds=seconds)
    cases = add_speedups([case("mha", 4.0), case("gqa", 3.0), case("xsqa", 1.0),
                          case("xsqa", 0.5, family="flex"), case("mha", 2.0, seq=2048),
                          dict(case("sqa", 0.0), status="oom")])
    xsqa = cases[2]
    assert xsqa["vs_mha"] == 4.0 and xsqa["vs_gqa"] == 3.0
    assert cases[3]["vs_mha"] is None          # no flex MHA at that length: no cross-family ratio
    assert "vs_mha" not in cases[5]


def test_paper_table_and_criteria_render_from_synthetic_cases():
    """Rendering only: made-up timings at the paper's lengths must land beside the paper's."""
    def case(variant, seconds, family, nq, nkv, seq=200000):
        return dict(part="model", model="paper", mode="forward", family=family, seq=seq,
                    batch=1, variant=variant, status="ok", seconds=seconds, n_q_heads=nq,
                    n_kv_heads=nkv, step_flops=1e12 * nq, kernel_family=(
                        "flex" if family == "flex" else "sdpa-flash"))
    cases = [case("mha", 1.0, "sdpa", 16, 16), case("xsqa", 0.25, "sdpa", 4, 4),
             case("sqa", 0.52, "sdpa", 8, 4), case("gqa", 1.0, "sdpa", 16, 4),
             case("mha", 1.2, "flex", 16, 16), case("mha@128", 0.05, "flex", 16, 16),
             case("xsqa", 0.3, "flex", 4, 4)]
    result = {"run": {}, "settings": {"repeats": 3, "max_seconds": 1, "forward": "f",
                                      "train": "t", "compiled": "c", "sdpa_kernel": "flash"},
              "matmul_peak_tflops": {"start": 100.0, "end": 110.0}, "cases": cases,
              "complete": True}
    found = analyse(result)
    crit = {k["name"]: k for k in found["criteria"]}
    assert crit["xSQA speedup over MHA, paper model, forward, seq 200000, sdpa"][
        "status"] == "PASS"
    assert crit["SQA speedup over MHA, paper model, forward, seq 200000, sdpa"][
        "status"] == "PASS"
    assert crit["SWA(128) faster than xSQA, paper model, forward, seq 200000, both flex"][
        "status"] == "PASS"
    assert found["matmul_peak_tflops"]["used"] == 110.0
    md = render_markdown(result)                               # analysed where it renders
    assert "| 200,000 (1) | 0.8194 / 0.2500 |" in md          # paper / ours, xSQA column
    assert "Matched comparisons" in md and "SQA vs GQA" in md


def flash_run(flash_train_s=1.0, lost_at=1024):
    """A synthetic run with flash beside cuDNN: op rows, training steps, layer memory."""
    def c(part, model, mode, family, seq, seconds, variant="mha", hd=128, **kw):
        return dict(part=part, model=model, mode=mode, family=family, seq=seq, batch=1,
                    variant=variant, status="ok", seconds=seconds, step_flops=900e12,
                    n_q_heads=16, n_kv_heads=16, head_dim=hd, **kw)
    cases = []
    for seq in (32768, 131072):
        cases += [c("op", "attn128", "forward", "flash", seq, 1.0),
                  c("op", "attn128", "forward", "sdpa-cudnn", seq, 1.2),
                  c("op", "attn128", "train", "flash", seq, 900 / 700),
                  c("model", "wide128", "train-ckpt", "sdpa", seq, 1.2, hd=128,
                    first_step_loss=9.2101),
                  c("model", "wide128", "train-ckpt", "flash", seq, flash_train_s, hd=128,
                    first_step_loss=9.2100),
                  c("model", "paper", "forward", "sdpa", seq, 0.5, hd=16,
                    layer_mem_mib={"sqt": 300.0, "unfused": 454.0})]
    cases += [c("op", "attn128", "forward", "flash", lost_at, 1.0),
              c("op", "attn128", "forward", "sdpa-cudnn", lost_at, 0.8)]
    return {"run": {}, "cases": cases, "matmul_peak_tflops": {"start": 1000.0, "end": 1000.0},
            "settings": {"repeats": 3, "max_seconds": 1, "forward": "f", "train": "t",
                         "compiled": "c", "sdpa_kernel": "cudnn",
                         "auto_flash": {"128": {"min_seq_forward": 32768,
                                                "min_seq_train": 4096}}},
            "complete": True}


def test_flash_criteria_follow_the_numbers():
    found = {k["name"]: k for k in analyse(flash_run())["criteria"]}
    op_fwd = found["FlashAttention-4 op, head dim 128, causal MHA, forward, 32k-131k: share of "
                   "the matmul peak"]
    assert op_fwd["status"] == "PASS" and "32,768: 90% (cuDNN 75%)" in op_fwd["measured"]
    assert found["FlashAttention-4 op, head dim 128, causal MHA, forward+backward, 32k-131k: "
                 "share of the matmul peak"]["status"] == "MISS"        # 70 % < 75 %
    train = found["wide128 MHA training step, flash over cuDNN, 32k and 131k"]
    assert train["status"] == "PASS" and "1.20x, loss 9.21000 vs 9.21010" in train["measured"]
    assert found["wide64 MHA training step, flash over cuDNN, 32k and 131k"]["status"] == "N/A"
    memory = found["One layer's forward peak memory at 131,072 tokens, fused Q/K/V beside the "
                   "unfused layout"]
    assert memory["status"] == "PASS" and "300 vs 454 MiB" in memory["measured"]
    auto = found["auto never picks flash where it lost to cuDNN in this run (full causal rows)"]
    assert auto["status"] == "PASS" and auto["measured"].startswith("1 cells slower")
    slow = {k["name"]: k for k in analyse(flash_run(flash_train_s=1.15, lost_at=65536))[
        "criteria"]}
    assert slow["wide128 MHA training step, flash over cuDNN, 32k and 131k"]["status"] == "MISS"
    assert slow["auto never picks flash where it lost to cuDNN in this run (full causal "
                "rows)"]["status"] == "MISS"


def test_flash_sections_render_and_say_where_flash_loses():
    md = render_markdown(flash_run())
    assert "### FlashAttention-4 beside cuDNN" in md
    assert "| op · attn128 · forward · MHA |" in md
    assert "Where flash loses: attn128 forward MHA 1,024 (0.80x)" in md
    assert "### One layer's peak memory beside the unfused layout" in md and "300 / 454" in md


def test_runs_without_flash_or_memory_keep_their_criteria():
    cases = [case("mha", 1.0, seq=200000, batch=1), case("xsqa", 0.3, seq=200000, batch=1)]
    names = [k["name"] for k in criteria({"matmul_peak_tflops": {"start": 100.0}},
                                         add_speedups(cases))]
    assert not any("FlashAttention-4" in n or "peak memory" in n for n in names)


def test_training_step_is_judged_on_the_trainers_own_step_with_its_attention_ceiling():
    """A compiled step (what `sqt train` runs on CUDA) outranks the eager and the checkpointed
    ones; where both steps were profiled the row says how far attention alone could take it:
    attention 60 of 100 ms on cuDNN and 50 ms on flash bound the step at 100 / 90."""
    result = flash_run(flash_train_s=1.15)          # the checkpointed rows alone would MISS
    for seq in (32768, 131072):
        for family, seconds, attn in (("sdpa", 1.0, 60.0), ("flash", 0.9, 50.0)):
            result["cases"].append(dict(
                part="model", model="wide128", mode="train-compiled", family=family, seq=seq,
                batch=1, variant="mha", status="ok", seconds=seconds, step_flops=900e12,
                n_q_heads=16, n_kv_heads=16, head_dim=128, first_step_loss=9.21,
                kernel_ms=100.0 if family == "sdpa" else 90.0, attention_kernel_ms=attn))
    found = {k["name"]: k for k in analyse(result)["criteria"]}
    train = found["wide128 MHA training step, flash over cuDNN, 32k and 131k"]
    assert train["status"] == "PASS" and "32,768 (train-compiled): 1.11x" in train["measured"]
    assert "attention 60% of the cuDNN step's kernel time, its kernels 1.20x faster on flash: " \
           "1.11x if only they changed" in train["measured"]
    # Without profiles there is no ceiling to state, and the row still reads.
    for c in result["cases"]:
        c.pop("attention_kernel_ms", None)
    train = {k["name"]: k for k in analyse(result)["criteria"]}[
        "wide128 MHA training step, flash over cuDNN, 32k and 131k"]
    assert "if only" not in train["measured"] and train["status"] == "PASS"


def test_a_training_step_pass_needs_every_judged_length_but_a_miss_stands_alone():
    result = flash_run()
    result["cases"] = [c for c in result["cases"] if c["seq"] != 131072]
    name = "wide128 MHA training step, flash over cuDNN, 32k and 131k"
    row = {k["name"]: k for k in analyse(result)["criteria"]}[name]
    assert row["status"] == "INFO" and "131,072 not measured in this run" in row["measured"]
    slow = flash_run(flash_train_s=1.15)
    slow["cases"] = [c for c in slow["cases"] if c["seq"] != 131072]
    assert {k["name"]: k for k in analyse(slow)["criteria"]}[name]["status"] == "MISS"
