"""The trainer, its checkpoints and resume, and the sweep/report benchmarks, at toy sizes on CPU."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from sqt.checkpoint import CheckpointError, load_model, load_run_tokenizer
from sqt.config import DEVICE_TYPES, PRESETS, RECIPES, SEED_SIZES, LMConfig, recipe_settings
from sqt.data import dataset_from_text, load_tinyshakespeare
from sqt.model import TransformerLM
from sqt.cli import main as sqt_main
from sqt.runconfig import MODEL_FIELDS, TRAIN_FIELDS, recipe
from sqt.train import TrainConfig, lr_at, train
from sqt.utils import known_peak_tflops

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
    assert load_run_tokenizer(tmp_path) == data.tokenizer and meta["step"] == 8
    curves = [json.loads(line) for line in (tmp_path / "curves.jsonl").read_text().splitlines()]
    assert curves == r["curves"]


def test_corrupted_checkpoint_gives_a_clear_error(data, tmp_path):
    train(MODEL, cfg(out_dir=str(tmp_path)), data)
    (tmp_path / "checkpoint" / "manifest.json").unlink()   # as an unchecked model directory
    weights = tmp_path / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_model(tmp_path)
    (tmp_path / "checkpoint" / "config.json").write_text('{"format": 1, "model": ')
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "checkpoint" / "train_state.json").write_bytes(b"garbage")
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
    args = ["train", "--size", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
            "--eval-every", "2", "--eval-batches", "1", "--device", "cpu", "--no-progress",
            "--out-dir", str(tmp_path)]
    assert sqt_main(args) == 0
    assert json.loads((tmp_path / "result.json").read_text())["best_step"] in (2, 4)
    assert sqt_main(args + ["--resume"]) == 0   # already finished: nothing left to do
    # Block checkpointing changes memory, not the model: a run resumes with it switched on.
    assert sqt_main(args + ["--resume", "--checkpoint-blocks"]) == 0
    capsys.readouterr()
    assert sqt_main(args[:-2] + ["--lr", "-3"]) == 2
    err = capsys.readouterr().err
    assert "lr=-3.0" in err and len(err.strip().splitlines()) == 1


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
    import multiprocessing
    from bench import execution, sweep
    from bench.device_slots import Coordinator
    coord = Coordinator(multiprocessing.get_context("spawn"), slots=1, positions=1)
    monkeypatch.setattr(execution, "_COORD", coord)
    common = {"data": "tinyshakespeare", "steps": 3, "batch_size": 2, "seq_len": 16,
              "lr": None, "dropout": None, "eval_every": 3, "eval_batches": 1, "device": "cpu",
              "compile": None, "compile_mode": None, "progress": False, "jobs": 2, "slots": 1,
              "peak_tflops": None, "run_dir": str(tmp_path)}
    r = sweep.run_one({"size": "tiny", "layers": "mha", "label": "mha", "seed": 0}, common)
    assert r["slot_wait_s"] >= 0 and r["device_slots"] == 1 and r["gpu_s"] > 0
    assert coord.sem.acquire(block=False)   # released after the run


def test_gradient_accumulation_equals_the_whole_batch(data):
    """K micro-batches of B/K windows give the update of one batch of B (dropout off), and the
    model really sees micro-batches."""
    model_cfg = dataclasses.replace(MODEL, dropout=0.0)
    seen = []

    def record(module, args):
        if isinstance(module, TransformerLM):
            seen.append(args[0].shape[0])

    runs = {}
    for k in (1, 4):
        seen.clear()
        hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
        try:
            # Adam scales each coordinate's step to about lr, so a gradient that is zero but for
            # rounding (the key bias's) moves by up to lr x its noise: lr 1e-3 keeps that < 1e-6.
            runs[k] = train(model_cfg, cfg(steps=4, batch_size=8, grad_accum=k, eval_every=4,
                                           lr=1e-3), data)
        finally:
            hook.remove()
        assert set(seen) == {8 // k}
    a, b = runs[1]["model"].state_dict(), runs[4]["model"].state_dict()
    assert max((a[n] - b[n]).abs().max().item() for n in a) < 1e-6
    assert runs[1]["final_train_loss"] == pytest.approx(runs[4]["final_train_loss"], abs=1e-6)


def test_budgets_resolve_to_whole_steps():
    n_train = 10_007
    for batch, seq in ((4, 32), (3, 17)):
        per_step = batch * seq
        for tokens in (1, per_step, per_step + 1, 5000):
            steps = TrainConfig(batch_size=batch, seq_len=seq, tokens=tokens).resolve(n_train).steps
            assert steps * per_step >= tokens > (steps - 1) * per_step
        for epochs in (0.5, 1, 2.25):
            steps = TrainConfig(batch_size=batch, seq_len=seq, epochs=epochs).resolve(n_train).steps
            assert steps * per_step >= epochs * n_train > (steps - 1) * per_step
    resolved = TrainConfig(steps=7).resolve(n_train)
    assert resolved.steps == 7 and resolved.eval_every == 1
    with pytest.raises(ValueError, match="steps=5, tokens=10: expected one budget"):
        TrainConfig(steps=5, tokens=10)
    with pytest.raises(ValueError, match="epochs=0: expected a finite number > 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="grad_accum=3: expected a divisor of batch_size=8"):
        TrainConfig(batch_size=8, grad_accum=3)


def test_an_epoch_budget_is_measured_on_the_training_split():
    small = dataset_from_text("the quick brown fox jumps over the lazy dog. " * 20, "fox")
    r = train(LMConfig(vocab_size=small.tokenizer.vocab_size, d_model=16, n_heads=2, n_layers=1,
                       d_ff=16, max_seq_len=16),
              cfg(steps=None, epochs=2, batch_size=4, seq_len=16, eval_every=100), small)
    steps = math.ceil(2 * len(small.train) / (4 * 16))
    assert r["budget"]["steps"] == r["train_config"]["steps"] == r["curves"][-1]["step"] == steps
    assert r["budget"]["asked"] == {"epochs": 2} and r["budget"]["epochs"] >= 2


def test_mfu_needs_a_known_peak(data):
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.5
    assert known_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.5
    assert known_peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert known_peak_tflops("Some Future GPU", torch.bfloat16) is None
    unknown = train(MODEL, cfg(steps=12, eval_every=12), data)     # on the CPU: no table entry
    assert unknown["mfu"] is None and unknown["peak_source"] is None
    assert "peak_memory_bytes" in unknown and unknown["peak_memory_bytes"] is None   # CUDA only
    measured = train(MODEL, cfg(steps=12, eval_every=12), data, peak_tflops=0.5)
    assert measured["mfu"] == pytest.approx(measured["achieved_tflops"] / 0.5)
    assert measured["tokens_per_s"] == pytest.approx(4 * 32 / (measured["ms_per_step"] * 1e-3))


def test_every_preset_has_a_recipe_of_known_settings():
    assert set(SEED_SIZES) <= set(RECIPES) == set(PRESETS)
    for name in PRESETS:
        for device_type in DEVICE_TYPES:
            values = recipe_settings(name, device_type)
            assert set(values) <= set(MODEL_FIELDS) | set(TRAIN_FIELDS)
            model, train_cfg = recipe(name, device_type=device_type)
            assert all(getattr(train_cfg if k in TRAIN_FIELDS else model, k) == v
                       for k, v in values.items())
            assert model.max_seq_len >= train_cfg.seq_len
    with pytest.raises(ValueError, match="setting 'learning_rate': expected a field of LMConfig"):
        recipe("tiny", device_type="cpu", learning_rate=1.0)


def test_a_sweep_records_failed_runs_and_goes_on(tmp_path, capsys, monkeypatch):
    """A run whose loss turns NaN and one that runs out of memory are recorded as failed, with
    the reason, and left out of the means; the other runs finish and the report lists both."""
    import sqt.train as trainer
    from bench import sweep
    real = trainer.train

    def flaky(model_cfg, train_cfg, data, **kw):
        if model_cfg.layers == "xsqa":
            raise trainer.NonFiniteLoss(what="training loss", value=math.nan, step=3,
                                        kept_step=None, where=None)
        if model_cfg.layers == "gqa":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model_cfg, train_cfg, data, **kw)
    monkeypatch.setattr(trainer, "train", flaky)
    out = tmp_path / "results"
    assert sweep.main(["--sizes", "tiny", "--variants", "mha", "xsqa", "gqa", "--steps", "2",
                       "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1",
                       "--device", "cpu", "--no-latency", "--no-plot", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (summary,) = (out / "sweep").glob("*/summary.json")
    s = json.loads(summary.read_text())
    assert [r["variant"] for r in s["rows"]] == ["mha"]
    assert {(f["variant"], f["kind"], f["step"]) for f in s["failed"]} == {
        ("xsqa", "non-finite loss", 3), ("gqa", "out of memory", None)}
    assert "### Failed runs" in printed and "| tiny | gqa | 0 | out of memory |" in printed
    assert "became nan at step 3" in printed


def test_a_warmup_as_long_as_the_run_is_named(data, capsys):
    train(MODEL, cfg(steps=3, warmup=10, eval_every=3, log=False), data)
    err = capsys.readouterr().err
    assert "warmup=10 >= steps=3" in err and "never reaches its peak lr=0.003" in err
    train(MODEL, cfg(steps=3, warmup=2, eval_every=3, log=False), data)
    assert "warmup" not in capsys.readouterr().err
