"""Checkpoints lose nothing and execute nothing: a kill at every point of a save resumes from the
last complete checkpoint, bit for bit (a real SIGKILL too); a planted malicious pickle is refused
and does not run; a run directory is locked against a second process, never overwritten unless
asked, and a finished run resumed is left as it was; a run whose loss turns NaN stops at that step
and keeps its last good checkpoint; model directories round-trip; every reader takes a run
directory, a checkpoint directory and the older layout."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sqt
from sqt import fileset
from sqt.checkpoint import (CheckpointError, RunDirectory, load_model, load_run_tokenizer,
                            load_train_state, save_model)
from sqt.cli import main as sqt_main
from sqt.config import LMConfig
from sqt.data import load_tinyshakespeare
from sqt.train import NonFiniteLoss, TrainConfig, train
from sqt.trainstate import pack, unpack

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL = LMConfig(vocab_size=65, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_seq_len=16,
                 dropout=0.1)   # dropout: a resume must restore the RNG state too


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread (and far faster than on threads that wait for
    each other on a busy machine); the tests train dozens of them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_tinyshakespeare()


def cfg(out_dir=None, **kw):
    base = dict(steps=4, batch_size=2, seq_len=16, lr=3e-3, warmup=2, eval_every=2,
                eval_batches=1, device="cpu", progress=False, log=False, checkpoint_every=2,
                out_dir=None if out_dir is None else str(out_dir))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    """The uninterrupted run every interrupted one must end equal to, and its save points."""
    labels = []
    fileset.crash_hook = labels.append
    try:
        result = train(MODEL, cfg(tmp_path_factory.mktemp("whole")), data)
    finally:
        fileset.crash_hook = None
    return result, labels


class Killed(BaseException):
    """A kill: nothing catches it, as nothing survives a SIGKILL."""


def same_run(a: dict, b: dict) -> bool:
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa) and a["curves"] == b["curves"]


def test_a_kill_at_every_point_of_every_save_resumes_exactly(data, whole, tmp_path):
    result, labels = whole
    assert labels.count("made the new directory") == 2     # checkpoints at steps 2 and 4
    assert {"moved the previous set aside", "renamed the new set into place",
            "removed the previous set", "writing result.json"} <= set(labels)
    for k, label in enumerate(labels):
        out = tmp_path / f"kill{k}"
        calls = iter(range(len(labels)))

        def kill(_label):
            if next(calls) == k:
                raise Killed
        fileset.crash_hook = kill
        try:
            with pytest.raises(Killed):
                train(MODEL, cfg(out), data)
        finally:
            fileset.crash_hook = None
        # Whatever the kill left, a reader finds one whole checkpoint (or none): never a mix.
        if RunDirectory(out).checkpoint() is not None:
            _, meta = load_model(out)
            assert meta["step"] == load_train_state(out)["step"] in (2, 4), label
        resumed = train(MODEL, cfg(out), data, resume=True)
        assert same_run(resumed, result), f"killed at {label!r} (point {k})"
        assert json.loads((out / "curves.jsonl").read_text().splitlines()[-1]) == \
            result["curves"][-1]
        assert json.loads((out / "result.json").read_text())["best_val_loss"] == \
            result["best_val_loss"]


def test_a_real_sigkill_between_the_renames_resumes_exactly(data, whole, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from sqt import fileset
        torch.set_num_threads(1)
        from sqt.config import LMConfig
        from sqt.data import load_tinyshakespeare
        from sqt.train import TrainConfig, train
        def hook(label):
            if label == "moved the previous set aside":   # in the step-4 save
                os.kill(os.getpid(), signal.SIGKILL)
        fileset.crash_hook = hook
        train(LMConfig(**{MODEL.to_dict()!r}), TrainConfig(**{cfg(out).to_dict()!r}),
              load_tinyshakespeare())
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={"PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed with the step-2 checkpoint moved aside and the step-4 one not yet in place.
    assert not (out / "checkpoint").exists() and (out / ".checkpoint.old").is_dir()
    assert load_model(out)[1]["step"] == 2
    assert same_run(train(MODEL, cfg(out), data, resume=True), whole[0])


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def legacy_run(run: Path, directory: Path) -> None:
    """Turn a checkpoint directory into the older layout: its files at the top of the run,
    the train state pickled in train_state.pt, the tokenizer a dict in config.json."""
    state, tok = load_train_state(directory), load_run_tokenizer(directory)
    meta = json.loads((directory / "config.json").read_text())
    shutil.move(str(directory / "model.safetensors"), run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({**meta, "tokenizer": tok.to_dict()}))
    torch.save(state, run / "train_state.pt")
    shutil.rmtree(directory)


def test_a_planted_malicious_pickle_is_refused_and_not_run(data, tmp_path):
    run = tmp_path / "run"
    train(MODEL, cfg(run, steps=2), data)
    legacy_run(run, run / "checkpoint")
    marker = tmp_path / "executed"
    torch.save({"optimizer": Payload(marker)}, run / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt' was refused.*never runs code"):
        train(MODEL, cfg(run, steps=2), data, resume=True)
    assert not marker.exists()
    torch.load(run / "train_state.pt", weights_only=False)    # the file is live: it would run
    assert marker.exists()


def test_an_older_run_resumes_from_its_pickled_state_exactly(data, whole, tmp_path):
    run = tmp_path / "run"

    def stop(step):
        if step == 3:
            raise Killed
    with pytest.raises(Killed):
        train(MODEL, cfg(run), data, callback=stop)
    legacy_run(run, run / "checkpoint")
    assert load_run_tokenizer(run) == data.tokenizer and load_model(run)[1]["step"] == 2
    assert same_run(train(MODEL, cfg(run), data, resume=True), whole[0])
    assert not (run / "train_state.pt").exists() and not (run / "config.json").exists()


def test_a_second_process_is_refused_and_a_killed_ones_lock_is_not_stale(data, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom sqt.checkpoint import RunDirectory\n"
         f"with RunDirectory({str(run)!r}).claim(resume=False, overwrite=False):\n"
         "    print('held', flush=True)\n    sys.stdin.read()"],
        env={"PYTHONPATH": str(SRC)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"is in use: another process \(pid "
                                                  rf"{holder.pid}\) is training into it"):
            train(MODEL, cfg(run, steps=2), data)
    finally:
        holder.kill()
        holder.wait()
    assert train(MODEL, cfg(run, steps=2), data)["best_step"] == 2   # the lock died with it


def snapshot(directory: Path) -> dict:
    """Every file's bytes and modification time (the lock file aside: taking it writes a pid)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_a_run_is_never_replaced_unless_asked(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(MODEL, cfg(run), data)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="already holds a run .*checkpoint/.*--resume.*"
                                              "--overwrite"):
        train(MODEL, cfg(run, lr=1e-3), data)
    args = ["train", "--size", "tiny", "--steps", "2", "--device", "cpu", "--no-progress",
            "--batch-size", "2", "--seq-len", "16", "--out-dir", str(run)]
    capsys.readouterr()
    assert sqt_main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and len(err.strip().splitlines()) == 1
    assert snapshot(run) == before
    again = train(MODEL, cfg(run, lr=1e-3, overwrite=True), data)
    assert json.loads((run / "result.json").read_text())["train_config"]["lr"] == 1e-3
    assert load_model(run)[1]["train"]["lr"] == 1e-3 and again["best_step"] is not None


def test_resuming_a_finished_run_changes_nothing(data, tmp_path):
    run = tmp_path / "run"
    first = train(MODEL, cfg(run), data)
    before = snapshot(run)
    again = train(MODEL, cfg(run), data, resume=True)
    assert snapshot(run) == before
    recorded = json.loads((run / "result.json").read_text())
    assert recorded["ms_per_step"] is not None and recorded["wall_s"] is not None
    assert {k: again[k] for k in recorded} == recorded
    assert same_run(again, first)
    # A kill after the last checkpoint but before result.json: the record comes back whole.
    (run / "result.json").unlink()
    train(MODEL, cfg(run), data, resume=True)
    assert json.loads((run / "result.json").read_text()) == recorded


def test_a_loss_that_turns_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    # lr 1e30: the first update leaves finite but enormous weights, and the loss after it is NaN.
    with pytest.raises(NonFiniteLoss, match=r"training loss became nan at step \d+: training "
                                            r"stopped, and the last good checkpoint, of step "
                                            r"\d+, is kept") as e:
        train(MODEL, cfg(run, lr=1e30, warmup=0, checkpoint_every=1), data)
    assert e.value.step > 1 and e.value.kept_step == e.value.step - 1
    model, meta = load_model(run)
    assert meta["step"] == e.value.kept_step == load_train_state(run)["step"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (run / "result.json").exists()


def test_a_diverging_run_on_the_command_line_is_one_line_naming_the_step(tmp_path, capsys):
    code = sqt_main(["train", "--size", "tiny", "--steps", "4", "--batch-size", "2",
                     "--seq-len", "16", "--eval-every", "2", "--device", "cpu", "--no-progress",
                     "--lr", "1e30", "--warmup", "0", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "sqt train: error: the training loss became nan at step" in err


def test_every_reader_takes_a_run_a_checkpoint_and_the_older_layout(data, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(MODEL, cfg(run, steps=2), data)
    older = tmp_path / "older"
    shutil.copytree(run, older)
    legacy_run(older, older / "checkpoint")
    x = torch.randint(0, 65, (1, 16))
    for path in (run, run / "checkpoint", older):
        model, meta = load_model(path)
        assert torch.equal(model(x), first["model"].eval()(x)) and meta["step"] == 2
        assert load_run_tokenizer(path) == data.tokenizer
        assert torch.equal(sqt.from_pretrained(path)(x), model(x))
        assert sqt_main(["generate", str(path), "--prompt", "To be", "--max-new-tokens", "3",
                         "--temperature", "0"]) == 0
    assert len({line for line in capsys.readouterr().out.splitlines()}) == 1


def test_export_takes_every_form(tmp_path):
    pytest.importorskip("transformers")
    from sqt.hf import export_checkpoint
    from sqt.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text("hello world")
    model = sqt.TransformerLM(LMConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2,
                                       n_layers=1, d_ff=16, block="modern"))
    save_model(tmp_path / "run" / "checkpoint", model, tokenizer=tok, meta={"step": 1})
    save_model(tmp_path / "older", model, tokenizer=tok)   # files at the top
    for i, path in enumerate((tmp_path / "run", tmp_path / "run" / "checkpoint",
                              tmp_path / "older")):
        export_checkpoint(path, tmp_path / f"hf{i}")
        assert (tmp_path / f"hf{i}" / "tokenizer.json").is_file()


def test_a_file_changed_after_the_checkpoint_was_written_is_refused(data, tmp_path):
    train(MODEL, cfg(tmp_path / "a", steps=2), data)
    train(MODEL, cfg(tmp_path / "b", steps=2, lr=1e-3), data)
    # The train state of another run swapped in: same names, same sizes, other bytes.
    shutil.copy(tmp_path / "b" / "checkpoint" / "train_state.safetensors",
                tmp_path / "a" / "checkpoint" / "train_state.safetensors")
    with pytest.raises(CheckpointError, match="train_state.safetensors' was changed after the "
                                              "set was written"):
        load_model(tmp_path / "a")
    with pytest.raises(CheckpointError, match="was changed after"):
        train(MODEL, cfg(tmp_path / "a", steps=2), data, resume=True)
    # A file of the set's own kind added later is refused; a note beside the set is not its own.
    model = load_model(tmp_path / "b")[0]
    save_model(tmp_path / "c", model)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    assert load_model(tmp_path / "c")[1]["format"] == 1
    data.tokenizer.save(tmp_path / "c" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="holds tokenizer.json, which its manifest.json does "
                                              "not list"):
        load_model(tmp_path / "c")


def test_model_directories_round_trip_and_refuse_to_delete_other_files(tmp_path):
    from sqt.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text("abc")
    torch.manual_seed(0)
    model = sqt.TransformerLM(LMConfig(vocab_size=3, d_model=16, n_heads=2, n_layers=1, d_ff=16,
                                       tie_embeddings=True, layers="sqt"))
    out = model.save_pretrained(tmp_path / "m", tokenizer=tok)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors",
                                                     "tokenizer.json"]
    back = sqt.from_pretrained(out)
    x = torch.tensor([[0, 1, 2, 1]])
    assert torch.equal(back(x), model.eval()(x)) and back.lm_head.weight is back.tok_emb.weight
    assert sqt.load_tokenizer(out) == tok
    model.save_pretrained(out)   # a model directory is replaced as a whole
    assert not (out / "tokenizer.json").exists()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files \\(m, notes.txt\\)"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_train_state_format_reads_back_exactly():
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
                 "param_groups": [{"lr": torch.tensor(0.1), "betas": (0.9, 0.99),
                                   "foreach": None, "params": [0]}]}
    tree = {"optimizer": opt_state, "best": [float("inf"), None], "$odd": 1,
            "rng": torch.get_rng_state()}
    tensors = {}
    packed = pack(tree, tensors)
    json.dumps(packed, allow_nan=False)   # standard JSON: no pickle, no NaN literals
    back = unpack(json.loads(json.dumps(packed)), tensors)
    assert list(back["optimizer"]["state"]) == [0]   # integer keys stay integers
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"],
                       opt_state["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert back["best"] == [float("inf"), None] and back["$odd"] == 1
    assert torch.equal(back["rng"], tree["rng"])
    with pytest.raises(TypeError, match="object cannot be stored"):
        pack({"x": object()}, {})


def test_no_checkpoint_is_ever_unpickled_beyond_plain_data():
    sources = "\n".join(p.read_text() for p in (SRC / "sqt").glob("*.py"))
    calls = re.findall(r"torch\.load\([^)]*\)", sources)
    assert calls and all("weights_only=True" in c for c in calls)
    assert "weights_only=False" not in sources and "pickle.load" not in sources
