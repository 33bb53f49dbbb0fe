"""Every bad input, where it enters: a ValueError in Python that names the field, the value and
what is accepted; on the command line one line on stderr and exit status 2. One table, one row an
input: (where it enters, the input, a fragment the message must hold). Then random inputs: the
layer-spec parser and the generation arguments either work or raise ValueError, never anything
else."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sqt import LMConfig, TransformerLM, generate, parse_layer
from sqt.checkpoint import load_model, load_train_state, save_model
from sqt.cli import main
from sqt.engine import DecodeEngine
from sqt.runconfig import TrainConfig
from sqt.tokenizer import CharTokenizer
from sqt.train import train

VOCAB = 11
TOK = CharTokenizer("abcdefghijk")
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TransformerLM(LMConfig(vocab_size=VOCAB, d_model=16, n_heads=2, n_layers=1, d_ff=16,
                                  max_seq_len=16)).eval()


TINY_MODEL = LMConfig(vocab_size=12, d_model=16, n_heads=2, n_layers=1, d_ff=16, max_seq_len=16)


def TINY_TRAIN(out_dir):
    return TrainConfig(steps=2, batch_size=2, seq_len=8, eval_batches=1, device="cpu",
                       progress=False, log=False, out_dir=str(out_dir))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished training run on a tiny corpus, and the corpus's file."""
    root = tmp_path_factory.mktemp("bad")
    corpus = root / "corpus.txt"
    corpus.write_text("abcdefghijk " * 60)
    from sqt.data import load_text_file
    train(TINY_MODEL, TINY_TRAIN(root / "run"), load_text_file(corpus))
    (root / "empty.txt").write_text("")
    (root / "tokens.bin").write_bytes(b"a\x00b\x00" * 64)   # token ids, not text
    return root


def p(x):
    return torch.tensor(x)


# (where it enters, the input, the message must hold). Python entries take the input as their
# argument; `cli train` / `cli generate` take extra argv, `cli` a whole one (on the CPU) ({root}:
# the fixture's folder).
ROWS = [
    # token ids, into the model
    ("forward", p([[1, VOCAB]]), "idx holds token id 11 at [0, 1]: expected ids in [0, 11)"),
    ("forward", p([[-1, 2]]), "idx holds token id -1 at [0, 0]: expected ids in [0, 11)"),
    ("forward", p([[1.0, 2.0]]), "idx has dtype torch.float32: expected integer token ids"),
    ("forward", p([[True, False]]), "idx has dtype torch.bool: expected integer token ids"),
    ("forward", torch.zeros(0, 3, dtype=torch.long), "idx has shape (0, 3): expected at least"),
    ("forward", p([1, 2]), "idx has shape (2,): expected (batch, seq_len)"),
    ("forward", [[1, 2]], "idx is a list: expected a torch tensor of token ids"),
    ("forward", torch.ones(1, 2, dtype=torch.long, device="meta"), "idx is on meta but the "
                                                                   "model is on cpu"),
    ("forward", torch.ones(1, 17, dtype=torch.long), "sequence length 17 exceeds max_seq_len=16"),
    ("cache", dict(layers="mqa"), "cache layer 0 has shape (1, 1, 8, 8): expected (1, 2, 8, 8)"),
    ("cache", dict(batch=2), "cache has 1 layers, batch 2: expected a KVCache of this model's 1 "
                             "layers for batch 1"),
    ("cache", dict(device="cuda:x"), "device='cuda:x': expected auto, cpu, cuda or cuda:N"),
    # generation arguments
    ("generate", dict(idx=p([[1, 11]])), "prompt holds token id 11 at [0, 1]"),
    ("generate", dict(idx=p([[1.0]])), "prompt has dtype torch.float32"),
    ("generate", dict(idx=torch.zeros(0, 2, dtype=torch.long)), "prompt is empty (shape (0, 2))"),
    ("generate", dict(temperature=NAN), "temperature=nan: expected a finite number >= 0"),
    ("generate", dict(temperature=INF), "temperature=inf: expected a finite number >= 0"),
    ("generate", dict(temperature=-1), "temperature=-1: expected a finite number >= 0"),
    ("generate", dict(temperature=True), "temperature=True: expected a finite number"),
    ("generate", dict(top_p=NAN), "top_p=nan: expected None or a number in (0, 1]"),
    ("generate", dict(top_k=0), "top_k=0: expected None or an integer >= 1"),
    ("generate", dict(stop_token=VOCAB), "stop_token=11: expected None or a token id in [0, 11)"),
    ("generate", dict(stop_token=-1), "stop_token=-1: expected None or a token id in [0, 11)"),
    ("generate", dict(n=0), "max_new_tokens=0: expected an integer >= 1"),
    ("generate", dict(n=20), "prompt length 2 + max_new_tokens=20 exceeds the model's "
                             "max_seq_len=16"),
    ("generate", dict(generator="seed"), "generator on str: expected None or a torch.Generator"),
    ("generate", dict(callback=3), "callback=3: expected None or a function"),
    ("engine", dict(idx=p([[1, 12]])), "prompt holds token id 12 at [0, 1]"),
    ("engine", dict(stop_token=99), "stop_token=99: expected None or a token id in [0, 11)"),
    ("engine", dict(temperature=NAN), "temperature=nan"),
    ("engine", dict(check_every=0), "check_every=0: expected an integer >= 1"),
    ("engine", dict(idx=p([[1], [2]])), "prompt batch=2: this engine was built for batch_size=1"),
    ("engine step", p([1.5]), "tokens has dtype torch.float32: expected integer token ids"),
    ("engine step", p([1, 2]), "tokens has shape (2,): expected one token per sequence, (1,)"),
    # model and training settings
    ("LMConfig", dict(rope_base=NAN), "rope_base=nan: expected a finite number > 0"),
    ("LMConfig", dict(norm_eps=-1.0), "norm_eps=-1.0: expected a finite number >= 0"),
    ("LMConfig", dict(dropout=True), "dropout=True: expected a number in [0, 1)"),
    ("LMConfig", dict(layers=5), "layers=5: expected a variant string or a list of them"),
    ("TrainConfig", dict(lr=INF), "lr=inf: expected a finite number > 0"),
    ("TrainConfig", dict(epochs=INF), "epochs=inf: expected a finite number > 0"),
    ("TrainConfig", dict(compile_mode="bogus"), "compile_mode='bogus': expected None or one of "
                                                "default"),
    ("TrainConfig", dict(compile="yes"), "compile='yes': expected True or False or None"),
    ("TrainConfig", dict(overwrite=None), "overwrite=None: expected True or False"),
    ("TrainConfig", dict(device="cuda:x"), "device='cuda:x': expected auto, cpu, cuda or cuda:N"),
    ("TrainConfig", dict(beta1=NAN), "beta1=nan: expected a number in [0, 1)"),
    # config.json of a model directory, and its weights
    ("config.json", "[1, 2, 3]", "holds [1, 2, 3]: expected a JSON object with \"format\": 1"),
    ("config.json", "null", "holds null: expected a JSON object"),
    ("config.json", '"x"', "holds \"x\": expected a JSON object"),
    ("config.json", '{"format": 1, "model": [1]}', "model=[1]: expected format 1 and a "
                                                    "\"model\" object of LMConfig fields"),
    ("config.json", '{"model_type": "llama"}', "a Hugging Face model directory: `sqt import-hf`"),
    ("config.json", '{"format": 1, "model": {"d_model": "wide"}}', "incompatible model config: "
                                                                   "d_model='wide': expected an "
                                                                   "integer >= 1"),
    ("config.json", '{"format": 1, "model": {"bogus": 1}}', "unknown fields ['bogus']"),
    ("config.json", {"d_model": 32}, "tok_emb.weight is (11, 16) in the file but (11, 32) by "
                                     "the config; pos_emb.weight is (16, 16) in the file but "
                                     "(16, 32) by the config"),
    ("config.json", {"d_model": 32}, "lm_head.weight is (11, 16) in the file but (11, 32) by "
                                     "the config"),     # the last tensor: nothing cut short
    ("config.json", {"n_layers": 2}, "missing from the file: blocks.1.norm1.weight"),
    ("config.json", {"vocab_size": 10 ** 12}, "tok_emb.weight is (11, 16) in the file but "
                                              "(1000000000000, 16) by the config"),
    ("config.json", {"tie_embeddings": True}, "holds an lm_head.weight of its own but the config "
                                              "ties it to tok_emb.weight"),
    ("weights", b"garbage", "model.safetensors' cannot be read"),
    ("from_pretrained", "cuda:x", "device='cuda:x': expected auto, cpu, cuda or cuda:N"),
    ("save_model", {"not": "a model"}, "model is a dict: expected an sqt TransformerLM"),
    ("save_pretrained", "{root}", "holds other files (corpus.txt, empty.txt"),
    # resuming: a train state that parses but lacks what a resume needs; other data
    ("train state", "rng_cpu", "lacks rng_cpu: expected a train state with"),
    ("train state", "optimizer", "lacks optimizer"),
    ("resume", "other.txt", "it was trained on 'corpus.txt' (sha256 "),
    # the command line
    ("cli train", ["--data", "{root}/empty.txt"], "text file '{root}/empty.txt' is empty"),
    ("cli train", ["--data", "{root}/nowhere.txt"], "text file '{root}/nowhere.txt' does not "
                                                    "exist"),
    ("cli train", ["--device", "cuda:x"], "device='cuda:x': expected auto, cpu, cuda or cuda:N"),
    ("cli train", ["--compile-mode", "bogus"], "compile_mode='bogus': expected None or one of"),
    ("cli train", ["--lr", "nan"], "lr=nan: expected a finite number > 0"),
    ("cli train", ["--epochs", "inf", "--steps", "1"], "not allowed with argument"),
    ("cli train", ["--rope-base", "inf"], "rope_base=inf: expected a finite number > 0"),
    ("cli train", ["--out-dir", "{root}/empty.txt"], "out_dir='{root}/empty.txt' is a file"),
    ("cli train", ["--out-dir", "{root}/run"], "already holds a run"),
    ("cli train", ["--out-dir", "{root}/run", "--resume", "--overwrite"], "--resume and "
                                                                         "--overwrite: expected "
                                                                         "at most one"),
    ("cli train", ["--resume"], "--resume needs --out-dir"),
    ("cli train", ["--vocab-size", "10"], "vocab_size=10 but the dataset's tokenizer has 12"),
    ("cli train", ["--cuda-graph"], "cuda_graph=True on device 'cpu': CUDA graphs need a CUDA"),
    ("cli train", ["--seq-len", "1000"], "seq_len=1000: the train split of 'corpus.txt' has "
                                         "only 648 tokens"),
    ("cli train", ["--out-dir", "{root}/run", "--resume"], "cannot resume from '{root}/run/"
                                                           "checkpoint': model config differs "
                                                           "in d_model (checkpoint 16, now 128)"),
    ("cli generate", ["{root}/run", "--temperature", "nan"], "--temperature=nan: expected a "
                                                             "finite number"),
    ("cli generate", ["{root}/run", "--top-p", "nan"], "--top-p=nan"),
    ("cli generate", ["{root}/run", "--seed", str(2 ** 70)], "--seed 1180591620717411303424: "
                                                             "expected an integer in"),
    ("cli generate", ["{root}/run", "--device", "cuda:x"], "--device='cuda:x'"),
    ("cli generate", ["{root}/run", "--prompt", "xyz"], "not in the tokenizer's vocabulary"),
    ("cli generate", ["{root}/run/checkpoint/model.safetensors"], "is a file: expected a run "
                                                                  "directory"),
    ("cli generate", ["{root}"], "is not a complete checkpoint: expected a run directory"),
    ("cli generate", ["{root}/nowhere"], "'{root}/nowhere' does not exist"),
    ("cli train", ["--seed", str(2 ** 70)], "seed=1180591620717411303424: expected an integer in "
                                            "[0, 2**63)"),
    ("cli train", ["--query-seed", str(2 ** 50)], "query_seed=1125899906842624: expected an "
                                                  "integer in [0, 2**44)"),
    ("cli train", ["--data", ""], "data='': expected 'tinyshakespeare', a directory written by"),
    ("cli train", ["--out-dir", ""], "out_dir='': expected a path or None"),
    ("cli train", ["--data", "{root}/tokens.bin"], "'{root}/tokens.bin' holds NUL bytes: "
                                                   "expected UTF-8 text"),
    ("cli train", ["--config", "{root}"], "config file '{root}' is a directory: expected a TOML"),
    ("cli", ["probe", "{root}/run", "--eval-batch-size", "0"], "eval_batch_size=0: expected an "
                                                               "integer >= 1"),
    ("cli", ["probe", "{root}/run", "--seq-len", "0"], "seq_len=0: expected None or an integer "
                                                       ">= 2"),
    ("cli", ["probe", "{root}/run", "--out", "{root}/corpus.txt"], "out='{root}/corpus.txt' is "
                                                                   "a file: expected a directory"),
    ("cli", ["convert", "{root}/run", "--to", "sqt", "--out", "{root}/cv", "--tokens", "0"],
     "tokens=0: expected None or an integer >= 1"),
    ("cli", ["convert", "{root}/run", "--to", "sqt", "--out", "{root}/cv", "--tokens", "64",
             "--batch-size", "0"], "batch_size=0: expected None or an integer >= 1"),
    ("cli", ["convert", "{root}/run", "--to", "sqt", "--out", "{root}/cv", "--eval-batch-size",
             "0"], "eval_batch_size=0: expected an integer >= 1"),
    ("cli", ["convert", "{root}/run", "--to", "sqt", "--out", "{root}/cv", "--eval-tokens", "1"],
     "eval_tokens=1: expected an integer >= 2"),
    ("cli", ["convert", "{root}/run", "--to", "sqt", "--out", "{root}/corpus.txt"],
     "--out '{root}/corpus.txt' is a file: expected a new directory"),
    # a Hugging Face directory to import: config.json edited, the weights as exported
    ("hf config", {"num_attention_heads": 0, "head_dim": None}, "config.json "
                                                                "num_attention_heads=0: expected "
                                                                "an integer >= 1"),
    ("hf config", {"hidden_size": [16]}, "config.json hidden_size=[16]: expected an integer >= 1"),
    ("hf config", {"num_hidden_layers": "two"}, "num_hidden_layers='two': expected an integer"),
    ("hf config", {"rms_norm_eps": "tiny"}, "rms_norm_eps='tiny': expected a finite number >= 0"),
    ("hf config", {"rope_theta": None, "rope_parameters": None}, "rope_theta=None: expected a "
                                                                 "finite number > 0"),
    ("hf config", {"tie_word_embeddings": "no"}, "tie_word_embeddings='no': expected true or "
                                                 "false"),
    ("hf config", {"hidden_size": 8, "head_dim": 4}, "the weights do not match config.json: "
                                                     "model.embed_tokens.weight is (12, 16) but "
                                                     "config.json makes it (12, 8)"),
    ("hf config", "[1, 2]", "holds list: expected a JSON object"),
    ("export_hf", "corpus.txt", "is a file: expected a new or empty directory"),
    # the Python API's other entries, given the wrong kind of thing
    ("from_pretrained path", 5, "path=5: expected the path of a run, checkpoint or model"),
    ("generate model", "m", "model is a str: expected an sqt TransformerLM"),
    ("engine model", "m", "model is a str: expected an sqt TransformerLM"),
    ("train args", {"steps": 2}, "cfg is a dict: expected a TrainConfig"),
    ("mean_loss", 0, "batch_size=0: expected an integer >= 1"),
    ("load_dataset", 5, "data=5: expected 'tinyshakespeare'"),
    ("TrainConfig", dict(seed=2 ** 63), "seed=9223372036854775808: expected an integer in [0, "),
    ("LMConfig", dict(query_seed=2 ** 44), "query_seed=17592186044416: expected an integer in"),
]


def _edited_model_dir(model, root: Path, edit) -> Path:
    """A model directory (no manifest: edits are not refused as such) with config.json edited."""
    directory = root / "m"
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, tokenizer=TOK)
    path = directory / "config.json"
    if isinstance(edit, dict):
        doc = json.loads(path.read_text())
        doc["model"].update(edit)
        path.write_text(json.dumps(doc))
    elif isinstance(edit, bytes):
        (directory / "model.safetensors").write_bytes(edit)
    else:
        path.write_text(edit)
    return directory


def _without(run_root: Path, key: str) -> Path:
    """A copy of the fixture's run whose (consistent, re-saved) train state lacks `key`."""
    out = run_root / f"without-{key}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run_root / "run", out)
    state = load_train_state(out)
    del state[key]
    model, meta = load_model(out)
    meta = {k: v for k, v in meta.items() if k not in ("format", "model")}
    meta["step"] = 1   # not finished: a resume reads the whole state
    save_model(out / "checkpoint", model, tokenizer=TOK, meta=meta, train_state=state)
    return out


def _edited_hf_dir(root: Path, edit) -> Path:
    """A Hugging Face export of a tiny modern model, its config.json edited (the sqt block
    dropped: the import reads the HF fields alone)."""
    from sqt.hf import export_hf
    directory = root / "hf"
    shutil.rmtree(directory, ignore_errors=True)
    modern = dataclasses.replace(TINY_MODEL, block="modern")
    export_hf(TransformerLM(modern), directory)
    path = directory / "config.json"
    if isinstance(edit, dict):
        doc = json.loads(path.read_text())
        doc.pop("sqt", None)
        doc.update(edit)
        path.write_text(json.dumps(doc))
    else:
        path.write_text(edit)
    return directory


def enter(where: str, value, model, root: Path):
    prompt = p([[1, 2]])
    if where == "hf config":
        from sqt.hf import import_hf
        return import_hf(_edited_hf_dir(root, value))
    if where == "export_hf":
        from sqt.hf import export_hf
        return export_hf(TransformerLM(dataclasses.replace(TINY_MODEL, block="modern")),
                         root / value)
    if where == "from_pretrained path":
        return TransformerLM.from_pretrained(value)
    if where == "generate model":
        return generate(value, prompt, 3)
    if where == "engine model":
        return DecodeEngine(value, 1, 8)
    if where == "train args":
        from sqt.data import load_text_file
        return train(TINY_MODEL, value, load_text_file(root / "corpus.txt"))
    if where == "mean_loss":
        from sqt.probe import mean_loss
        return mean_loss(model, torch.zeros(2, 5, dtype=torch.long), batch_size=value)
    if where == "load_dataset":
        from sqt.data import load_dataset
        return load_dataset(value)
    if where == "forward":
        return model(value)
    if where == "cache":
        other = TransformerLM(dataclasses.replace(model.config, layers=value.get("layers", "mha")))
        cache = other.new_cache(value.get("batch", 1), 8, device=value.get("device"))
        return model(prompt, cache)
    if where == "generate":
        kw = dict(value)
        return generate(model, kw.pop("idx", prompt), kw.pop("n", 3), **kw)
    if where == "engine":
        kw = dict(value)
        return DecodeEngine(model, 1, 8).generate(kw.pop("idx", prompt), 3, **kw)
    if where == "engine step":
        engine = DecodeEngine(model, 1, 8)
        engine.prefill(prompt)
        return engine.step(value)
    if where == "LMConfig":
        return LMConfig(**value)
    if where == "TrainConfig":
        return TrainConfig(**value)
    if where in ("config.json", "weights"):
        return load_model(_edited_model_dir(model, root, value))
    if where == "from_pretrained":
        return TransformerLM.from_pretrained(root / "run", device=value)
    if where == "save_model":
        return save_model(root / "unused", value)
    if where == "save_pretrained":
        return model.save_pretrained(value.replace("{root}", str(root)))
    if where in ("train state", "resume"):
        from sqt.data import load_text_file
        out, data = root / "run", root / "corpus.txt"
        if where == "train state":
            out = _without(root, value)
        else:
            data = root / value
            data.write_text((root / "corpus.txt").read_text()[::-1])   # same symbols
        return train(TINY_MODEL, TINY_TRAIN(out), load_text_file(data), resume=True)
    raise AssertionError(where)


TRAIN = ["train", "--size", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
         "--device", "cpu", "--no-progress"]
GENERATE = ["generate", "--prompt", "abc", "--max-new-tokens", "2"]


@pytest.mark.parametrize("where, value, fragment", ROWS,
                         ids=[f"{i}-{r[0]}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_clear_error(where, value, fragment, model, run, capsys):
    fragment = fragment.replace("{root}", str(run))
    if where.startswith("cli"):
        argv = TRAIN + value + ([] if "--data" in value else ["--data", "{root}/corpus.txt"]) \
            if where == "cli train" else GENERATE + value if where == "cli generate" else \
            value + ["--device", "cpu"]
        code = main([a.replace("{root}", str(run)) for a in argv])
        out, err = capsys.readouterr()
        assert code == 2, err
        assert fragment in err and err.startswith("sqt ")
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        return
    with pytest.raises(ValueError) as e:
        enter(where, value, model, run)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------- random inputs

@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(st.text(max_size=24),
                      st.from_regex(r"(table:|rotary:|proj:|[a-z]{1,6}:)?([a-z]{1,6}|\d{1,3}/"
                                    r"\d{1,3})(@-?\d{1,4})?", fullmatch=True),
                      st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)),
       n_heads=st.one_of(st.integers(-4, 70), st.just(10 ** 9)))
def test_the_layer_spec_parser_works_or_raises_value_error(spec, n_heads):
    try:
        s = parse_layer(spec, n_heads)
    except ValueError:
        return
    assert s.n_q_heads >= 1 and s.n_kv_heads >= 1
    assert parse_layer(s.name, n_heads) == s        # what it made reads back as itself


ANYTHING = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 30),
                     st.booleans(), st.none(), st.just("1"))
VALID = {"temperature": st.floats(0, 4), "top_k": st.none() | st.integers(1, 20),
         "top_p": st.none() | st.floats(1e-6, 1), "max_new_tokens": st.integers(1, 8),
         "stop_token": st.none() | st.integers(0, VOCAB - 1), "batch": st.integers(1, 2),
         "length": st.integers(1, 6), "value": st.integers(0, VOCAB - 1),
         "dtype": st.sampled_from([torch.long, torch.int32])}
INVALID = {**{k: ANYTHING for k in VALID},
           "dtype": st.sampled_from([torch.float32, torch.bool, torch.uint8, torch.int16])}


@st.composite
def generation_calls(draw):
    """Valid arguments but for up to two, which are anything: each bad argument meets valid
    ones, and the generation itself runs often."""
    broken = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2))
    return {k: draw(INVALID[k] if k in broken else VALID[k]) for k in VALID}


@settings(max_examples=150, deadline=None)
@given(call=generation_calls(), engine=st.booleans())
def test_generation_arguments_work_or_raise_value_error(model, call, engine):
    batch, length, value, dtype = (call.pop(k) for k in ("batch", "length", "value", "dtype"))
    max_new_tokens = call.pop("max_new_tokens")
    try:
        idx = torch.full((batch, length), value).to(dtype)
    except (TypeError, RuntimeError):   # a shape or value torch itself cannot make: no prompt
        idx = value
    try:
        if engine:
            out = DecodeEngine(model, batch, 16).generate(idx, max_new_tokens, **call)
        else:
            out = generate(model, idx, max_new_tokens, **call)
    except ValueError:
        return
    assert out.shape[0] == batch and length < out.shape[1] <= length + max_new_tokens
    assert out.min() >= 0 and out.max() < VOCAB
    assert math.isfinite(call["temperature"]) and call["temperature"] >= 0
