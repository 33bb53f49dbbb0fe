"""The report package: docs/results.md regenerates from the committed JSON byte for byte, its
sections come in the order of SECTIONS, nothing in it imports torch, sqt or a runner, verdicts
follow the numbers; and the sweep and decode readings on synthetic runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.report import cli, document
from bench.report.criteria import at_least, at_most, criterion
from bench.report.notes import with_file_notes
from bench.report.sections import decode, sweep_glance

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def committed(monkeypatch, tmp_path):
    """A context over the committed results, named as the CLI names them (the document quotes
    the folder), with figures drawn into a temporary folder rather than docs/."""
    monkeypatch.chdir(ROOT)
    return document.Context(Path("bench/results"), Path("docs"), figure_dir=tmp_path)


def test_results_md_regenerates_from_the_committed_json_byte_for_byte(committed):
    pytest.importorskip("matplotlib")   # without it the plot, and the line linking it, is skipped
    assert document.render(committed) == (ROOT / "docs" / "results.md").read_text()
    assert (committed.figure_dir / "throughput.png").stat().st_size > 0


def test_the_committed_document_follows_the_section_list(committed):
    text = (ROOT / "docs" / "results.md").read_text()
    committed.figure_dir = None      # headings only: draw nothing
    heads = [h for h in (s(committed) for s in document.SECTIONS) if h]
    starts = [text.index(h.split("\n", 1)[0] + "\n") for h in heads]
    # A section with no results yet (the quality benchmark's until it has run) renders nothing.
    assert len(heads) >= len(document.SECTIONS) - 1 and starts == sorted(starts)


def test_sections_render_in_the_order_of_the_list_and_empty_ones_vanish(tmp_path):
    def titled(name):
        return lambda ctx: f"## {name}\n\nbody of {name}"
    text = document.render(document.Context(tmp_path),
                           [titled("second"), lambda ctx: None, titled("first")])
    assert text.index("## second") < text.index("## first")
    assert document.NO_RESULTS not in text and text.endswith("body of first\n")
    assert document.NO_RESULTS in document.render(document.Context(tmp_path), [lambda ctx: None])


def test_the_report_imports_neither_torch_nor_sqt_nor_a_runner(tmp_path):
    code = """
import sys
from pathlib import Path
from bench.report import document, run_file
document.render(document.Context(Path("bench/results"), Path(sys.argv[1])))
run_file.render_run("bench/results/throughput_20261123T172926Z.json", plot=False)
run_file.render_run("bench/results/decode_20261123T155031Z.json")
run_file.render_run("bench/results/layer_sweep/20261123-152104")
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sqt")
             or (m.startswith("bench.") and not m.startswith("bench.report")))
assert not bad, bad
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}      # not src/: sqt is not even on the path
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("stamp", ["20261123T172926Z", "20261123T165545Z"])
def test_a_runs_own_markdown_regenerates_from_its_json(stamp, tmp_path, capsys):
    source = ROOT / "bench" / "results" / f"throughput_{stamp}.json"
    out = tmp_path / "run.md"
    assert cli.main(["--run", str(source), "--out", str(out), "--no-plot"]) == 0
    assert out.read_text() == source.with_suffix(".md").read_text()
    assert "criteria (measured on this run" in capsys.readouterr().out


def test_run_of_an_unknown_file_is_one_line_and_status_2(tmp_path, capsys):
    (tmp_path / "other.json").write_text("{}")
    assert cli.main(["--run", str(tmp_path / "other.json")]) == 2
    assert cli.main(["--run", str(tmp_path / "throughput_missing.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "other.json" in err[0] and "throughput_missing.json" in err[1]


def test_a_sweeps_learning_curves_are_drawn_beside_it_and_linked(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.report.run_file import render_run
    folder = tmp_path / "sweep" / "20260101-000000"
    runs = []
    for variant in ("mha", "sqt"):
        curves = [{"step": s, "val_loss": 3.0 - s / 10, "train_loss": 3.1 - s / 10}
                  for s in (1, 2, 3)]
        runs.append(f"runs/tiny-{variant}-s0.json")
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        (folder / runs[-1]).write_text(json.dumps({"size": "tiny", "variant": variant,
                                                   "curves": curves}))
    rows = [row("tiny", v, 4.0) for v in ("mha", "sqt")]
    for r in rows:
        r.update(final_val_ppl=stat(4.1), forward_ms=None, decode_ms_per_token=None,
                 achieved_tflops=stat(1.0), train_dtype="float32")
    s = {**summary(rows), "kind": "sweep", "baseline": "mha", "runs": runs}
    s["run_record"].update(peak_dtype="float32")
    (folder / "summary.json").write_text(json.dumps(s))
    text, console = render_run(folder, doc_dir=tmp_path)
    assert (folder / "curves.png").exists() and "curves.png" in console[0]
    assert "![learning curves](sweep/20260101-000000/curves.png)" in text


@given(st.floats(0, 1e6), st.floats(1e-3, 1e6))
def test_a_verdict_follows_the_numbers(value, target):
    high = criterion("c", f"{value}", f">= {target}", at_least(value, target))
    low = criterion("c", f"{value}", f"<= {target}", at_most(value, target))
    assert high["status"] == ("PASS" if value >= target else "MISS")
    assert low["status"] == ("PASS" if value <= target else "MISS")
    assert criterion("c", None, "t", at_least(None, target))["status"] == "N/A"
    assert criterion("c", f"{value}", "reported", None)["status"] == "INFO"


def test_notes_on_named_files_follow_a_section_once():
    notes = {"decode_1.json": "about one", "decode_2.json": "about two", "sweep/x": "folder"}
    text = with_file_notes("## Decode\n\nfrom decode_1.json and decode_2.json\n\nabout two",
                           notes)
    assert text.endswith("**Note on `decode_1.json`:** about one")
    assert text.count("about two") == 1 and "folder" not in text


def test_decode_criteria_follow_the_engine_and_hugging_face_timings():
    def res(us_per_token, hf_us):
        small = {"size": "small", "variant": "mha", "batch": 1, "status": "ok", "context": 256,
                 "engine": {"median_ms": us_per_token / 1e3}}
        hf = [{"size": "small", "batch": 1, "context": 256, "hf": {"median_ms": hf_us / 1e3}}]
        return {"cases": [small], "hf": hf}
    fast, slow = decode.criteria(res(100.0, 1000.0)), decode.criteria(res(200.0, 400.0))
    assert [k["status"] for k in fast] == ["PASS", "PASS"]     # 100 <= 150; 10x >= 5x
    assert [k["status"] for k in slow] == ["MISS", "MISS"]     # 200 > 150; 2x < 5x
    assert decode.criteria({"cases": []}) == []


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
    text = sweep_glance.quality_grid([(old, Path("sweep/20260101-old/summary.json")),
                                      (new, Path("sweep/20260102-new/summary.json"))])
    lines = {ln.split("|")[2].strip(): ln for ln in text.splitlines() if ln.startswith("| tiny")}
    assert "20260102-new" in lines["mha"] and "20260101-old" in lines["sqt"]
    assert "+10.0 %" in lines["sqa"] and "+20.0 %" in lines["sqt"]   # each against its own mha
    assert "shared" in lines["sqt"] and "shared" not in lines["sqa"]  # time-sliced vs one slot
    assert "sqa +10.0 %" in text and "sqt +20.0 %" in text            # beyond twice the spread


def test_grid_ignores_single_seed_or_short_sweeps():
    one_seed = summary([row("tiny", "mha", 5.0)], seeds=1)
    short = {**summary([row("tiny", "mha", 5.0)]), "steps": 200}
    assert sweep_glance.quality_grid([(one_seed, Path("a/summary.json")),
                                      (short, Path("b/summary.json"))]) is None


def test_seed_sweep_speed_judges_the_newest_timed_seed_sweep():
    rows = [row(s, v, 4.0) for s in ("tiny", "small", "medium") for v in ("mha", "sqt")]
    slow = summary(rows, seeds=1, jobs=6, wall=97.0)
    fast = summary(rows, seeds=1, jobs=6, slots=1, wall=86.0)
    text = sweep_glance.seed_sweep_speed([(fast, Path("sweep/2-fast/summary.json")),
                                          (slow, Path("sweep/1-slow/summary.json"))])
    assert "**86.0 s**" in text and "meets" in text and "ms / train step" in text
    text = sweep_glance.seed_sweep_speed([(slow, Path("sweep/1-slow/summary.json"))])
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


def test_compiled_decode_rows_that_fell_back_are_flagged():
    """A row marked compiled whose step launched clearly more kernels than the leanest compiled
    row of its size is named; rows near the leanest are not."""
    def case(variant, per_step, compiled=True):
        return {"size": "small", "variant": variant, "batch": 1, "compiled": compiled,
                "kernels": {"per_step": per_step}}
    res = {"cases": [case("mha", 60), case("gqa", 64), case("sqt", 85), case("xsqa", 90, False)]}
    text = "\n".join(decode.fallback_lines(res))
    assert "small sqt b1 (85 vs 60" in text
    assert "gqa" not in text and "xsqa" not in text
    assert decode.fallback_lines({"cases": [case("mha", 60), case("gqa", 64)]}) == []


def test_paper_dense_table_compares_changes_against_each_studys_own_mha():
    base = row("medium", "mha", 4.0, ms=5.0)
    sqa = row("medium", "sqa", 4.08, ms=4.0)
    isolated = summary([base, sqa], slots=1)
    chosen = {("medium", "mha"): (base, base, isolated, Path("s/summary.json")),
              ("medium", "sqa"): (sqa, base, isolated, Path("s/summary.json"))}
    lines = {ln.split("|")[1].strip(): ln
             for ln in sweep_glance.paper_dense_table(chosen, ["medium"]).splitlines()
             if ln.startswith("| ")}
    # The paper's SQA: loss 1.2272 vs MHA 1.1976 -> exp(0.0296) = +3.0 % ppl; 241 vs 269 min.
    assert "| +3.0 % | -10.4 % | -0.38 |" in lines["sqa"]
    assert "+2.0 % / -20.0 %" in lines["sqa"]                 # ours: ppl and ms per step
    assert lines["gqa"].rstrip().endswith("| — |")            # not trained here: no cell
    shared = {**chosen, ("medium", "sqa"): (sqa, base, summary([base, sqa]), Path("t"))}
    assert "+2.0 % / shared" in sweep_glance.paper_dense_table(shared, ["medium"])
