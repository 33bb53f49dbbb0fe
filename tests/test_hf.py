"""Hugging Face export and import: every exportable variant loads in `transformers` without remote
code and computes our logits and greedy tokens; export -> import is the identity; a plain HF Llama
imports with equal logits; what cannot be expressed is refused with a reason."""

import json
from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from sqt import LMConfig, TransformerLM  # noqa: E402
from sqt.checkpoint import load_model, save_model  # noqa: E402
from sqt.generate import generate  # noqa: E402
from sqt.hf import export_checkpoint, export_hf, import_checkpoint, import_hf  # noqa: E402
from sqt.tokenizer import load_tokenizer  # noqa: E402

VOCAB, SEQ = 97, 32


@dataclass(frozen=True)
class Case:
    layers: object
    family: str          # the HF class it must load as
    heads: tuple         # (num_attention_heads, num_key_value_heads) HF must get
    tie: bool = False
    pad_mixed: bool = False
    extra: tuple = ()    # other LMConfig fields, as (name, value) pairs

    @property
    def id(self):
        name = "+".join(self.layers) if isinstance(self.layers, tuple) else self.layers
        return name + ("-tied" if self.tie else "") + ("-padmixed" if self.pad_mixed else "")


LLAMA, QWEN2 = "LlamaForCausalLM", "Qwen2ForCausalLM"
# n_heads = 8: the heads HF gets say whether a layout maps as it is or padded.
CASES = [
    Case("mha", LLAMA, (8, 8)), Case("gqa", LLAMA, (8, 2)), Case("mqa", LLAMA, (8, 1)),
    Case("sqa", LLAMA, (4, 2)), Case("ssqa", LLAMA, (4, 4)), Case("xsqa", LLAMA, (2, 2)),
    Case("xsmqa", LLAMA, (2, 1)),
    Case("lsqa", LLAMA, (8, 2)),            # 6 query heads do not divide d=64: 2 dead heads
    Case("rsqa", LLAMA, (4, 4)),            # 2 query heads over 4 K/V heads: rows duplicated
    Case("srq", LLAMA, (8, 8)),             # the rotary vector as a q bias, zero weights
    Case("identity:xsqa", LLAMA, (2, 2)),   # W_q = [I 0]
    Case("rndq", LLAMA, (8, 8), extra=(("query_seed", 3),)),   # the frozen matrix as W_q
    Case("gqa", LLAMA, (8, 2), tie=True, extra=(("rope_base", 500.0), ("norm_eps", 1e-6))),
    Case("sqa@16", QWEN2, (4, 2)),
    Case("rotary:gqa@8", QWEN2, (8, 2)),
    Case(("sqa@16", "sqa"), QWEN2, (4, 2)),  # windowed and full layers: Qwen2's layer_types
    Case(("srq", "mha"), LLAMA, (8, 8)),     # same heads, different query sources: no padding
    Case(("sqa", "mha@16"), QWEN2, (8, 8), pad_mixed=True),
    Case(("rsqa", "xsmqa"), LLAMA, (4, 4), pad_mixed=True),
]


def sharpen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights far from init's near-uniform attention, so a misplaced head shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / p.shape[-1] ** 0.5 if p.dim() > 1 else 1 + 0.3 * noise)
    return model.eval()


def sqt_model(layers, *, tie=False, seed=0, **kw) -> TransformerLM:
    cfg = LMConfig(**{**dict(vocab_size=VOCAB, d_model=64, n_heads=8, n_layers=2, d_ff=96,
                             max_seq_len=SEQ, block="modern", layers=layers,
                             tie_embeddings=tie), **kw})
    return sharpen(TransformerLM(cfg), seed)


def same_state(a: TransformerLM, b: TransformerLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hf_load(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def exported(request, tmp_path_factory):
    case = request.param
    model = sqt_model(case.layers, tie=case.tie, **dict(case.extra))
    out = export_hf(model, tmp_path_factory.mktemp("hf"), pad_mixed=case.pad_mixed)
    return case, model, out, hf_load(out)


def test_variant_maps_to_the_promised_family_and_heads(exported):
    case, _, _, hf = exported
    assert type(hf).__name__ == case.family
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == case.heads
    assert hf.config.tie_word_embeddings == case.tie


def test_hf_logits_equal_ours(exported):
    _, model, _, hf = exported
    x = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert ours.abs().max() > 1.0          # logits big enough for a wrong head to show
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_hf_greedy_generation_equals_ours(exported):
    _, model, _, hf = exported
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    new = 14                               # 6 + 14 tokens: past the 16-token windows
    ours = generate(model, prompt, new, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours)


def test_export_then_import_is_the_identity(exported):
    _, model, out, _ = exported
    back, tok = import_hf(out)
    assert back.config == model.config
    assert same_state(back, model)
    assert tok is None


@pytest.mark.parametrize("family, heads, layers", [
    ("Llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                   rope_parameters={"rope_type": "default", "rope_theta": 500.0}), "gqa"),
    ("Mistral", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                     sliding_window=8), "mqa@8"),
])
def test_plain_hf_model_imports_with_equal_logits(family, heads, layers, tmp_path):
    cfg = getattr(transformers, family + "Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, **heads)
    hf = sharpen(getattr(transformers, family + "ForCausalLM")(cfg), seed=3)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")     # sharded, with an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = import_hf(tmp_path)
    assert model.config.layers == layers
    assert model.config.rope_base == cfg.rope_parameters["rope_theta"]
    assert model.config.head_dim == heads["head_dim"]
    x = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=0)


def _dead_head_comes_to_life(hf):
    hf.model.layers[0].self_attn.o_proj.weight[:, 3 * 8:4 * 8] = 0.1   # head 3 was dead


def _query_is_trained(hf):
    hf.model.layers[1].self_attn.q_proj.weight[0, 0] += 0.5


@pytest.mark.parametrize("layers, edit, back", [
    ("lsqa", _dead_head_comes_to_life, "gqa"),   # fine-tuning in HF revived a padded head
    ("idq", _query_is_trained, "mha"),           # a control whose W_q HF trained is a projection
    ("rndq", _query_is_trained, "mha"),
], ids=["padded", "identity", "random"])
def test_an_export_changed_in_hf_imports_as_its_hf_layout(layers, edit, back, tmp_path):
    export_hf(sqt_model(layers), tmp_path)
    hf = hf_load(tmp_path)
    with torch.no_grad():
        edit(hf)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no longer have that structure"):
        model, _ = import_hf(tmp_path)
    assert model.config.layers == back
    x = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- tokenizers

def char_tokenizer_json(path, text: str):
    """A character tokenizer as sqt saves one: BPE with no merges, a Fuse decoder."""
    vocab = {c: i for i, c in enumerate(sorted(set(text)))}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.decoder = tokenizers.decoders.Fuse()
    tok.save(str(path))
    return tok


def byte_bpe_tokenizer_json(path, texts):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB + 256 - 97 + 40, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


TEXT = "Héllo wörld, 世界! Émoji 🙂 and tabs\tand\nnew lines.  Double  spaces."


@pytest.mark.parametrize("kind", ["char", "byte-bpe"])
def test_tokenizer_loads_with_autotokenizer_and_round_trips(kind, tmp_path):
    path = tmp_path / "tokenizer.json"
    if kind == "char":
        tok, vocab = char_tokenizer_json(path, TEXT), VOCAB
    else:
        tok = byte_bpe_tokenizer_json(path, [TEXT, "the quick brown fox " * 20])
        vocab = tok.get_vocab_size()
    out = export_hf(sqt_model("sqa", vocab_size=vocab), tmp_path / "hf", tokenizer_json=path)
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert isinstance(auto, transformers.PreTrainedTokenizerFast)
    ids = tok.encode(TEXT).ids
    assert auto.encode(TEXT) == ids
    assert auto.decode(ids) == TEXT
    eot = tok.token_to_id("<|endoftext|>")
    assert auto.eos_token == ("<|endoftext|>" if eot is not None else None)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eot
    assert hf_load(out).config.eos_token_id == eot
    _, text = import_hf(out)
    assert text == path.read_text()


def test_checkpoint_directories_round_trip(tmp_path):
    model = sqt_model("rsqa")
    char_tokenizer_json(tmp_path / "tokenizer.json", TEXT)
    save_model(tmp_path / "run", model, meta={"step": 1},
               tokenizer=load_tokenizer(tmp_path / "tokenizer.json"))
    export_checkpoint(tmp_path / "run", tmp_path / "hf")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").decode([0, 1]) == "\t\n"
    import_checkpoint(tmp_path / "hf", tmp_path / "back")
    back, _ = load_model(tmp_path / "back")
    assert back.config == model.config and same_state(back, model)
    assert (tmp_path / "back" / "tokenizer.json").read_text() == \
        (tmp_path / "run" / "tokenizer.json").read_text()


# --------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("layers, kw, match", [
    ("mha", dict(block="classic"), "block='classic'.*--block modern"),
    ("sqt", {}, "static query table: a per-position query is not a projection"),
    (("sqt", "mha"), dict(pad_mixed=True), "static query table"),
    (("sqa", "mha"), {}, "different Hugging Face head shapes.*pad_mixed=True"),
    (("mha@4", "mha@8"), {}, r"different sliding windows \[4, 8\]"),
], ids=["classic", "table", "table-pad-mixed", "mixed", "two-windows"])
def test_export_refuses_what_hf_cannot_express(layers, kw, match, tmp_path):
    pad_mixed = kw.pop("pad_mixed", False)
    model = sqt_model(layers, **kw)
    with pytest.raises(ValueError, match=match):
        export_hf(model, tmp_path, pad_mixed=pad_mixed)
    assert not (tmp_path / "config.json").exists()


def test_export_refuses_moe():
    if "n_experts" not in LMConfig.__dataclass_fields__:
        pytest.skip("LMConfig has no n_experts field on this branch")
    model = sqt_model("gqa", n_experts=4)
    with pytest.raises(ValueError, match="n_experts=4.*mixture-of-experts"):
        export_hf(model, "/nonexistent/never-written")


def test_export_refuses_a_large_tokenizer_and_a_used_directory(tmp_path):
    path = tmp_path / "tokenizer.json"
    n = char_tokenizer_json(path, TEXT).get_vocab_size()
    with pytest.raises(ValueError, match=f"has {n} tokens but the model's vocab_size is 20"):
        export_hf(sqt_model("mha", vocab_size=20), tmp_path / "a", tokenizer_json=path)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files \\(notes.txt\\)"):
        export_hf(sqt_model("mha"), tmp_path / "b")


def _llama(tmp_path, *, weights=None, **cfg_kw):
    """A random HF Llama saved to tmp_path; `weights(model)` edits it before saving."""
    cfg = transformers.LlamaConfig(**{**dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8), **cfg_kw})
    hf = sharpen(transformers.LlamaForCausalLM(cfg))
    if weights:
        with torch.no_grad():
            weights(hf)
    hf.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _attn(hf):
    return hf.model.layers[0].self_attn


@pytest.mark.parametrize("make, match", [
    (lambda p: _edit_config(_llama(p), model_type="gpt2"), "model_type='gpt2': expected one of"),
    (lambda p: _edit_config(_llama(p), hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda p: _llama(p, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                          "rope_theta": 1e4}), "rope_type='linear'"),
    (lambda p: _llama(p, attention_bias=True, weights=lambda m: [
        getattr(_attn(m), n).bias.zero_() for n in ("k_proj", "v_proj", "o_proj")]),
     "q_proj.bias is nonzero: sqt's projected queries have no bias"),
    (lambda p: _llama(p, attention_bias=True, weights=lambda m: (
        _attn(m).q_proj.bias.zero_())), "k_proj.bias is nonzero"),
    (lambda p: _llama(p, mlp_bias=True), "mlp.*bias is nonzero"),
    (lambda p: _edit_config(_llama(p), head_dim=6, num_attention_heads=4),
     "head_dim=6 with hidden_size=64"),
    (lambda p: _edit_config(_llama(p), num_key_value_heads=3), "multiple of the K/V heads"),
    (lambda p: p, "no config.json"),
], ids=["family", "activation", "rope-scaling", "q-bias", "k-bias", "mlp-bias", "head-dim",
        "kv-heads", "no-config"])
def test_import_refuses_what_sqt_cannot_express(make, match, tmp_path):
    directory = make(tmp_path)
    with pytest.raises(ValueError, match=match):
        import_hf(directory)


def test_import_refuses_pickled_weights(tmp_path):
    hf = _llama(tmp_path)
    (hf / "model.safetensors").unlink()
    torch.save({}, hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled PyTorch weights"):
        import_hf(hf)


def test_export_casts_to_the_requested_dtype(tmp_path):
    model = sqt_model("sqa")
    export_hf(model, tmp_path, dtype="bfloat16")
    assert hf_load(tmp_path).config.dtype == torch.bfloat16
    back, _ = import_hf(tmp_path)
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, rounded[k]) for k, v in back.state_dict().items())
    with pytest.raises(ValueError, match="dtype='int8': expected None"):
        export_hf(model, tmp_path / "x", dtype="int8")


def test_export_takes_a_compiled_model_and_refuses_other_modules(tmp_path):
    model = sqt_model("xsqa")
    back, _ = import_hf(export_hf(torch.compile(model), tmp_path / "a"))
    assert same_state(back, model)
    with pytest.raises(ValueError, match="model=Linear: expected an sqt TransformerLM"):
        export_hf(torch.nn.Linear(2, 2), tmp_path / "b")
