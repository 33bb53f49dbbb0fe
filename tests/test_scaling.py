"""bench.scaling on the CPU: the commands it would run (the same global batch at every world
size, NVLink multicast off), one-line refusals, the efficiency and loss arithmetic on
constructed records, the report section, and one real run of two world sizes over gloo."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench import scaling
from bench.report import document
from bench.report.sections import scaling as section
from bench.scaling_math import dense_rows, efficiency, fsdp_rows

ROOT = Path(__file__).resolve().parents[1]


def flag(command: list, name: str) -> str:
    return command[command.index(name) + 1]


def test_dry_run_prints_one_torchrun_per_run_with_the_same_global_batch(capsys):
    assert scaling.main(["dense", "--data", "D", "--gpus", "1,2,4", "--layers", "mha", "xsqa",
                         "--steps", "30", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "NCCL_NVLS_ENABLE=0" in lines[0]
    commands = [shlex.split(line) for line in lines[1:]]
    assert len(commands) == 6
    assert [flag(c, "--nproc_per_node") for c in commands] == ["1", "2", "4"] * 2
    assert {flag(c, "--batch-size") for c in commands} == {"64"}
    assert {flag(c, "--steps") for c in commands} == {"30"}
    assert all(c[1:4] == ["-m", "torch.distributed.run", "--standalone"]
               and c[6:9] == ["-m", "sqt", "train"] for c in commands)
    assert flag(commands[5], "--out-dir").endswith("runs/xsqa-w4")
    assert scaling.child_env()["NCCL_NVLS_ENABLE"] == "0"


def test_fsdp_dry_run_trains_the_wide_model_sharded_at_32k(capsys):
    assert scaling.main(["fsdp", "--gpus", "1,2", "--dry-run"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert all("--fsdp" in c and flag(c, "--d-model") == "2048" and
               flag(c, "--seq-len") == "32768" for c in commands)
    assert [flag(c, "--batch-size") for c in commands] == ["1", "2"]   # one sequence per GPU


@pytest.mark.parametrize("argv, words", [
    (["--gpus", "1,x"], "'x' is not a positive"),
    (["--gpus", "0"], "'0' is not a positive"),
    (["--gpus", "2,2"], "2 appears twice"),
    (["--gpus", "1,3"], "multiple of world size x grad_accum = 3 x 1"),
    (["--gpus", "64", "--dry-run-off"], "this machine has"),
])
def test_bad_gpus_values_are_refused_in_one_line(argv, words, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dry = [] if "--dry-run-off" in argv else ["--dry-run"]
    argv = [a for a in argv if a != "--dry-run-off"]
    assert scaling.main(["dense", "--data", "D", *argv, *dry]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and err.startswith("bench.scaling: error: --")


def record(layout, w, tokens_per_s, loss, seed=0, status="ok"):
    return {"layout": layout, "world_size": w, "seed": seed, "status": status, "error": "oom",
            "result": {"tokens_per_s": tokens_per_s, "ms_per_step": 1e3 / tokens_per_s,
                       "final_val_loss": loss, "best_val_loss": loss, "parallel": "ddp",
                       "peak_memory_bytes": 2 ** 30 * 8 / w,
                       "train_config": {"seq_len": 32768, "batch_size": w}}}


def test_perfect_scaling_is_efficiency_one_and_one_gpu_is_the_reference():
    rows = dense_rows([record("mha", w, 1000.0 * w, 2.0 + 0.01 * s, seed=s)
                       for w in (1, 2, 4) for s in (0, 1)])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 1.0, 1.0])
    assert rows[0]["val_loss_diff"] == 0 and rows[0]["within_seed_spread"] is True
    half = dense_rows([record("x", 1, 1000.0, 2.0), record("x", 4, 2000.0, 2.5)])
    assert half[0]["efficiency"] == 1.0 and half[1]["efficiency"] == pytest.approx(0.5)
    assert half[1]["val_loss_diff"] == pytest.approx(0.5) and half[1]["seed_spread"] is None
    assert efficiency(3000.0, 4, None) is None
    failed = dense_rows([record("x", 1, 1000.0, 2.0), record("x", 2, 1.0, 0, status="failed")])
    assert failed[1]["status"] == "failed" and failed[1]["error"] == "oom"
    mem = fsdp_rows([record("mha", w, 100.0 * w, 3.0) for w in (1, 2, 4)])
    assert [r["memory_vs_w1"] for r in mem] == pytest.approx([1.0, 0.5, 0.25])


def test_the_report_section_renders_a_run_and_says_when_there_is_none(tmp_path):
    ctx = document.Context(tmp_path)
    assert "No runs yet: `python -m bench.scaling dense" in section.section(ctx)
    res = {"mode": "dense", "layers": ["mha"], "efficiency_target": 0.9,
           "run_record": {"device": "GPU"},
           "rows": dense_rows([record("mha", w, 1000.0 * w * (0.95 if w > 1 else 1), 2.0)
                               for w in (1, 2, 4)])}
    (tmp_path / "scaling").mkdir()
    (tmp_path / "scaling" / "20260101T000000Z-dense.json").write_text(json.dumps(res))
    text = section.section(ctx)
    assert "| MHA | 4 | 3,800 |" in text and "0.950" in text and "No runs yet" not in text
    assert "MHA, DDP efficiency at 4 GPUs: 0.950 (target ≥ 0.90): meets." in text


def test_two_processes_over_gloo_train_and_the_json_holds_every_figure(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.scaling", "dense", "--device", "cpu", "--preset", "tiny",
         "--data", "tinyshakespeare", "--gpus", "1,2", "--layers", "mha", "--steps", "4",
         "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    res = json.loads(next(tmp_path.glob("*-dense.json")).read_text())
    assert res["run_record"]["git"] and res["env"] == {"NCCL_NVLS_ENABLE": "0"}
    one, two = res["rows"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["efficiency"] == 1.0
    assert two["tokens_per_s"] > 0 and two["efficiency"] > 0
    assert abs(two["val_loss_diff"]) < 1e-4          # the same batches, split across two ranks
    assert all(r["result"]["peak_memory_bytes"] is None and r["result"]["world_size"] ==
               r["world_size"] for r in res["runs"])
    assert not (tmp_path / res["folder"] / "runs" / "mha-w2" / "checkpoint").exists()
