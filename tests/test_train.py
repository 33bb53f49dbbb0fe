"""The trainer, its checkpoints and resume, and the sweep/report benchmarks, at toy sizes on CPU."""

import json
import math

import numpy as np
import pytest
import torch

from sqt.checkpoint import CheckpointError, load_model
from sqt.config import LMConfig
from sqt.data import load_tinyshakespeare
from sqt.train import TrainConfig, lr_at, main as train_main, train

MODEL = LMConfig(vocab_size=65, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=32,
                 dropout=0.1)


@pytest.fixture(scope="module")
def data():
    return load_tinyshakespeare()


def cfg(**kw):
    base = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup=2, eval_every=2,
                eval_batches=2, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def test_training_lowers_the_loss(data):
    r = train(MODEL, cfg(steps=40, eval_every=10, batch_size=8), data)
    first, last = r["curves"][0]["val_loss"], r["curves"][-1]["val_loss"]
    assert last < first - 0.3 and last < math.log(65)
    assert r["best_val_loss"] == min(c["val_loss"] for c in r["curves"])
    assert 0 < r["final_val_acc"] < 1 and r["params"] == r["model"].num_params()


def test_schedule_warms_up_then_decays_to_min_lr():
    c = cfg(steps=100, warmup=10, lr=1e-3)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(99, c) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 99))


class Killed(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(data, tmp_path):
    whole = train(MODEL, cfg(out_dir=str(tmp_path / "a"), checkpoint_every=3), data)

    def kill(step):
        if step == 5:  # two steps past the checkpoint at 3: their work is lost, as in a real kill
            raise Killed

    with pytest.raises(Killed):
        train(MODEL, cfg(out_dir=str(tmp_path / "b"), checkpoint_every=3), data, callback=kill)
    resumed = train(MODEL, cfg(out_dir=str(tmp_path / "b"), checkpoint_every=3), data, resume=True)
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["curves"] == whole["curves"]
    assert resumed["final_val_loss"] == whole["final_val_loss"]


def test_resume_refuses_a_different_run(data, tmp_path):
    train(MODEL, cfg(out_dir=str(tmp_path)), data)
    with pytest.raises(CheckpointError, match=r"lr \(checkpoint 0.003, now 0.001\)"):
        train(MODEL, cfg(out_dir=str(tmp_path), lr=1e-3), data, resume=True)


def test_checkpoint_round_trip_gives_identical_logits(data, tmp_path):
    r = train(MODEL, cfg(out_dir=str(tmp_path)), data)
    loaded, meta = load_model(tmp_path)
    x = torch.from_numpy(data.val[:32].astype(np.int64))[None]
    with torch.no_grad():
        assert torch.equal(loaded(x), r["model"].eval()(x))
    assert meta["tokenizer"] == data.tokenizer.to_dict() and meta["step"] == 8
    curves = [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    assert curves == r["curves"]


def test_corrupted_checkpoint_gives_a_clear_error(data, tmp_path):
    train(MODEL, cfg(out_dir=str(tmp_path)), data)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"format": 1, "model": ')
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        train(MODEL, cfg(out_dir=str(tmp_path)), data, resume=True)


def test_bad_settings_name_field_and_accepted_values(data):
    with pytest.raises(ValueError, match="lr=-1.*> 0"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="dtype='fp8'.*bfloat16"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="seq_len=64 exceeds the model's max_seq_len=32"):
        train(MODEL, cfg(seq_len=64), data)


def test_command_line_trains_and_resumes(tmp_path, capsys):
    args = ["--size", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--no-progress",
            "--out-dir", str(tmp_path)]
    assert train_main(args) == 0
    assert json.loads((tmp_path / "result.json").read_text())["best_step"] in (2, 4)
    assert train_main(args + ["--resume"]) == 0   # already finished: nothing left to do
    # Block checkpointing changes memory, not the model: a run resumes with it switched on.
    assert train_main(args + ["--resume", "--checkpoint-blocks"]) == 0
    assert train_main(args[:-2] + ["--lr", "-3"]) == 2
    assert "lr=-3.0" in capsys.readouterr().err


def test_sweep_and_report_from_its_json(tmp_path, capsys):
    from bench import report, sweep
    out = tmp_path / "results"
    assert sweep.main(["--sizes", "tiny", "--variants", "mha", "xsqa", "--steps", "4",
                       "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
                       "--device", "cpu", "--no-latency", "--no-plot", "--out", str(out),
                       "--jobs", "2"]) == 0   # worker processes, as on the GPU
    printed = capsys.readouterr().out
    assert "| tiny | xsqa |" in printed and "Variant quality" in printed
    (summary,) = (out / "sweep").glob("*/summary.json")
    s = json.loads(summary.read_text())
    assert {r["variant"] for r in s["rows"]} == {"mha", "xsqa"}
    assert len(list(summary.parent.glob("runs/*.json"))) == 2
    # Rebuilding the summary from the runs alone gives the same rows.
    summary.unlink()
    assert sweep.main(["--summarize", str(summary.parent), "--no-plot"]) == 0
    rebuilt = json.loads(summary.read_text())
    assert rebuilt["rows"] == s["rows"] and rebuilt["run_record"]["rebuilt_from_runs"]
    # The report renders every sweep, with a run's note in that run's section.
    run_key = f"sweep/{summary.parent.name}"
    (out / "notes.json").write_text(json.dumps({"notes": {run_key: "a caveat about this run"}}))
    doc = tmp_path / "docs" / "results.md"
    assert report.main(["--results", str(out), "--out", str(doc)]) == 0
    text = doc.read_text()
    best = s["rows"][0]["best_val_ppl"]["mean"]
    section = text[text.index(f"## Sweep `{summary.parent.name}`"):]
    assert f"{best:.3f}" in section and s["run_record"]["torch"] in section
    assert "**Note on this run:** a caveat about this run" in section


def test_layer_sweep_names_the_largest_n_within_tolerance(tmp_path, capsys):
    from bench import layer_sweep
    out = tmp_path / "results"
    assert layer_sweep.main(["--size", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len",
                             "16", "--eval-batches", "1", "--device", "cpu", "--no-latency",
                             "--out", str(out), "--tolerance", "0.5"]) == 0
    (summary,) = (out / "layer_sweep").glob("*/summary.json")
    s = json.loads(summary.read_text())
    ppl = {r["n_sqt"]: r["best_val_ppl"]["mean"] for r in s["rows"]}
    assert sorted(ppl) == [0, 1, 2]
    assert s["largest_n_within"] == max(n for n, p in ppl.items() if p <= 1.5 * ppl[0])
    assert f"N = {s['largest_n_within']}" in capsys.readouterr().out


def test_sweep_rejects_unknown_variants_before_training(tmp_path, capsys):
    from bench import sweep
    assert sweep.main(["--sizes", "tiny", "--variants", "mha", "bogus", "--out",
                       str(tmp_path)]) == 2
    assert "variant 'bogus'" in capsys.readouterr().err and not (tmp_path / "sweep").exists()


def test_latency_is_measured(tmp_path):
    from bench.latency import measure_latency
    r = measure_latency(MODEL, "cpu", seq_len=32, prompt_len=8, decode_tokens=8, repeats=3,
                        warmup=1)
    assert r["forward_ms"] > 0 and r["decode_ms_per_token"] > 0 and r["dtype"] == "float32"


def test_on_ready_runs_once_before_the_steady_state_steps(data):
    seen = []
    train(MODEL, cfg(steps=5), data, on_ready=lambda: seen.append("ready"),
          callback=seen.append)
    # Eager on the CPU there is nothing to compile or capture: ready once the first step is done.
    assert seen == ["ready", 1, 2, 3, 4, 5]


def test_sweep_run_waits_for_a_device_slot_and_gives_it_back(tmp_path, monkeypatch):
    import threading
    from bench import sweep
    slots = threading.Semaphore(1)
    monkeypatch.setattr(sweep, "_DEVICE_SLOTS", slots)
    common = {"data": "tinyshakespeare", "steps": 3, "batch_size": 2, "seq_len": 16,
              "lr": None, "dropout": None, "eval_every": 3, "eval_batches": 1, "device": "cpu",
              "compile": None, "compile_mode": None, "progress": False, "jobs": 2, "slots": 1,
              "peak_tflops": None, "run_dir": str(tmp_path)}
    r = sweep.run_one({"size": "tiny", "layers": "mha", "label": "mha", "seed": 0}, common)
    assert r["slot_wait_s"] >= 0 and r["device_slots"] == 1
    assert slots.acquire(blocking=False)   # released after the run
