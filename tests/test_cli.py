"""The `sqt` command in-process. `sqt generate`: streaming output from a saved checkpoint, and every
user error as one line on stderr with exit status 2. `sqt train`: settings from a preset, a TOML run
file and flags (in that order of precedence), the printed and saved resolved config, the log lines
in a pipe, the same runs as the sweep. Every option of every subcommand documents its default."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqt import LMConfig, TransformerLM
from sqt.checkpoint import save_model
from sqt.cli import main, parser
from sqt.cli_train import resolve_train
from sqt.config import SEED_SIZES, preset
from sqt.runconfig import MODEL_FIELDS, TRAIN_FIELDS, read_run_file, run_file_text
from sqt.utils import resolve_device
from sqt.data import CharTokenizer
from sqt.generate import generate
from sqt.train import TrainConfig

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
    if edit is not None:   # as an older checkpoint, which had no manifest to tell edits
        (directory / "manifest.json").unlink()
        edit(directory, cfg)
    (directory / "config.json").write_text(json.dumps(cfg))
    return str(directory)


@pytest.mark.parametrize("case, match", [
    ("missing", "does not exist"),
    ("no_tokenizer", "no tokenizer"),
    ("vocab_mismatch", "vocab_size is"),
    ("bad_field", "incompatible model config"),
    ("no_weights", "model.safetensors' is missing"),
    ("edited", "config.json' was changed after the set was written"),
])
def test_missing_or_incompatible_checkpoint(tmp_path, capsys, case, match):
    if case == "missing":
        directory = str(tmp_path / "nowhere")
    elif case == "edited":
        directory = _broken(tmp_path, None)
        (Path(directory) / "config.json").write_text("{}")
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
    (["--prompt", "he", "--stop", "he"], "'he' is 2 tokens for this tokenizer: expected text "
                                         "of exactly one token"),
    (["--prompt", "he", "--stop", "h", "--no-stop"], "not allowed with argument"),
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


def test_python_dash_m_sqt(checkpoint):
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run([sys.executable, "-m", "sqt", "generate", str(checkpoint[0]),
                           "--prompt", ""], capture_output=True, text=True,
                          env={"PYTHONPATH": str(src)}, timeout=120)
    assert proc.returncode == 2 and "--prompt is empty" in proc.stderr


# ------------------------------------------------------------------------------------- sqt train

TINY = ["--size", "tiny", "--batch-size", "2", "--seq-len", "16", "--eval-every", "2",
        "--eval-batches", "1", "--device", "cpu", "--no-progress"]


def resolved(*argv):
    return resolve_train(parser().parse_args(["train", *argv]))


def test_every_option_of_every_subcommand_documents_its_default():
    subparsers = next(a for a in parser()._actions if a.choices)
    assert set(subparsers.choices) >= {"train", "generate"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
            if action.option_strings and action.dest != "help" and not action.required:
                assert "%(default)s" in action.help, (name, action.option_strings)


def test_every_model_and_training_field_is_a_flag():
    assert not set(MODEL_FIELDS) & set(TRAIN_FIELDS)   # flags are one flat namespace
    train_parser = next(a for a in parser()._actions if a.choices).choices["train"]
    flags = {s for a in train_parser._actions for s in a.option_strings}
    assert {"--" + f.replace("_", "-") for f in MODEL_FIELDS + TRAIN_FIELDS} <= flags


def test_a_model_from_flags():
    _, _, _, m, t = resolved("--d-model", "48", "--n-heads", "4", "--n-layers", "3", "--d-ff",
                             "96", "--block", "modern", "--layers", "sqa", "xsqa", "mha",
                             "--tie-embeddings", "--rope-base", "500", "--max-seq-len", "300",
                             "--backend", "eager", "--checkpoint-blocks", "--grad-accum", "4")
    assert (m.d_model, m.n_heads, m.n_layers, m.d_ff, m.block, m.layers, m.tie_embeddings,
            m.rope_base, m.max_seq_len, m.backend, m.checkpoint_blocks) == \
        (48, 4, 3, 96, "modern", ("sqa", "xsqa", "mha"), True, 500.0, 300, "eager", True)
    assert t.grad_accum == 4 and not resolved("--no-tie-embeddings")[3].tie_embeddings


def test_flags_override_the_file_which_overrides_the_preset(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\n[model]\nd_model = 64\nlayers = ["sqt", "mha"]\n'
                    '[train]\nlr = 0.01\nbatch_size = 8\ntokens = 4096\n')
    name, _, _, m, t = resolved("--config", str(path), "--lr", "0.02", "--device", "cpu")
    tiny = preset("tiny")
    assert name == "tiny" and m.d_model == 64 and m.layers == ("sqt", "mha")      # the file
    assert m.n_layers == tiny.n_layers and m.d_ff == tiny.d_ff                    # the preset
    assert t.lr == 0.02 and t.batch_size == 8 and t.tokens == 4096 and t.steps is None
    # A budget flag replaces the file's budget rather than adding a second one.
    t = resolved("--config", str(path), "--steps", "9", "--device", "cpu")[4]
    assert (t.steps, t.tokens) == (9, None)
    name, _, _, m, _ = resolved("--config", str(path), "--size", "medium", "--layers", "mha")
    assert name == "medium" and m.n_layers == preset("medium").n_layers and m.d_model == 64


@pytest.mark.parametrize("text, match", [
    ("[model]\nd_modle = 64\n", "unknown key 'd_modle'"),
    ("[train]\nlr = 0.1\nbogus = 1\n", "unknown key 'bogus'"),
    ("presets = 'tiny'\n", "unknown key 'presets'"),
    ("[optimizer]\nlr = 1\n", "unknown key 'optimizer'"),
    ("[model]\nd_model = 'wide'\n", "d_model='wide': expected an integer"),
    ("[model]\ntie_embeddings = 1\n", "tie_embeddings=1: expected true or false"),
    ("[train]\nsteps = 5\ntokens = 9\n", "steps, tokens: expected one budget"),
    ("[model\n", "not valid TOML"),
    ("data = 5\n", "data=5: expected a string"),
    ("model = 3\n", "model=3: expected a [model] table"),
])
def test_a_bad_run_file_is_one_line_naming_the_key(tmp_path, capsys, text, match):
    path = tmp_path / "run.toml"
    path.write_text(text)
    code, out, err = run(capsys, "train", "--config", str(path))
    assert code == 2 and out == "" and match in err and len(err.strip().splitlines()) == 1


def test_the_printed_config_is_the_saved_one_and_reproduces_the_run(tmp_path, capsys):
    code, out, err = run(capsys, "train", *TINY, "--layers", "sqt", "mha", "--tokens", "100",
                         "--out-dir", str(tmp_path / "a"))
    assert code == 0
    saved = (tmp_path / "a" / "config.toml").read_text()
    assert err.startswith(saved) and "budget asked: tokens = 100" in saved
    assert set(read_run_file(tmp_path / "a" / "config.toml")) == {"preset", "data", "settings"}
    first = resolved(*TINY, "--layers", "sqt", "mha", "--tokens", "100")
    # How a run shows itself and where it writes are not part of it: given again, not saved.
    again = resolved("--config", str(tmp_path / "a" / "config.toml"), "--no-progress")
    n_train = len(first[2].train)
    assert again[0] == first[0] and again[1] == first[1] and again[3] == first[3]
    assert again[4].resolve(n_train) == first[4].resolve(n_train)
    # stdout is JSON lines: one per evaluation (stderr is not a terminal here), then the result.
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["eval", "eval", "result"]
    assert {"step", "tokens", "train_loss", "val_loss", "val_acc", "lr", "ms_per_step",
            "tokens_per_s", "elapsed_s"} <= set(events[0])
    assert events[-1]["steps"] == 4 and events[1]["tokens"] == 4 * 2 * 16
    code, out, err = run(capsys, "train", *TINY, "--steps", "4", "--tokens", "100")
    assert code == 2 and "--tokens: not allowed with argument --steps" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("size", SEED_SIZES)
def test_sqt_train_and_the_sweep_train_a_size_the_same_way(size):
    from bench import sweep
    cli_run = resolved("--size", size, "--device", "cpu")
    args = sweep.build_parser().parse_args(["--sizes", size, "--device", "cpu"])
    spec = {"size": size, "layers": args.variants[0], "label": args.variants[0], "seed": 0}
    common = sweep.train_settings(args, resolve_device(args.device))
    assert sweep.run_configs(spec, common, cli_run[2].tokenizer.vocab_size) == cli_run[3:]
    # The recipe, not the trainer's generic defaults: sizes differ where their recipes do.
    assert cli_run[4].lr != TrainConfig().lr


def test_devices_are_checked_in_one_place():
    for bad in ("cuda:x", "gpu", "cuda:", "CPU", ""):
        with pytest.raises(ValueError, match=f"device={bad!r}: expected auto, cpu, cuda or"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:1': CUDA is not available"):
            resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


def test_log_lines_reach_a_pipe():
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run([sys.executable, "-m", "sqt", "train", *TINY, "--steps", "4"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(src)},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(e["event"], e.get("step")) for e in events] == [("eval", 2), ("eval", 4),
                                                            ("result", None)]


@settings(max_examples=60, deadline=None)
@given(lr=st.floats(1e-9, 1e3), norm_eps=st.floats(1e-12, 0.5), rope_base=st.floats(1.0, 1e9),
       text=st.text(max_size=12), layers=st.sampled_from(["mha", ("sqt", "mha"), "4/2@7"]),
       tie=st.booleans(), steps=st.integers(1, 10**9),
       mode=st.sampled_from([None, "default", "reduce-overhead", "max-autotune"]))
def test_a_run_file_reads_back_as_the_run_it_was_written_from(tmp_path_factory, lr, norm_eps,
                                                             rope_base, text, layers, tie, steps,
                                                             mode):
    model = LMConfig(d_model=16, n_heads=4, n_layers=2, norm_eps=norm_eps, rope_base=rope_base,
                     layers=layers, tie_embeddings=tie)
    train_cfg = TrainConfig(steps=steps, lr=lr, min_lr=lr / 3, compile_mode=mode)
    path = tmp_path_factory.mktemp("run") / "run.toml"
    path.write_text(run_file_text(preset_name="tiny", data=text, model=model, train=train_cfg),
                    encoding="utf-8")
    back = read_run_file(path)
    values = back["settings"]
    assert back["preset"] == "tiny" and back["data"] == text
    assert LMConfig(**{k: values[k] for k in MODEL_FIELDS if k in values}) == model
    assert TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FIELDS}) == train_cfg
