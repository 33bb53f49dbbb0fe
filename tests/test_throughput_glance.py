"""The cross-run throughput view, on synthetic runs: which run each cell comes from, that a
speedup never divides timings of two runs, and how criteria are tallied across runs."""

from pathlib import Path

from bench.throughput_glance import criteria_across_runs, glance, merged_cases


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
    text = glance([NEW, OLD], doc_dir=None)
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
    from bench.throughput_report import UNIFORM_BACKEND

    def crit(status, note=""):
        return {"name": UNIFORM_BACKEND, "measured": "1/1 tables uniform", "target": "all",
                "status": status, "note": note}
    a = run("20260101T100000Z", [], [crit("PASS")])
    b = run("20260102T100000Z", [], [crit("MISS", "paper/forward/sdpa: ['sdpa-flash']")])
    text = criteria_across_runs([a, b])
    assert text.count(UNIFORM_BACKEND) == 2                   # one table row, one tally line
    assert "1 of 2 runs (`throughput_20260102T100000Z.json`: paper/forward/sdpa" in text


def test_width_reading_puts_each_models_speedup_beside_its_own_flop_ratio():
    from bench.throughput_glance import _width_reading

    def pair(model, measured, flops, seq=131072):
        return dict(part="model", model=model, mode="forward", family="sdpa", seq=seq,
                    variant="xsqa", baseline="mha", measured=measured, flop_ratio=flops)
    text = "".join(_width_reading([pair("paper", 3.6, 3.6), pair("wide64", 2.7, 3.0),
                                   pair("wide64", 2.0, 2.0, seq=4096)]))
    assert "131,072 tokens" in text and "paper 3.60x (FLOP ratio 3.60x)" in text
    assert "measured over FLOP ratio: paper 1.00, wide64 0.90" in text
    assert _width_reading([pair("paper", 3.6, 3.6)]) == []    # one width: nothing to compare


def test_family_reading_sets_both_ratios_beside_the_whole_model_flop_ratio():
    from bench.throughput_glance import _family_reading
    cases = [dict(case(v, t, seq=200000, batch=1, family=f), vs_mha=r)
             for v, t, f, r in (("mha", 1.4, "sdpa", 1.0), ("xsqa", 0.35, "sdpa", 4.0),
                                ("mha", 1.3, "flex", 1.0), ("xsqa", 0.35, "flex", 3.71))]
    pairs = [dict(model="paper", seq=200000, mode="forward", variant="xsqa", baseline="mha",
                  flop_ratio=3.8)]
    text = "".join(_family_reading(cases, pairs))
    assert "4.00x on SDPA and 3.71x on Flex" in text
    assert "FLOP ratio at this length is 3.80x" in text
    assert _family_reading([c for c in cases if c["family"] == "sdpa"], pairs) == []
