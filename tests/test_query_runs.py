"""`sqt probe` and `sqt convert` on checkpoint directories: one the project wrote and one imported
from a tiny random Hugging Face Llama. The converted checkpoint is an ordinary one: it loads,
trains from its weights, and exports to Hugging Face with the same logits."""

import json

import pytest
import torch

from sqt import LMConfig, TransformerLM
from sqt.checkpoint import load_model, save_model
from sqt.cli import main
from sqt.data import load_text_file
from sqt.runconfig import TrainConfig
from sqt.train import train

TEXT = "".join(f"{i} the quick brown fox jumps over the lazy dog; " for i in range(120))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path, load_text_file(path)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    _, data = corpus
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(vocab_size=data.tokenizer.vocab_size, d_model=32, n_heads=8,
                                   n_layers=2, d_ff=48, max_seq_len=32, block="modern"))
    return save_model(tmp_path_factory.mktemp("run"), model, tokenizer=data.tokenizer,
                      meta={"train": {"seq_len": 16}})


def sqt(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_probe_writes_its_table_and_json(run, corpus, capsys, tmp_path):
    code, out, err = sqt(capsys, "probe", run, "--data", corpus[0], "--tokens", 256,
                         "--device", "cpu", "--out", tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["seq_len"] == 16 and report["windows"] == 16      # the run's training window
    assert all(0 <= s <= 1 for layer in report["layers"] for s in layer["q_share"])
    assert "| 0 | `proj:8/8` |" in out and (tmp_path / "probe.md").read_text() == out


def test_probe_without_data_it_can_find_is_one_line(run, capsys):
    code, _, err = sqt(capsys, "probe", run, "--device", "cpu")
    assert code == 2 and "give --data" in err and len(err.strip().splitlines()) == 1


def test_a_converted_checkpoint_loads_trains_and_exports(run, corpus, capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from sqt.hf import export_hf
    code, out, err = sqt(capsys, "convert", run, "--to", "xsqa", "--method", "pooled", "--out",
                         tmp_path / "x", "--data", corpus[0], "--eval-tokens", 128,
                         "--device", "cpu")
    assert code == 0, err
    line = json.loads(out)
    assert line["to"] == ["xsqa", "xsqa"] and line["loss_converted"] > 0
    model, meta = load_model(tmp_path / "x")
    assert meta["conversion"]["data"] == str(corpus[0])
    assert (tmp_path / "x" / "tokenizer.json").is_file()
    # It trains, starting from its own weights ...
    result = train(model.config, TrainConfig(steps=1, batch_size=2, seq_len=16, eval_batches=1,
                                             warmup=1, device="cpu", progress=False, log=False),
                   corpus[1], init_from=tmp_path / "x")
    assert not torch.equal(result["model"].blocks[0].attn.o_proj.weight,
                           model.blocks[0].attn.o_proj.weight)
    # ... and exports with the same logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, tmp_path / "hf"))
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_convert_with_a_fine_tune_is_a_fresh_run_from_the_converted_weights(run, corpus, capsys,
                                                                            tmp_path):
    code, out, err = sqt(capsys, "convert", run, "--to", "sqt", "--layers", 1, "--out",
                         tmp_path / "t", "--data", corpus[0], "--tokens", 64, "--batch-size", 2,
                         "--corpus-tokens", 256, "--eval-tokens", 64, "--device", "cpu")
    assert code == 0, err
    record = json.loads((tmp_path / "t" / "conversion.json").read_text())
    assert record["finetune"]["steps"] == 2 and record["loss_finetuned"] > 0
    model, _ = load_model(tmp_path / "t")
    assert [s.query for s in model.specs] == ["proj", "table"]
    # A second tool finds the data the conversion recorded.
    assert sqt(capsys, "probe", tmp_path / "t", "--tokens", 64, "--device", "cpu")[0] == 0


def test_a_head_conversion_needs_no_text(run, capsys, tmp_path):
    code, out, err = sqt(capsys, "convert", run, "--to", "gqa", "--out", tmp_path / "g")
    assert code == 0, err
    assert json.loads(out)["loss_converted"] is None        # the run records no data to score on
    code, _, err = sqt(capsys, "convert", run, "--to", "sqt", "--out", tmp_path / "t")
    assert code == 2 and "give --data" in err                # a table averages over text


def test_convert_refuses_a_full_directory_and_a_bad_target(run, capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    code, _, err = sqt(capsys, "convert", run, "--to", "gqa", "--out", tmp_path / "full",
                       "--eval-tokens", 0)
    assert code == 2 and "not empty" in err
    code, _, err = sqt(capsys, "convert", run, "--to", "rsqa", "--out", tmp_path / "r",
                       "--eval-tokens", 0)
    assert code == 2 and "reverse SQA" in err


def test_tools_work_on_a_model_imported_from_hugging_face(corpus, tmp_path):
    transformers = pytest.importorskip("transformers")
    from sqt.convert import convert_run
    from sqt.hf import import_checkpoint
    from sqt.probe_report import probe_run
    path, data = corpus
    cfg = transformers.LlamaConfig(vocab_size=data.tokenizer.vocab_size, hidden_size=32,
                                   intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    report, _ = probe_run(tmp_path / "run", data=str(path), tokens=256, seq_len=16,
                          out=tmp_path / "probe")
    assert [r["spec"] for r in report["layers"]] == ["proj:8/4"] * 2
    for to, method in (("xsqa", "content"), ("table:gqa", "first"), ("mqa", "pooled")):
        record = convert_run(tmp_path / "run", tmp_path / to, to, method=method, data=str(path),
                             seq_len=16, corpus_tokens=256, eval_tokens=64)
        model, _ = load_model(tmp_path / to)
        assert model.config.layers == to and record["loss_converted"] > 0
