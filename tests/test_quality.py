"""The quality benchmark end to end on the CPU: a toy regime (the tiny preset, characters) trains
a 2 x 2 grid on a tiny prepared corpus, records every run with its samples, resumes instead of
re-training, runs in parts merged by identity, and honours the wall-time guard; the real regimes
are well formed."""

import json

import pytest

from bench import quality
from bench import quality_grid as qg
from sqt.config import preset
from sqt.variants import parse_layer

TOY = qg.Regime(name="toy", preset="tiny", tokenizer="char",
                variants={"mha": "mha", "xsqa": "xsqa"}, budget={"epochs": 1.0}, eval_points=2, eval_batches=1, val_fraction=0.1, jobs=1,
                about="a toy grid")


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setitem(qg.REGIMES, "toy", TOY)
    docs = [" ".join(["the cat sat on the mat", "a dog ran", "to the red house"][i % 3]
                     for _ in range(8)) + "." for i in range(40)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return path


def args(corpus, tmp_path, *more):
    seeds = [] if "--seed-list" in more else ["--seeds", "2"]
    return ["toy", "--corpus", str(corpus), "--steps", "3", "--batch-size", "2", "--seq-len",
            "16", "--eval-batches", "1", "--device", "cpu", "--data-dir",
            str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--sample-tokens", "8", *seeds,
            *more]


def test_a_tiny_grid_trains_records_resumes_and_reports(corpus, tmp_path, capsys):
    assert quality.main(args(corpus, tmp_path, "--seed-list", "1")) == 0
    (folder,) = (tmp_path / "out" / "quality").iterdir()
    assert folder.name.startswith("toy-primary-corpus-")
    first = sorted(p.name for p in (folder / "runs").iterdir())
    assert first == ["mha-s1.json", "xsqa-s1.json"]
    # The second part trains what the first left (seed 0) and nothing twice.
    assert quality.main(args(corpus, tmp_path)) == 0
    runs = {p.name: json.loads(p.read_text()) for p in (folder / "runs").iterdir()}
    assert sorted(runs) == ["mha-s0.json", "mha-s1.json", "xsqa-s0.json", "xsqa-s1.json"]
    parts = [json.loads(p.read_text()) for p in (folder / "parts").iterdir()]
    assert sorted(len(p["ok"]) for p in parts) == [2, 2]
    r = runs["xsqa-s0.json"]
    grid = json.loads((folder / "grid.json").read_text())
    assert r["status"] == "ok" and r["grid_id"] == grid["id"]
    assert r["layouts"] == ["1/1"] and r["ms_per_step"] > 0 and r["gpu_s"] > 0
    walls = [c["wall_s"] for c in r["curves"]]
    assert walls == sorted(walls) and walls[0] >= 0
    assert len(r["samples"]) == 3 and all(s["prompt"] for s in r["samples"])
    # The same fixed prompts for every run of the grid.
    prompts = [s["prompt"] for s in runs["mha-s1.json"]["samples"]]
    assert [s["prompt"] for s in r["samples"]] == prompts
    out = capsys.readouterr().out
    assert "| xSQA | 1/1 |" in out and "4 of 6 runs trained in 2 part(s)" in out
    # Nothing left: a third invocation trains nothing; --plan says so without training.
    assert quality.main(args(corpus, tmp_path, "--plan")) == 0
    assert "to train in this part 0" in capsys.readouterr().out


def test_another_budget_is_another_grid_and_the_guard_skips_runs(corpus, tmp_path, capsys):
    assert quality.main(args(corpus, tmp_path, "--max-minutes", "0.0001")) == 0
    (folder,) = (tmp_path / "out" / "quality").iterdir()
    assert not (folder / "runs").exists()
    (part,) = [json.loads(p.read_text()) for p in (folder / "parts").iterdir()]
    assert len(part["skipped"]) == 4 and part["ok"] == []
    assert "run the same command again" in capsys.readouterr().out
    more = args(corpus, tmp_path, "--variants", "mha", "--seed-list", "0")
    more[more.index("--steps") + 1] = "4"
    assert quality.main(more) == 0
    assert len(list((tmp_path / "out" / "quality").iterdir())) == 2


def test_bad_options_are_one_line_and_status_2(corpus, tmp_path, capsys):
    assert quality.main(args(corpus, tmp_path, "--variants", "bogus")) == 2
    assert quality.main(args(tmp_path / "missing.txt", tmp_path)) == 2
    assert quality.main(args(corpus, tmp_path, "--gpus", "0,1", "--device", "cpu")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "bogus" in err[0] and "missing.txt" in err[1]
    assert "--gpus 0,1 with --device cpu: expected --device auto or cuda" in err[2]


def test_the_regimes_are_well_formed():
    for regime in qg.REGIMES.values():
        for layers in regime.variants.values():
            preset(regime.preset, layers=layers)        # every variant builds
    micro = qg.REGIMES["micro"]
    heads = {v: parse_layer(micro.variants[v], preset("sqat-micro").n_heads)
             for v in micro.variants}
    # The model card's layouts at 8 heads.
    assert {v: (s.n_q_heads, s.n_kv_heads) for v, s in heads.items()} == {
        "gqa": (8, 2), "mqa": (8, 1), "sqa": (4, 2), "ssqa": (4, 4), "xsqa": (2, 2),
        "mha": (8, 8)}
    assert len(qg.REGIMES["dense"].variants) == 10
