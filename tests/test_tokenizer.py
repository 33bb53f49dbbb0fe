"""Tokenizers: exact round trips on any text, the end-of-text token, tokenizer.json that
`transformers` loads with the same ids, clear errors."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from sqt.tokenizer import (EOT, BPETokenizer, CharTokenizer, decode_stream, load_tokenizer,
                           tokenizer_from_json, train_bpe)

SAMPLE = ("The quick brown fox jumps over the lazy dog. It's 2024!\n\n"
          "Naïve café, crème brûlée; 東京 and 北京 😀🎉  tabs\tand  spaces\n") * 20


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return train_bpe([SAMPLE[i:i + 300] for i in range(0, len(SAMPLE), 300)], 300)


def test_char_round_trip_and_legacy_dict():
    tok = CharTokenizer.from_text("hello world")
    ids = tok.encode("world hello")
    assert tok.decode(ids) == "world hello" and tok.eot_id is None
    again = CharTokenizer.from_dict(tok.to_dict())
    assert again == tok and again.encode("low") == tok.encode("low")
    assert tok.to_dict() == {"type": "char", "chars": " dehlorw"}   # what old checkpoints hold


def test_char_errors_name_the_problem():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary.*'xz'"):
        tok.encode("axbz")
    with pytest.raises(ValueError, match="token id 3"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="type='bpe'"):
        CharTokenizer.from_dict({"type": "bpe", "chars": "abc"})


def test_char_end_of_text_is_one_extra_id():
    tok = CharTokenizer.from_text(f"ab\n{EOT}\nba\n")
    assert tok.chars == "\nab" and tok.eot_id == 3 and tok.vocab_size == 4
    assert tok.encode(f"a{EOT}b") == [1, 3, 2]
    assert tok.decode([1, 3, 2]) == f"a{EOT}b"
    assert CharTokenizer.from_dict(tok.to_dict()) == tok
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.encode("<")      # the marker's characters are not symbols of their own


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1), st.booleans())
def test_char_round_trip_on_any_text(text, with_eot):
    text = f"{text}{EOT}{text}" if with_eot else text
    tok = CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size
    assert tokenizer_from_json(tok.to_json()) == tok


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from([EOT, "\n\n", "  ", "\r\n", "é", "😀",
                                                        "東京", "'s", " \t "])), max_size=12))
def test_bpe_round_trip_on_any_text(bpe, pieces):
    text = "".join(pieces)
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert ids.count(bpe.eot_id) == text.count(EOT)
    pieces = list(decode_stream(bpe, ids))
    assert "".join(pieces) == text
    assert "\ufffd" in text or not any("\ufffd" in p for p in pieces)   # no half characters


def test_bpe_vocabulary_and_determinism(bpe):
    assert bpe.vocab_size == 300 and bpe.eot_id == 0
    ids = bpe.encode(f"fox{EOT}dog")
    cut = ids.index(bpe.eot_id)
    assert bpe.decode(ids[:cut]) == "fox" and bpe.decode(ids[cut + 1:]) == "dog"
    again = train_bpe([SAMPLE[i:i + 300] for i in range(0, len(SAMPLE), 300)], 300)
    assert again.sha256 == bpe.sha256


@pytest.mark.parametrize("kind", ["char", "char+eot", "bpe"])
def test_saved_tokenizer_loads_here_and_in_transformers(kind, bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = {"char": CharTokenizer.from_text(SAMPLE), "bpe": bpe,
           "char+eot": CharTokenizer.from_text(SAMPLE, eot=True)}[kind]
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    for where in (path, tmp_path):
        loaded = load_tokenizer(where)
        assert type(loaded) is type(tok) and loaded == tok and loaded.sha256 == tok.sha256
    text = SAMPLE[:200] + (EOT + "fox" if tok.eot_id is not None else "")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    ids = hf(text)["input_ids"]
    assert ids == tok.encode(text) and hf.decode(ids) == text
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(text)["input_ids"] == ids


def test_char_tokenizer_json_is_a_plain_bpe_without_merges():
    spec = json.loads(CharTokenizer.from_text("ab", eot=True).to_json())
    assert spec["model"]["type"] == "BPE" and spec["model"]["merges"] == []
    assert spec["model"]["vocab"] == {"a": 0, "b": 1}
    assert spec["pre_tokenizer"] is None and spec["decoder"] == {"type": "Fuse"}
    assert [(a["content"], a["id"], a["special"]) for a in spec["added_tokens"]] == [(EOT, 2, True)]


def test_bad_tokenizers_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=10: expected an integer from 257"):
        train_bpe(["abc"], 10)
    with pytest.raises(FileNotFoundError, match="absent.json.*tokenizer.json"):
        load_tokenizer(tmp_path / "absent.json")
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)
    for tok in (CharTokenizer.from_text("ab"), train_bpe(["ab"], 300)):
        with pytest.raises(ValueError, match="token id 999"):
            tok.decode([999])
