"""The two training feeds: windows gathered on the device from the uploaded split, or on the host
from a prepared dataset's memmap. Both give the same batches for the same (seed, step), so the same
trained weights, with gradient accumulation and across a resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from sqt.config import LMConfig
from sqt.data import prepare
from sqt.train import TrainConfig, train
from sqt.windows import CHUNK, HostFeed, Sampler, data_on_device, fixed_windows, make_feed, upload

TEXT = "".join(f"line {i}: the quick brown fox {i % 7} jumps over {i % 11} lazy dogs.\n"
               for i in range(400))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed")
    (root / "corpus.txt").write_text(TEXT)
    return prepare(root / "corpus.txt", "char", root / "data", val_fraction=0.1,
                   log=lambda msg: None)


def test_the_feeds_give_the_same_batches_at_every_step(prepared):
    on_device = Sampler(upload(prepared.train, "cpu"), 6, 20, 7)
    from_host = HostFeed(prepared.train, 6, 20, 7, "cpu")
    assert isinstance(prepared.train, np.memmap)
    for step in (0, 1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
        on_device.prepare(step)
        from_host.prepare(step)
        a, b = on_device.batch(torch.tensor(step)), from_host.batch(torch.tensor(step))
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        # The targets are the inputs shifted by one, both cut from the split's tokens.
        assert torch.equal(a[0][:, 1:], a[1][:, :-1])
    fresh = HostFeed(prepared.train, 6, 20, 7, "cpu")   # a pure function of the step: a feed
    fresh.prepare(CHUNK + 1)                            # with no history gives the same batch
    on_device.prepare(CHUNK + 1)
    assert torch.equal(fresh.batch(None)[0], on_device.batch(torch.tensor(CHUNK + 1))[0])


def test_the_feeds_train_the_same_weights(prepared, tmp_path):
    model = LMConfig(vocab_size=prepared.tokenizer.vocab_size, d_model=32, n_heads=4,
                     n_layers=2, d_ff=64, max_seq_len=32, dropout=0.1)
    base = TrainConfig(steps=6, batch_size=4, grad_accum=2, seq_len=32, lr=3e-3, warmup=2,
                       eval_every=3, eval_batches=2, device="cpu", progress=False, log=False)
    runs = {feed: train(model, dataclasses.replace(base, data_on_device=feed), prepared)
            for feed in (True, False)}
    assert (runs[True]["data_feed"], runs[False]["data_feed"]) == ("device", "host")
    a, b = runs[True]["model"].state_dict(), runs[False]["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[True]["curves"] == runs[False]["curves"]

    # A run fed from the host resumes exactly, even from a checkpoint the device feed wrote.
    class Killed(Exception):
        pass

    def kill(step):
        if step == 4:
            raise Killed

    out = dataclasses.replace(base, out_dir=str(tmp_path), checkpoint_every=3,
                              data_on_device=True)
    with pytest.raises(Killed):
        train(model, out, prepared, callback=kill)
    resumed = train(model, dataclasses.replace(out, data_on_device=False), prepared, resume=True)
    c = resumed["model"].state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_automatic_choice_uploads_small_splits_and_streams_large_ones(prepared):
    assert data_on_device(True, 10**12, "cpu") and not data_on_device(False, 10, "cpu")
    assert data_on_device(None, 1000, "cpu")
    assert not data_on_device(None, 10**15, "cpu")   # 8 PB of int64 tokens fit nowhere
    feed = make_feed(prepared.train, batch_size=2, seq_len=8, seed=0, device="cpu",
                     on_device=None)
    assert feed.kind == "device"


def test_validation_windows_are_the_same_from_a_memmap_or_a_tensor(prepared):
    x, y = fixed_windows(prepared.val, 5, 16, "cpu")
    tensor_x, _ = fixed_windows(torch.from_numpy(np.asarray(prepared.val).astype(np.int64)), 5,
                                16, "cpu")
    assert x.shape == y.shape == (5, 16) and x.dtype == torch.long and torch.equal(x, tensor_x)
    with pytest.raises(ValueError, match="seq_len=50000: the validation split has only"):
        fixed_windows(prepared.val, 5, 50_000, "cpu")
    with pytest.raises(ValueError, match="seq_len=50000: the training split has only"):
        HostFeed(prepared.train, 2, 50_000, 0, "cpu")


def test_the_benchmark_runs_both_feeds_and_writes_its_json(prepared, tmp_path, capsys):
    from bench import data_feed
    assert data_feed.order(3) == ["device", "host", "host", "device", "device", "host"]
    assert data_feed.main(["--data", str(prepared.path), "--steps", "20", "--repeats", "1",
                           "--preset", "tiny", "--seq-len", "16", "--batch-size", "2",
                           "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target: host feed at most 2 % slower" in out
    (path,) = tmp_path.glob("*-tiny-T16.json")
    result = json.loads(path.read_text())
    assert result["batches_equal"] and [r["feed"] for r in result["runs"]] == ["device", "host"]
    losses = {r["final_train_loss"] for r in result["runs"]}
    assert len(losses) == 1   # the same windows, the same work
    assert result["dataset"]["sha256"] == prepared.sha256
    assert set(result["summary"]) == {"device", "host", "host_slower_pct"}
