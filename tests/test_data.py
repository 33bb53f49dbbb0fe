"""The bundled corpus, text files and the character tokenizer: offline, checked, clear errors."""

import gzip

import pytest
import torch

from sqt.data import (TINY_SHAKESPEARE_SHA256, CharTokenizer, load_text_file,
                      load_tinyshakespeare, read_bundled_text)


def test_bundled_tiny_shakespeare_is_the_standard_corpus():
    ds = load_tinyshakespeare()
    assert ds.sha256 == TINY_SHAKESPEARE_SHA256
    assert ds.tokenizer.vocab_size == 65
    n = ds.train.numel() + ds.val.numel()
    assert n == 1_115_394                      # one token per character (the text is ASCII)
    assert ds.train.numel() == int(n * 0.9)    # 90/10, validation is the tail
    assert ds.train.dtype == torch.long


def test_tokenizer_round_trip_and_serialisation():
    tok = CharTokenizer.from_text("hello world")
    ids = tok.encode("world hello")
    assert tok.decode(ids) == "world hello"
    assert tok.decode(torch.tensor(ids)) == "world hello"
    again = CharTokenizer.from_dict(tok.to_dict())
    assert again == tok and again.encode("low") == tok.encode("low")
    assert tok.to_dict() == {"type": "char", "chars": " dehlorw"}


def test_tokenizer_errors_name_the_problem():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary.*'xz'"):
        tok.encode("axbz")
    with pytest.raises(ValueError, match="token id 3"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="type='bpe'"):
        CharTokenizer.from_dict({"type": "bpe", "chars": "abc"})


def test_corrupted_bundle_is_rejected(tmp_path):
    text = read_bundled_text()
    edited = tmp_path / "edited.txt.gz"
    edited.write_bytes(gzip.compress(text.replace("ROMEO", "ROMEX", 1).encode()))
    with pytest.raises(ValueError, match="sha256 of its text is .* expected 86c4e6aa"):
        read_bundled_text(edited)
    truncated = tmp_path / "truncated.txt.gz"
    truncated.write_bytes(gzip.compress(text.encode())[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        read_bundled_text(truncated)
    with pytest.raises(FileNotFoundError, match="missing.*reinstall"):
        read_bundled_text(tmp_path / "absent.txt.gz")


def test_user_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("abcdefghij" * 10)
    ds = load_text_file(path)
    assert ds.tokenizer.vocab_size == 10 and ds.train.numel() == 90 and ds.val.numel() == 10
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_text_file(tmp_path / "absent.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match="UTF-8"):
        load_text_file(bad)
    with pytest.raises(ValueError, match="too short"):
        (tmp_path / "short.txt").write_text("ab")
        load_text_file(tmp_path / "short.txt")
