"""`prepare` and `PreparedDataset`: document-boundary splits, exact token streams, idempotent
re-runs, .gz corpora, the token dtype, and clear errors for every bad input."""

import gzip
import json
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sqt.corpus import SAFE_CUT, CorpusReader
from sqt.data import PreparedDataset, load_dataset, prepare, token_dtype
from sqt.tokenizer import EOT, CharTokenizer, train_bpe

WORDS = "the a cat sat on mat. It's naïve 東京 😀 42 and, then\n".split(" ")


def documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) + rng.choice([" ", " ", "\n", "  "])
                    for _ in range(rng.randint(5, 60))) + "\n" for _ in range(n)]


def write_corpus(path, docs, gz=False) -> str:
    text = "".join(d + EOT + "\n" for d in docs)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return text


def quiet(_msg):
    pass


def split_docs(tok, ids) -> list[str]:
    """The documents of a split: its text cut after every end-of-text id."""
    text = tok.decode(ids)
    assert text.endswith(EOT)
    return text[:-len(EOT)].split(EOT)


@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_documents_split_whole_and_in_order(spec, tmp_path):
    docs = documents(25)
    write_corpus(tmp_path / "c.txt", docs)
    ds = prepare(tmp_path / "c.txt", spec, tmp_path / "out", val_fraction=0.2, log=quiet)
    tok = ds.tokenizer
    # Every fifth document (d % 5 == 4) validates; each split is its documents, whole, in order,
    # each followed by the end-of-text id.
    assert split_docs(tok, ds.val) == [d for i, d in enumerate(docs) if i % 5 == 4]
    assert split_docs(tok, ds.train) == [d for i, d in enumerate(docs) if i % 5 != 4]
    assert list(ds.val) == [t for i, d in enumerate(docs) if i % 5 == 4
                            for t in tok.encode(d) + [tok.eot_id]]
    assert ds.meta["documents"] == {"total": 25, "train": 20, "val": 5}
    assert ds.meta["tokens"] == {"train": ds.train.size, "val": ds.val.size}
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    assert ds.describe()["tokenizer_sha256"] == tok.sha256 == ds.meta["tokenizer"]["sha256"]


def test_same_input_same_files(tmp_path):
    write_corpus(tmp_path / "c.txt", documents(30))
    a = prepare(tmp_path / "c.txt", "bpe:300", tmp_path / "a", log=quiet)
    b = prepare(tmp_path / "c.txt", "bpe:300", tmp_path / "b", log=quiet)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()


def test_a_file_without_markers_is_one_document_split_by_position(tmp_path):
    text = "".join(documents(10))
    (tmp_path / "plain.txt").write_text(text)
    ds = prepare(tmp_path / "plain.txt", "char", tmp_path / "out", val_fraction=0.1, log=quiet)
    assert ds.tokenizer.eot_id is None and ds.tokenizer == CharTokenizer.from_text(text)
    assert ds.val.size == round(len(text) * 0.1)
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == text
    assert ds.meta["split"].startswith("position")


def test_gzip_corpus_reads_like_the_plain_one(tmp_path):
    docs = documents(12)
    text = write_corpus(tmp_path / "c.txt", docs)
    write_corpus(tmp_path / "c.txt.gz", docs, gz=True)
    plain = prepare(tmp_path / "c.txt", "bpe:300", tmp_path / "p", val_fraction=0.25, log=quiet)
    packed = prepare(tmp_path / "c.txt.gz", "bpe:300", tmp_path / "g", val_fraction=0.25,
                     log=quiet)
    assert np.array_equal(plain.train, packed.train) and np.array_equal(plain.val, packed.val)
    assert plain.sha256 == packed.sha256 == __import__("hashlib").sha256(text.encode()).hexdigest()


def test_rerun_does_nothing_and_a_change_is_an_error(tmp_path):
    corpus, out = tmp_path / "c.txt", tmp_path / "out"
    write_corpus(corpus, documents(20))
    prepare(corpus, "char", out, log=quiet)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    said = []
    again = prepare(corpus, "char", out, log=said.append)
    assert "up to date" in said[-1] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert again.meta == json.loads((out / "meta.json").read_text())
    with pytest.raises(ValueError, match=r"val_fraction: 0.01 -> 0.2.*overwrite=True"):
        prepare(corpus, "char", out, val_fraction=0.2, log=quiet)
    write_corpus(corpus, documents(20, seed=1))
    with pytest.raises(ValueError, match="corpus sha256"):
        prepare(corpus, "char", out, log=quiet)
    redone = prepare(corpus, "bpe:300", out, overwrite=True, log=quiet)
    assert redone.meta["settings"]["tokenizer"] == "bpe:300"


def test_a_saved_tokenizer_is_reused(tmp_path):
    write_corpus(tmp_path / "a.txt", documents(10))
    write_corpus(tmp_path / "b.txt", documents(10, seed=2))
    first = prepare(tmp_path / "a.txt", "bpe:300", tmp_path / "a", log=quiet)
    second = prepare(tmp_path / "b.txt", tmp_path / "a" / "tokenizer.json", tmp_path / "b",
                     log=quiet)
    assert second.tokenizer == first.tokenizer
    assert second.meta["settings"]["tokenizer"] == f"sha256:{first.tokenizer.sha256}"
    third = prepare(tmp_path / "b.txt", first.tokenizer, tmp_path / "b", log=quiet)
    assert np.array_equal(third.train, second.train)   # the same tokenizer: nothing to redo


def test_dtype_follows_the_vocabulary(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    many = "".join(chr(0x20000 + i) for i in range(70_000))    # 70,000 distinct characters
    (tmp_path / "wide.txt").write_text(many)
    ds = prepare(tmp_path / "wide.txt", "char", tmp_path / "out", log=quiet)
    assert ds.train.dtype == np.uint32 and ds.meta["dtype"] == "uint32"
    assert ds.tokenizer.decode(np.concatenate([ds.train, ds.val])) == many
    assert load_dataset(str(tmp_path / "out")).describe() == ds.describe()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(WORDS + [" ", "\n", "  ", "\n\n", " \n", "x", "'", "'s", "\t",
                                         ".", EOT]), max_size=40))
def test_cutting_at_safe_points_keeps_the_tokens(bpe_small, pieces):
    text = "".join(pieces)
    cuts = [0] + [m.start() for m in SAFE_CUT.finditer(text)] + [len(text)]
    parts = [text[a:b] for a, b in zip(cuts, cuts[1:])]
    assert sum((bpe_small.encode(p) for p in parts), []) == bpe_small.encode(text)


@pytest.fixture(scope="module")
def bpe_small():
    return train_bpe(documents(40), 400)


def test_reader_cuts_long_documents_and_hashes_the_text(tmp_path):
    docs = [d * 40 for d in documents(3)]
    text = write_corpus(tmp_path / "c.txt", docs)
    reader = CorpusReader(tmp_path / "c.txt", chunk_chars=500)
    chunks = list(reader.chunks())
    assert len(chunks) > 3 * 4 and max(len(c.text) for c in chunks) < 1500
    assert ["".join(c.text for c in chunks if c.doc == d) for d in range(3)] == docs
    assert [c.ends_doc for c in chunks].count(True) == 3
    assert reader.n_documents == 3 and reader.n_bytes == len(text.encode())


@pytest.mark.parametrize("spec, match", [
    ("bpe:abc", r"tokenizer='bpe:abc': expected char, bpe:VOCAB"),
    ("bpe:10", r"tokenizer='bpe:10': .*at least 257"),
    ("nonsense.json", r"tokenizer='nonsense.json': no such file; expected char"),
])
def test_bad_tokenizer_specs(spec, match, tmp_path):
    write_corpus(tmp_path / "c.txt", documents(3))
    with pytest.raises(ValueError, match=match):
        prepare(tmp_path / "c.txt", spec, tmp_path / "out", log=quiet)


def test_bad_corpora_and_settings_are_clear_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="corpus '.*absent.txt' does not exist"):
        prepare(tmp_path / "absent.txt", "char", out, log=quiet)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.txt.gz").write_bytes(gzip.compress(b""))
    for name in ("empty.txt", "empty.txt.gz"):
        for spec in ("char", "bpe:300"):
            with pytest.raises(ValueError, match=f"corpus '.*{name}' is empty"):
                prepare(tmp_path / name, spec, out, log=quiet)
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfe")
    with pytest.raises(ValueError, match="bad.txt' is not UTF-8"):
        prepare(tmp_path / "bad.txt", "char", out, log=quiet)
    write_corpus(tmp_path / "c.txt", documents(3))
    for bad in (0, 0.7, "0.1", True):
        with pytest.raises(ValueError, match=r"val_fraction=.*expected a number in \(0, 0.5\]"):
            prepare(tmp_path / "c.txt", "char", out, val_fraction=bad, log=quiet)
    CharTokenizer.from_text("abc").save(tmp_path / "abc.json")
    with pytest.raises(ValueError, match="c.txt'.*not in the tokenizer's vocabulary"):
        prepare(tmp_path / "c.txt", tmp_path / "abc.json", out, log=quiet)
    CharTokenizer.from_text("".join(documents(3))).save(tmp_path / "no_eot.json")
    with pytest.raises(ValueError, match="document markers but the tokenizer has no end-of-text"):
        prepare(tmp_path / "c.txt", tmp_path / "no_eot.json", out, log=quiet)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="holds other files \\(notes.md\\) and no meta.json"):
        prepare(tmp_path / "c.txt", "char", tmp_path / "busy", log=quiet)


def test_broken_prepared_directories_are_clear_errors(tmp_path):
    write_corpus(tmp_path / "c.txt", documents(20))
    out = tmp_path / "out"
    prepare(tmp_path / "c.txt", "char", out, log=quiet)
    with pytest.raises(FileNotFoundError, match="'.*absent' does not exist"):
        PreparedDataset(tmp_path / "absent")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ValueError, match="has no meta.json: expected a directory written by"):
        PreparedDataset(tmp_path / "foreign")
    (tmp_path / "foreign" / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format='other': expected 'sqt.prepared'"):
        PreparedDataset(tmp_path / "foreign")
    val = out / "val.bin"
    val.write_bytes(val.read_bytes()[:-2])
    with pytest.raises(ValueError, match="val.bin' has .* bytes but meta.json records"):
        PreparedDataset(out)
    CharTokenizer.from_text("xyz").save(out / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json has sha256 .* but the tokens were made"):
        PreparedDataset(out)
    (out / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json' is missing"):
        PreparedDataset(out)
    (out / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PreparedDataset(out)
