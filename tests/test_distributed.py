"""Training as two processes on the CPU (gloo): a DDP or FSDP2 step is the step of one process on
the whole batch, the evaluation is the one process's, rank 0 alone writes, every rank stops with
the same error, a killed run resumes to the uninterrupted result (at any world size), and a run
started by torchrun is a plain checkpoint that `sqt generate` reads."""

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sqt import fileset
from sqt.checkpoint import load_model, load_train_state
from sqt.cli import main as sqt_main
from sqt.config import LMConfig
from sqt.data import load_tinyshakespeare
from sqt.divergence import FiniteWatch, NonFiniteLoss
from sqt.distributed import Parallel
from sqt.evaluation import evaluate
from sqt.model import TransformerLM
from sqt.train import TrainConfig, check_run, train
from sqt.windows import fixed_windows, share_rows

ROOT = Path(__file__).resolve().parents[1]
MODEL = LMConfig(vocab_size=65, d_model=32, n_heads=2, n_layers=2, d_ff=64, max_seq_len=32,
                 dropout=0.0)
WORLD = 2
# Every (parallel mode, grad_accum) the first test trains, by run directory name.
CASES = {f"{mode}-{k}": (mode == "fsdp", k) for mode in ("ddp", "fsdp") for k in (1, 2)}


def cfg(**kw):
    # A small grad_clip, so clipping acts at every step: its norm must be the global one. lr
    # 1e-3: Adam moves a coordinate whose gradient is rounding noise by up to lr (see
    # test_train's accumulation test), which 1e-5 must cover.
    base = dict(steps=3, batch_size=8, seq_len=32, lr=1e-3, warmup=1, eval_every=3,
                eval_batches=2, grad_clip=0.05, device="cpu", progress=False, log=False)
    return TrainConfig(**{**base, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(task, out: Path, *args) -> None:
    """Run `task(rank, out, *args)` in WORLD processes joined in one gloo group."""
    mp.spawn(_rank_main, args=(free_port(), task, str(out), args), nprocs=WORLD)


def _rank_main(rank, port, task, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # The group is this function's, so that one process can train several runs in it.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        task(rank, Path(out), *args)
        dist.barrier()
    finally:
        # What the task wrapped (DDP's reducer, FSDP's state) goes while the group is alive: torn
        # down later, at interpreter exit, it can abort the process (std::terminate).
        gc.collect()
        dist.destroy_process_group()


def _equivalence_task(rank, out):
    data = load_tinyshakespeare()
    points, rows = [], {}
    fileset.crash_hook = lambda label: points.append(label)    # every write passes a point
    for name, (fsdp, k) in CASES.items():
        def record(module, args, name=name):
            if isinstance(module, TransformerLM) and module.training:
                rows.setdefault(name, set()).add(args[0].shape[0])
        hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
        try:
            train(MODEL, cfg(grad_accum=k, fsdp=fsdp, out_dir=str(out / name)), data)
        finally:
            hook.remove()
    fileset.crash_hook = None
    synced = {mode: _gradients_synced(rank, sharded=mode == "fsdp") for mode in ("ddp", "fsdp")}
    # Rank 0's refusal is every rank's, with its message.
    try:
        train(MODEL, cfg(out_dir=str(out / "ddp-1")), data)
    except ValueError as e:
        refused = f"{type(e).__name__}: {e}" if rank else str(e)
    # A non-finite value seen by rank 1 alone stops both ranks with one message.
    watch = FiniteWatch(torch.device("cpu"))
    if rank == 1:
        watch.note(torch.tensor(float("nan")), 0, torch.tensor(4))
    Parallel(torch.device("cpu"), rank=rank, world_size=WORLD, backend="gloo").agree_on_first(
        watch)
    try:
        watch.check(kept_step=None, where=None)
        stopped = None
    except NonFiniteLoss as e:
        stopped = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"writes": len(points), "refused": refused, "stopped": stopped, "synced": synced,
         "rows": {name: sorted(seen) for name, seen in rows.items()}}))


def _gradients_synced(rank, *, sharded: bool) -> list:
    """Whether the ranks' gradients were combined after each of two micro-steps (rank-dependent
    data): DDP's are equal on every rank once all-reduced; FSDP2's sharded .grad exists only
    once reduce-scattered (until then each rank accumulates its own, unsharded)."""
    torch.manual_seed(0)
    model = TransformerLM(MODEL)
    parallel = Parallel(torch.device("cpu"), rank=rank, world_size=WORLD, backend="gloo",
                        sharded=sharded)
    net = parallel.wrap(model)
    x = torch.randint(0, MODEL.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(rank))
    synced = []
    for i, last in enumerate((False, True)):
        with parallel.micro_step(last=last):
            net(x[i]).float().square().mean().backward()
        if sharded:
            synced.append(all(p.grad is not None for p in model.parameters()))
        else:
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            both = [torch.empty_like(grads) for _ in range(WORLD)]
            dist.all_gather(both, grads)
            synced.append(torch.equal(both[0], both[1]))
    return synced


@pytest.fixture(scope="module")
def data():
    return load_tinyshakespeare()


def test_ddp_and_fsdp_steps_equal_one_process_on_the_whole_batch(data, tmp_path):
    spawn(_equivalence_task, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    alone = {k: train(MODEL, cfg(grad_accum=k), data) for k in (1, 2)}
    val_x, val_y = fixed_windows(data.val, 2 * 8, 32, "cpu")
    for name, (fsdp, k) in CASES.items():
        model, meta = load_model(tmp_path / name)
        ref = alone[k]["model"].state_dict()
        got = model.state_dict()
        assert max((ref[n] - got[n]).abs().max().item() for n in ref) < 1e-5, name
        record = json.loads((tmp_path / name / "result.json").read_text())
        expected = {"world_size": WORLD, "process_group_backend": "gloo",
                    "parallel": "fsdp" if fsdp else "ddp"}
        assert {key: record[key] for key in expected} == expected
        assert {key: meta[key] for key in expected} == expected
        # Each rank scored its share; together, exactly what one process scores.
        loss, acc, _ = evaluate(model, val_x, val_y, contextlib.nullcontext, micro_batch=8 // k)
        # (Equal up to the order of a float sum: the ranks' partial sums meet in an all-reduce.)
        assert record["final_val_loss"] == pytest.approx(loss, abs=1e-6)
        assert record["final_val_acc"] == pytest.approx(acc, abs=1e-9)
        assert record["final_train_loss"] == pytest.approx(alone[k]["final_train_loss"], abs=1e-6)
        # Each rank trained on its half of each batch, in k micro-batches.
        assert all(r["rows"][name] == [8 // WORLD // k] for r in ranks)
    assert ranks[0]["writes"] > 0 and ranks[1]["writes"] == 0     # rank 0 alone writes
    assert "already holds a run" in ranks[0]["refused"]
    assert ranks[1]["refused"] == "ValueError: " + ranks[0]["refused"]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] and "at step 5" in ranks[0]["stopped"]
    # Gradients are combined on the last micro-step of a step only.
    assert all(r["synced"] == {"ddp": [False, True], "fsdp": [False, True]} for r in ranks)


def _resume_task(rank, out, phase):
    data = load_tinyshakespeare()
    sharded = dict(cfg(steps=8, eval_every=2, checkpoint_every=3, fsdp=True).to_dict(),
                   out_dir=None)
    dropped = dataclasses.replace(MODEL, dropout=0.1)   # each rank's own masks, resumed too

    def run(name, **kw):
        return train(dropped, TrainConfig(**{**sharded, "out_dir": str(out / name), **kw}),
                     data, resume=phase == "resume")

    if phase == "resume":
        run("killed")
        return

    def copy_at_3(step):
        if step == 3 and rank == 0:
            shutil.copytree(out / "plain", out / "from-two", ignore=shutil.ignore_patterns(".lock"))

    train(MODEL, cfg(steps=8, eval_every=2, checkpoint_every=3, out_dir=str(out / "plain")),
          data, callback=copy_at_3)
    run("whole")

    def kill(step):
        if step == 5:    # two steps past the checkpoint of step 3: lost, as in a real kill
            os.kill(os.getpid(), signal.SIGKILL)

    train(dropped, TrainConfig(**{**sharded, "out_dir": str(out / "killed")}), data,
          callback=kill)


def test_a_killed_run_resumes_to_the_uninterrupted_result_at_any_world_size(data, tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        spawn(_resume_task, tmp_path, "train")
    assert load_train_state(tmp_path / "killed")["step"] == 3
    spawn(_resume_task, tmp_path, "resume")
    whole, resumed = (load_model(tmp_path / name)[0].state_dict() for name in ("whole", "killed"))
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
    curves = [json.loads((tmp_path / n / "result.json").read_text())["curves"]
              for n in ("whole", "killed")]
    assert curves[0] == curves[1]
    # Full state dicts: a 2-process checkpoint resumes in one process, to the same run.
    state = load_train_state(tmp_path / "from-two")
    assert state["step"] == 3 and len(state["rng_ranks"]) == WORLD - 1
    two = load_model(tmp_path / "plain")[0].state_dict()
    one = train(MODEL, cfg(steps=8, eval_every=2, checkpoint_every=3,
                           out_dir=str(tmp_path / "from-two")), data, resume=True)
    assert one["world_size"] == 1
    got = one["model"].state_dict()
    assert max((two[n] - got[n]).abs().max().item() for n in two) < 1e-5


def test_torchrun_trains_a_plain_checkpoint_that_one_process_generates_from(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(WORLD), "-m", "sqt", "train", "--size", "tiny", "--steps", "3", "--batch-size", "4",
         "--seq-len", "32", "--eval-batches", "1", "--device", "cpu", "--fsdp",
         "--out-dir", str(run)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if '"result"' in line]
    assert len(results) == 1 and results[0]["world_size"] == WORLD    # rank 0 alone prints
    assert done.stderr.count("[train]") == 1
    assert "2 processes, FSDP over gloo" in done.stderr
    model, meta = load_model(run)
    assert meta["parallel"] == "fsdp" and model.config.d_model == 128
    capsys.readouterr()
    assert sqt_main(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                     "--seed", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_a_batch_that_does_not_split_evenly_is_refused(data):
    with pytest.raises(ValueError, match=r"batch_size=6: expected a multiple of world_size x "
                                         r"grad_accum = 2 x 2"):
        check_run(MODEL, cfg(batch_size=6, grad_accum=2), data, world_size=2)
    assert [share_rows(8, (r, 2)) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="batch_size=6: expected a multiple of the 4"):
        share_rows(6, (0, 4))


def test_a_grid_pins_each_worker_to_a_gpu_of_its_own(monkeypatch):
    from bench import sweep
    from bench.gpus import parse_gpus
    assert parse_gpus("all", available=4) == [0, 1, 2, 3]
    assert parse_gpus("2,0", available=4) == [2, 0]
    for bad in ("0,0", "4", "x", ""):
        with pytest.raises(ValueError, match="expected 'all' or distinct indices in 0..3"):
            parse_gpus(bad, available=4)
    # Worker i is pinned to gpus[i] before CUDA starts in it; indices count the GPUs visible.
    import grid_tasks
    from bench import execution
    for visible, expected in ((None, {"2", "0"}), ("5,7,9", {"9", "5"})):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        records = execution.run_grid(grid_tasks.visible_gpus, [{}] * 4, {}, jobs=2, gpus=[2, 0])
        assert {r["visible"] for r in records} == expected
        by_pid = {}
        for r in records:
            by_pid.setdefault(r["pid"], set()).add(r["visible"])
        assert all(len(v) == 1 for v in by_pid.values())   # a worker keeps its one GPU
    args = sweep.build_parser().parse_args(["--gpus", "0,1", "--device", "cpu"])
    with pytest.raises(ValueError, match="--gpus 0,1 with --device cpu: expected --device auto"):
        sweep.check_args(args)
