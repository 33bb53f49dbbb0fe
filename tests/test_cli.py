"""`sqt generate` in-process: streaming output from a saved checkpoint, and every user error as
one line on stderr with exit status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqt import LMConfig, TransformerLM
from sqt.checkpoint import save_model
from sqt.cli import main
from sqt.data import CharTokenizer
from sqt.generate import generate

TEXT = "hello world\nthe quick brown fox"
CONTEXT = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_heads=4, n_layers=2,
                                   d_ff=48, max_seq_len=CONTEXT, layers=("sqt", "gqa")))
    return save_model(tmp_path_factory.mktemp("ckpt"), model,
                      meta={"tokenizer": tok.to_dict()}), model, tok


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_generation_prints_the_models_continuation(checkpoint, capsys):
    directory, model, tok = checkpoint
    code, out, err = run(capsys, "generate", str(directory), "--prompt", "the ",
                         "--max-new-tokens", "12", "--temperature", "0")
    assert code == 0, err
    expected = generate(model.eval(), torch.tensor([tok.encode("the ")]), 12, temperature=0)
    assert out == tok.decode(expected[0]) + "\n"


def test_sampling_is_reproducible_with_seed(checkpoint, capsys):
    directory = str(checkpoint[0])
    args = ("generate", directory, "--prompt", "hello", "--max-new-tokens", "20",
            "--temperature", "1.0", "--top-k", "5", "--top-p", "0.9", "--no-echo")
    outs = [run(capsys, *args, "--seed", str(s))[1] for s in (3, 3, 4)]
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert len(outs[0]) == 21 and not outs[0].startswith("hello")


def test_streams_each_token_as_produced(checkpoint, monkeypatch):
    writes = []

    class Recorder:
        def write(self, s):
            writes.append(s)

        def flush(self):
            writes.append(None)

    monkeypatch.setattr(sys, "stdout", Recorder())
    assert main(["generate", str(checkpoint[0]), "--prompt", "he", "--max-new-tokens", "5",
                 "--no-echo", "--seed", "0"]) == 0
    # Every token is written and flushed on its own, then a final newline.
    assert writes[:10] == [w for pair in zip(writes[:10:2], [None] * 5) for w in pair]
    assert all(isinstance(w, str) and len(w) == 1 for w in writes[:10:2])


def test_stop_character_ends_generation(checkpoint, capsys):
    directory, model, tok = checkpoint
    full = generate(model.eval(), torch.tensor([tok.encode("hello")]), 20, temperature=0)
    stop = tok.decode(full[0, 7:8])
    code, out, _ = run(capsys, "generate", str(directory), "--prompt", "hello", "--temperature",
                       "0", "--max-new-tokens", "20", "--stop", stop)
    assert code == 0 and out.endswith(stop + "\n") and len(out) <= len("hello") + 3 + 1


def test_max_new_tokens_capped_by_context(checkpoint, capsys):
    code, out, err = run(capsys, "generate", str(checkpoint[0]), "--prompt", "hello",
                         "--max-new-tokens", "100", "--temperature", "0")
    assert code == 0 and len(out) == CONTEXT + 1 and "capped at 27" in err


def _broken(tmp_path, edit) -> str:
    tok = CharTokenizer.from_text(TEXT)
    model = TransformerLM(LMConfig(vocab_size=tok.vocab_size, d_model=16, n_heads=2,
                                   n_layers=1, d_ff=16, max_seq_len=16))
    directory = save_model(tmp_path / "c", model, meta={"tokenizer": tok.to_dict()})
    cfg = json.loads((directory / "config.json").read_text())
    edit(directory, cfg)
    (directory / "config.json").write_text(json.dumps(cfg))
    return str(directory)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("no_tokenizer", "no tokenizer"),
    ("vocab_mismatch", "vocab_size is"),
    ("bad_field", "incompatible model config"),
    ("no_weights", "model.safetensors' is missing"),
])
def test_missing_or_incompatible_checkpoint(tmp_path, capsys, case, match):
    if case == "missing":
        directory = str(tmp_path / "nowhere")
    else:
        def edit(d, cfg):
            if case == "no_tokenizer":
                cfg.pop("tokenizer")
            elif case == "vocab_mismatch":
                cfg["tokenizer"]["chars"] = cfg["tokenizer"]["chars"][:-1]
            elif case == "bad_field":
                cfg["model"]["n_experts"] = 4
            else:
                (d / "model.safetensors").unlink()
        directory = _broken(tmp_path, edit)
    code, out, err = run(capsys, "generate", directory, "--prompt", "he")
    assert code == 2 and out == ""
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, match", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "h" * CONTEXT], f"model's context is {CONTEXT}"),
    (["--prompt", "HELLO"], "not in the tokenizer's vocabulary"),
    (["--prompt", "he", "--stop", "ab"], "single character"),
    (["--prompt", "he", "--stop", "Z"], "--stop"),
    (["--prompt", "he", "--top-p", "1.5"], "--top-p=1.5"),
    (["--prompt", "he", "--temperature", "-1"], "--temperature=-1"),
    (["--prompt", "he", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--prompt", "he", "--device", "nonsense"], "--device"),
])
def test_user_errors_exit_2_with_one_line(checkpoint, capsys, extra, match):
    code, out, err = run(capsys, "generate", str(checkpoint[0]), *extra)
    assert code == 2 and out == ""
    assert match in err and len(err.strip().splitlines()) == 1


def test_train_is_delegated(monkeypatch):
    import sqt.train
    seen = []
    monkeypatch.setattr(sqt.train, "main", lambda argv: seen.append(argv) or 0)
    assert main(["train", "--size", "tiny"]) == 0 and seen == [["--size", "tiny"]]


def test_python_dash_m_sqt(checkpoint):
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run([sys.executable, "-m", "sqt", "generate", str(checkpoint[0]),
                           "--prompt", ""], capture_output=True, text=True,
                          env={"PYTHONPATH": str(src)}, timeout=120)
    assert proc.returncode == 2 and "--prompt is empty" in proc.stderr
