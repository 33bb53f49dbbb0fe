"""The bundled corpus, character-level text files and the training-window gather: offline,
checked, clear errors."""

import gzip

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sqt.data import (TINY_SHAKESPEARE_SHA256, gather_windows, load_text_file,
                      load_tinyshakespeare, read_bundled_text)


def test_bundled_tiny_shakespeare_is_the_standard_corpus():
    ds = load_tinyshakespeare()
    assert ds.sha256 == TINY_SHAKESPEARE_SHA256
    assert ds.tokenizer.vocab_size == 65
    n = ds.train.size + ds.val.size
    assert n == 1_115_394                      # one token per character (the text is ASCII)
    assert ds.train.size == int(n * 0.9)       # 90/10, validation is the tail
    assert ds.train.dtype == np.uint16 and ds.tokenizer.eot_id is None
    assert ds.tokenizer.decode(ds.val[:5]) == read_bundled_text()[ds.train.size:][:5]


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
    assert ds.tokenizer.vocab_size == 10 and ds.train.size == 90 and ds.val.size == 10
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        load_text_file(tmp_path / "absent.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ValueError, match="UTF-8"):
        load_text_file(bad)
    with pytest.raises(ValueError, match="too short"):
        (tmp_path / "short.txt").write_text("ab")
        load_text_file(tmp_path / "short.txt")


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 64), st.lists(st.integers(0, 10**6), min_size=1, max_size=8))
def test_window_gather_equals_slicing_on_a_memmap(tmp_path_factory, seq_len, raw_starts):
    path = tmp_path_factory.mktemp("windows") / "tokens.bin"
    tokens = np.random.default_rng(seq_len).integers(0, 65_536, 500, dtype=np.uint16)
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    starts = [s % (len(tokens) - seq_len) for s in raw_starts]
    got = gather_windows(mm, np.array(starts), seq_len)
    assert got.dtype == np.int64 and got.shape == (len(starts), seq_len + 1)
    for row, s in zip(got, starts):
        assert np.array_equal(row, tokens[s:s + seq_len + 1].astype(np.int64))


def test_window_gather_refuses_windows_past_the_end():
    with pytest.raises(ValueError, match=r"starts: expected offsets in 0..6 .* got 0..7"):
        gather_windows(np.arange(10), [0, 7], 3)
