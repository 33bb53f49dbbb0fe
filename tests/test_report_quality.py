"""The quality section on synthetic JSON: parts of one grid merge by identity wherever their
folders are; mean ± std and Δ with the seed spread follow the numbers; failed runs are left out
of every figure and listed; the GQA–MQA band reading; the criteria; "no runs yet" renders; and
rendering imports neither torch nor sqt."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import document, quality_grids as qg
from bench.report.sections import quality

ROOT = Path(__file__).resolve().parents[1]
IDENT = {"regime": "dense", "role": "primary", "preset": "sqa-dense",
         "corpus": {"name": "enwiki_100M.txt.gz", "sha256": "ab" * 32},
         "tokenizer_sha256": "cd" * 32, "vocab_size": 10000, "train_tokens": 25_500_000,
         "val_tokens": 255_000,
         "budget": {"asked": {"epochs": 2.0}, "steps": 779, "tokens_per_step": 65536,
                    "tokens": 51_052_544, "epochs": 2.0021},
         "recipe": {"batch_size": 64, "seq_len": 1024, "lr": 2e-3, "min_lr": None, "warmup": 50,
                    "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
                    "eval_every": 65, "eval_batches": 4, "dtype": "auto"},
         "model": {"d_model": 256}}
LOSS = {"gqa": 3.00, "mqa": 3.10, "sqa": 3.05, "xsqa": 3.30, "mha": 2.98}
MS = {"gqa": 30.0, "mqa": 29.5, "sqa": 25.0, "xsqa": 22.0, "mha": 32.0}


def run(variant, seed, *, status="ok", share=None):
    if status != "ok":
        return {"status": status, "variant": variant, "seed": seed, "failure": "out of memory",
                "error": "CUDA out of memory", "run_record": {"date": "2026-12-01T00:00:00"}}
    loss = LOSS[variant] + 0.01 * (seed - 1)           # std 0.01 for every variant
    return {"status": "ok", "variant": variant, "seed": seed, "params": 11_000_000,
            "active_params": 11_000_000, "layouts": ["16/4"], "best_val_loss": loss,
            "final_val_loss": loss + 0.01, "best_val_ppl": 2.718 ** loss,
            "final_val_ppl": 2.718 ** (loss + 0.01), "best_val_acc": 0.4, "final_val_acc": 0.4,
            "ms_per_step": MS[variant], "tokens_per_s": 65536 / MS[variant] * 1e3,
            "gpu_s": 25.0, "busiest_expert_share": share,
            "curves": [{"step": s, "val_loss": loss + 1.0 / s} for s in (65, 130, 195)],
            "samples": [{"prompt": "The cat", "completion": f" of {variant}\x07 sat."}],
            "run_record": {"date": f"2026-12-01T00:00:0{seed}"}}


def write_grid(results: Path, name: str, runs: list, parts: list, ident=IDENT,
               gid="grid0") -> Path:
    folder = results / "quality" / name
    (folder / "runs").mkdir(parents=True)
    (folder / "parts").mkdir()
    (folder / "grid.json").write_text(json.dumps({
        "kind": "quality_grid", "id": gid, "identity": ident, "about": "the dense model",
        "variants": {v: v for v in LOSS}}))
    for r in runs:
        (folder / "runs" / f"{r['variant']}-s{r['seed']}.json").write_text(json.dumps(r))
    for p in parts:
        (folder / "parts" / f"{p['id']}.json").write_text(json.dumps(p))
    return folder


def part(pid, minutes):
    return {"kind": "quality_part", "id": pid, "grids": ["grid0"], "wall_s": 60 * minutes,
            "device_slots": 1, "mps": {"requested": False, "running": False},
            "run_record": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01"}}


@pytest.fixture
def results(tmp_path):
    first = [run(v, s) for v in LOSS for s in range(3) if (v, s) != ("xsqa", 2)]
    write_grid(tmp_path, "dense-primary-enwiki_100M-grid0",
               first + [run("mqa", 9, status="failed")], [part("p1", 8.0)])
    # The second part of the same grid, in another folder: merged by the grid's id.
    write_grid(tmp_path, "elsewhere", [run("xsqa", 2)], [part("p2", 5.5)])
    return tmp_path


def test_parts_merge_by_identity_and_rows_follow_the_numbers(results):
    (g,) = qg.load_grids(results)
    assert len(g["folders"]) == 2 and set(g["parts"]) == {"p1", "p2"}
    assert qg.complete(g) and qg.gpu_minutes(g) == pytest.approx(13.5)
    rows = {r["variant"]: r for r in qg.rows(g)}
    assert rows["xsqa"]["seeds"] == [0, 1, 2]
    assert rows["sqa"]["best_val_loss"]["mean"] == pytest.approx(3.05)
    assert rows["sqa"]["best_val_loss"]["std"] == pytest.approx(0.01)
    # The failed run is listed and left out: mqa keeps its three trained seeds.
    assert rows["mqa"]["seeds"] == [0, 1, 2] and rows["mqa"]["failed"][0]["seed"] == 9
    d = qg.delta(rows["sqa"], rows["gqa"])
    assert d["delta"] == pytest.approx(0.05) and d["spread"] == pytest.approx(0.01 * 2 ** 0.5)
    assert d["beyond"]


@pytest.mark.parametrize("loss, words", [
    (3.005, "level with GQA"), (2.90, "better than GQA"), (3.05, "inside the GQA–MQA band"),
    (3.095, "level with MQA"), (3.30, "worse than MQA")])
def test_the_band_reading_places_a_variant_between_gqa_and_mqa(results, loss, words):
    (g,) = qg.load_grids(results)
    rows = {r["variant"]: r for r in qg.rows(g)}
    probe = {**rows["sqa"], "best_val_loss": {"mean": loss, "std": 0.01, "n": 3}}
    verdict = qg.band(probe, rows["gqa"], rows["mqa"])
    assert verdict.startswith(words)
    assert qg.claim_holds(verdict) == (words != "worse than MQA")


def test_the_section_renders_tables_claims_reading_criteria_and_samples(results):
    text = quality.section(document.Context(results))
    assert "### Dense (primary): `sqa-dense` on enwiki_100M.txt.gz" in text
    assert "| SQA | 16/4 | 11.00 M | 3.0500 ± 0.0100 | +0.0500 ± 0.0141 ✱ |" in text
    assert "| MHA | 1.1976 | 77.35 | 269 (+4.3 %) |" in text          # the blog's table beside
    assert "SQA inside the GQA–MQA band" in text and "xSQA worse than MQA" in text
    assert "fails for 1 of 2" in text and "SQA -16.7 %" in text
    assert "13.5 min in 2 part(s), 15/15 runs | ≤ 15 min | PASS" in text
    assert "MQA seed 9 (out of memory" in text
    assert "of sqa� sat." in text                                     # control byte shown as �


def test_no_runs_yet_renders_and_an_empty_results_folder_renders_nothing(tmp_path):
    assert quality.section(document.Context(tmp_path)) is None
    write_grid(tmp_path, "g", [run("gqa", 0, status="failed")], [part("p1", 1.0)])
    text = quality.section(document.Context(tmp_path))
    assert "No runs yet" in text and "0 of 15 runs trained" in text


def test_moe_criteria_read_the_newest_moe_check(results):
    check = {"equality": {"ok": True, "output": {"grouped_bf16_vs_fp32": 3e-3}},
             "idle_expert": {"ok": True, "output": {"grouped_bf16_vs_fp32": 4e-3}},
             "step_time": {"ratio": 1.6}, "trainer": {"ratio": 1.8}}
    (results / "moe_check").mkdir()
    (results / "moe_check" / "moe_check_20261201T000000Z.json").write_text(json.dumps(check))
    micro = {**IDENT, "regime": "micro", "role": "primary"}
    write_grid(results, "micro", [run("gqa", 0, share=1.7), run("sqa", 0, share=2.4)],
               [part("p3", 2.0)], ident=micro, gid="grid1")
    text = quality.section(document.Context(results))
    assert "largest relative error vs fp32 4.00e-03 | within bf16 tolerance | PASS" in text
    assert "| 1.60x | ≤ 2x | PASS | captured steps; in the trainer 1.80x |" in text
    assert "2.40x at most (primary sqa s0; 2 runs) | ≤ 2x | MISS" in text


def test_rendering_the_quality_section_imports_neither_torch_nor_sqt(results):
    code = """
import sys
from pathlib import Path
from bench.report import document, run_file
document.render(document.Context(Path(sys.argv[1]), Path(sys.argv[1]) / "docs"))
run_file.render_run(Path(sys.argv[1]) / "quality" / "elsewhere")
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sqt")
             or (m.startswith("bench.") and not m.startswith("bench.report")))
assert not bad, bad
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(results)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if importlib.util.find_spec("matplotlib") is not None:   # without it, no figure is drawn
        assert (results / "docs" / "quality-dense-primary.png").exists()


@pytest.mark.parametrize("wall, skipped, status", [(200.0, [], "PASS"), (300.0, [], "MISS"),
                                                   (240.0, [{"size": "tiny"}], "MISS")])
def test_the_char_grid_is_judged_on_a_whole_packed_sweep(wall, skipped, status):
    # A grid the wall-time guard cut short did not regenerate in time: a miss, with its count.
    from bench.report.sections.sweeps import char_grid_criterion
    summary = {"sizes": ["tiny", "small", "medium"], "variants": [f"v{i}" for i in range(10)],
               "seeds": 3, "steps": 2000, "batch_size": 64, "seq_len": 256,
               "run_record": {"device_type": "cuda", "total_wall_s": wall, "jobs": 12,
                              "device_slots": 6, "mps": {"running": True}, "skipped": skipped},
               "runs": [{}] * (90 - len(skipped))}
    k = char_grid_criterion([(summary, Path("sweep/20261201-000000-grid/summary.json"))])
    assert k["status"] == status
    if skipped:
        assert k["measured"].startswith("89 of 90 runs in 240 s")
        # A whole grid, even an older one, is judged before a cut one.
        whole = {**summary, "run_record": {**summary["run_record"], "skipped": []}}
        both = char_grid_criterion([(summary, Path("sweep/20261202-000000-cut/summary.json")),
                                    (whole, Path("sweep/20261201-000000-whole/summary.json"))])
        assert "20261201-000000-whole" in both["measured"]
    if status != "N/A":
        assert k["note"] == "jobs 12, device slots 6, MPS on"
