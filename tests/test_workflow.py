"""The guide's path through the command line, at toy size on the CPU: a corpus, `sqt prepare` with
a BPE made on the spot, `sqt train --data DIR` of a custom 2-layer SQA model, `sqt generate` (decoded
with the checkpoint's own tokenizer, streamed in whole characters, stopping at end-of-text),
`sqt export` to a directory `transformers` loads with the same logits, and `sqt import-hf` back."""

import json
import random

import pytest
import torch

from sqt import LMConfig, TransformerLM
from sqt.checkpoint import load_model, load_run_tokenizer, save_model
from sqt.cli import main
from sqt.data import PreparedDataset
from sqt.generate import generate
from sqt.tokenizer import CharTokenizer

transformers = pytest.importorskip("transformers")

WORDS = "the cat sat on a mat while dogs ran über café 世界 🙂 naïve façade".split()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("guide")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 40))) + "."
            for _ in range(120)]
    (root / "corpus.txt").write_text("\n<|endoftext|>\n".join(docs) + "\n", encoding="utf-8")
    argv = ["prepare", root / "corpus.txt", "--tokenizer", "bpe:300", "--out", root / "data",
            "--val-fraction", "0.1"]
    assert main([str(a) for a in argv]) == 0
    code = main(["train", "--data", str(root / "data"), "--block", "modern", "--n-layers", "2",
                 "--d-model", "32", "--n-heads", "4", "--d-ff", "64", "--layers", "sqa",
                 "--seq-len", "16", "--batch-size", "4", "--steps", "6", "--eval-batches", "1",
                 "--device", "cpu", "--no-progress", "--out-dir", str(root / "run")])
    assert code == 0
    return root, argv


def test_prepare_says_what_it_did_and_then_that_nothing_changed(trained, capsys):
    root, argv = trained
    code, out, _ = run(capsys, *argv)
    assert code == 0 and out.startswith(f"unchanged: {root / 'data'}:")
    code, out, err = run(capsys, "prepare", root / "corpus.txt", "--tokenizer", "bpe:12",
                         "--out", root / "other")
    assert code == 2 and out == "" and "bpe:12" in err and len(err.strip().splitlines()) == 1


def test_the_checkpoint_keeps_the_datasets_tokenizer(trained):
    root, _ = trained
    data, tok = PreparedDataset(root / "data"), load_run_tokenizer(root / "run")
    assert tok == data.tokenizer and tok.eot_id is not None
    model, meta = load_model(root / "run")
    assert model.config.vocab_size == tok.vocab_size and model.config.layers == "sqa"
    assert meta["dataset"]["tokenizer_sha256"] == data.meta["tokenizer"]["sha256"]


def test_generate_streams_what_the_model_generates_in_whole_characters(trained, capsys):
    root, _ = trained
    model, _ = load_model(root / "run")
    tok = load_run_tokenizer(root / "run")
    prompt = "the café 世界"
    code, out, err = run(capsys, "generate", root / "run", "--prompt", prompt, "--temperature",
                         "0", "--max-new-tokens", "30", "--no-stop")
    assert code == 0, err
    ids = generate(model, torch.tensor([tok.encode(prompt)]), 30, temperature=0)[0]
    assert out == prompt + tok.decode(ids[len(tok.encode(prompt)):]) + "\n"


def test_stop_text_must_be_one_token(trained, capsys):
    root, _ = trained
    code, out, err = run(capsys, "generate", root / "run", "--prompt", "the", "--stop",
                         "the cat sat")
    assert code == 2 and out == "" and "expected text of exactly one token" in err


def test_export_loads_in_transformers_with_equal_logits_and_imports_back(trained, capsys):
    root, _ = trained
    code, out, err = run(capsys, "export", root / "run", "--format", "hf", "--out", root / "hf")
    assert code == 0, err
    assert "LlamaForCausalLM" in out and "with a tokenizer" in out
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    ours, _ = load_model(root / "run")
    text = "the cat sat on a façade 🙂<|endoftext|>dogs"
    ids = load_run_tokenizer(root / "run").encode(text)
    assert hf_tok.encode(text) == ids and hf_tok.eos_token == "<|endoftext|>"
    assert hf.config.eos_token_id == load_run_tokenizer(root / "run").eot_id
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x), atol=1e-5, rtol=0)

    code, out, err = run(capsys, "import-hf", root / "hf", "--out", root / "back")
    assert code == 0 and "layers='sqa'" in out, err
    args = ("--prompt", "the", "--temperature", "0", "--max-new-tokens", "12", "--no-stop")
    assert run(capsys, "generate", root / "back", *args)[1] == \
        run(capsys, "generate", root / "run", *args)[1]


def _always_eot(tmp_path):
    """A classic-block checkpoint whose LM head bias makes end-of-text the greedy choice."""
    tok = CharTokenizer.from_text("abc<|endoftext|>")
    model = TransformerLM(LMConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1,
                                   d_ff=16, max_seq_len=32))
    with torch.no_grad():
        model.lm_head.bias[tok.eot_id] = 100.0
    return save_model(tmp_path / "eot", model, tokenizer=tok)


def test_generation_stops_at_end_of_text_unless_told_not_to(tmp_path, capsys):
    directory = _always_eot(tmp_path)
    args = ("generate", directory, "--prompt", "ab", "--temperature", "0", "--max-new-tokens", "5")
    assert run(capsys, *args)[1] == "ab\n"          # stopped, and the marker is not printed
    assert run(capsys, *args, "--no-stop")[1] == "ab" + "<|endoftext|>" * 5 + "\n"
    assert run(capsys, *args, "--stop", "c")[1] == "ab" + "<|endoftext|>" * 5 + "\n"


def test_an_old_checkpoint_exports_its_character_tokenizer(tmp_path, capsys):
    tok = CharTokenizer.from_text("hello world")
    model = TransformerLM(LMConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2, n_layers=1,
                                   d_ff=16, max_seq_len=16, block="modern"))
    old = save_model(tmp_path / "old", model, meta={"tokenizer": tok.to_dict()})
    assert not (old / "tokenizer.json").exists()
    code, _, err = run(capsys, "export", old, "--out", tmp_path / "hf")
    assert code == 0, err
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.encode("hello") == tok.encode("hello") and hf_tok.eos_token is None
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] is None
