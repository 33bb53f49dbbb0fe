"""Prepared token datasets: `prepare` tokenizes a corpus once into memory-mapped token files, split
into train/val at document boundaries, beside `meta.json` and `tokenizer.json`; `PreparedDataset`
opens such a directory."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .corpus import CorpusReader, corpus_sha256
from .tokenizer import (EOT, MIN_BPE_VOCAB, TOKENIZER_FILE, BPETokenizer, CharTokenizer,
                        load_tokenizer, train_bpe)
from .utils import atomic_write_json

FORMAT, FORMAT_VERSION = "sqt.prepared", 1
META_FILE, SPLITS = "meta.json", ("train", "val")
BATCH_CHARS = 1 << 23
"""Text handed to the tokenizer per call: enough chunks for its threads to share, few enough that
the batch and its ids stay tens of MB."""
REDO = "prepare it again (sqt prepare CORPUS --tokenizer ... --out DIR --overwrite)"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies up to 65,536), else uint32; little-endian."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def read_meta(directory: Path) -> dict:
    """A prepared directory's meta.json, checked to be ours, of this format version, and whole."""
    where, meta_path = str(directory), directory / META_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {where!r} does not exist: expected a "
                                "directory written by `sqt prepare`")
    if not meta_path.is_file():
        raise ValueError(f"{where!r} has no {META_FILE}: expected a directory written by "
                         f"`sqt prepare`, which writes {META_FILE} last (an interrupted run "
                         f"leaves none): {REDO}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON ({e}): {REDO}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(meta_path)!r} has format={got!r}: expected {FORMAT!r}, a "
                         "directory written by `sqt prepare`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{str(meta_path)!r} has format_version={meta.get('format_version')!r};"
                         f" this sqt reads version {FORMAT_VERSION}: {REDO}")
    try:
        ok = (isinstance(meta["corpus"]["name"], str) and isinstance(meta["corpus"]["sha256"], str)
              and isinstance(meta["tokenizer"]["sha256"], str)
              and meta["dtype"] in ("uint16", "uint32")
              and all(isinstance(meta["tokens"][s], int) and meta["tokens"][s] > 0
                      for s in SPLITS))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{str(meta_path)!r} lacks or garbles corpus.name/sha256, "
                         f"tokenizer.sha256, dtype (uint16|uint32) or tokens.train/val: {REDO}")
    return meta


class PreparedDataset:
    """A directory written by `prepare`: `train.bin` / `val.bin` (token ids, `meta["dtype"]`),
    `tokenizer.json` and `meta.json`. `train` and `val` are read-only `np.memmap`s: nothing is
    read until a window is gathered from them."""

    def __init__(self, path):
        self.path = Path(path)
        self.meta = meta = read_meta(self.path)
        tok_file = self.path / TOKENIZER_FILE
        # The file's own bytes are hashed (not a re-serialisation, which a newer `tokenizers`
        # may spell differently).
        if not tok_file.is_file():
            raise ValueError(f"{str(tok_file)!r} is missing: {REDO}")
        sha = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        if sha != meta["tokenizer"]["sha256"]:
            raise ValueError(f"{str(self.path)!r}: {TOKENIZER_FILE} has sha256 {sha}, but the "
                             f"tokens were made with {meta['tokenizer']['sha256']}: {REDO}")
        self.tokenizer = load_tokenizer(tok_file)
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        for split in SPLITS:
            file, n = self.path / f"{split}.bin", meta["tokens"][split]
            size = file.stat().st_size if file.is_file() else None
            if size != n * dtype.itemsize:
                raise ValueError(f"{str(file)!r} has {size} bytes but {META_FILE} records {n} "
                                 f"{meta['dtype']} tokens ({n * dtype.itemsize} bytes): {REDO}")
            setattr(self, split, np.memmap(file, dtype=dtype, mode="r", shape=(n,)))
        self.name = meta["corpus"]["name"]
        self.sha256 = meta["corpus"]["sha256"]

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "path": str(self.path),
                "vocab_size": self.tokenizer.vocab_size,
                "tokenizer_sha256": self.meta["tokenizer"]["sha256"],
                "train_tokens": int(self.train.size), "val_tokens": int(self.val.size),
                "dtype": self.meta["dtype"]}

    def __repr__(self) -> str:
        return (f"PreparedDataset({str(self.path)!r}, {self.name}, train={self.train.size:,}, "
                f"val={self.val.size:,} tokens)")


def parse_tokenizer_spec(spec) -> tuple[str, object]:
    """`char` -> ("char", None); `bpe:VOCAB` -> ("bpe", VOCAB); a tokenizer.json file or a
    directory holding one -> ("file", path)."""
    accepted = (f"expected char, bpe:VOCAB (an integer from {MIN_BPE_VOCAB}, e.g. bpe:10000) or "
                "the path of a tokenizer.json")
    text = str(spec)
    if text == "char":
        return "char", None
    if text.startswith("bpe:"):
        vocab = text[4:]
        if not vocab.isdigit() or not MIN_BPE_VOCAB <= int(vocab) <= 2**32:
            raise ValueError(f"tokenizer={text!r}: {accepted}; a byte-level BPE needs at least "
                             f"{MIN_BPE_VOCAB} symbols (256 bytes + {EOT})")
        return "bpe", int(vocab)
    path = Path(text)
    if path.is_file() or (path / TOKENIZER_FILE).is_file():
        return "file", path
    raise ValueError(f"tokenizer={text!r}: no such file; {accepted}")


def prepare(corpus, tokenizer, out_dir, *, val_fraction: float = 0.01, min_frequency: int = 2,
            overwrite: bool = False, log: Optional[Callable[[str], None]] = None
            ) -> PreparedDataset:
    """Tokenize `corpus` once into `out_dir` and return it opened as a `PreparedDataset`.

    corpus: a UTF-8 text file, plain or `.gz` (read as a stream, never whole). Lines holding only
        `<|endoftext|>` separate documents; a file without them is one document.
    tokenizer: `char` (the corpus's own characters, plus an end-of-text id when it has document
        markers), `bpe:VOCAB` (a byte-level BPE of VOCAB symbols trained on the whole corpus),
        the path of a `tokenizer.json` (or of a directory holding one) to reuse, or a
        `CharTokenizer` / `BPETokenizer`.
    val_fraction: in (0, 0.5]. Every k-th document, k = round(1 / val_fraction), is validation
        (spread over the corpus, none cut in two); a corpus with fewer than k documents is split
        by position instead: the last val_fraction of its tokens. The default 0.01 gives the
        100 MB corpora about 250k validation tokens, thousands of 1k-token windows.
    min_frequency: a BPE merge must be seen this many times (BPE only).
    overwrite: replace a dataset made from another corpus or with other settings; otherwise
        that is an error, and re-running with the same corpus and settings does nothing.
    log: where progress lines go (default: stderr).

    Writes `train.bin` and `val.bin` (token ids, uint16 while the vocabulary fits, else uint32;
    each document followed by `eot_id` where a marker line followed it), `tokenizer.json`, and
    `meta.json` last, so a directory with a meta.json is complete."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    corpus, out_dir = Path(corpus), Path(out_dir)
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus {str(corpus)!r} "
                                f"{'is a directory' if corpus.is_dir() else 'does not exist'}: "
                                "expected a UTF-8 text file (plain or .gz)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) \
            or not 0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction={val_fraction!r}: expected a number in (0, 0.5]")
    if isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        kind, arg, loaded = "given", None, tokenizer
    else:
        kind, arg = parse_tokenizer_spec(tokenizer)
        loaded = load_tokenizer(arg) if kind == "file" else None
    # A tokenizer handed in is known by its hash, one made here by its recipe.
    recipe = {"char": "char", "bpe": f"bpe:{arg}"}
    settings = {"tokenizer": recipe.get(kind) or f"sha256:{loaded.sha256}",
                "val_fraction": float(val_fraction)}
    if kind == "bpe":
        settings["min_frequency"] = min_frequency
    if _up_to_date(corpus, out_dir, settings, overwrite, say):
        return PreparedDataset(out_dir)

    clock = {"start": time.perf_counter()}
    reader = CorpusReader(corpus)
    tok, first_sha = loaded, None
    if kind == "char":
        say(f"prepare: collecting the characters of {corpus.name}")
        chars, eot = set(), False
        for chunk in reader.chunks():
            eot = eot or EOT in chunk.text
            chars.update(chunk.text.replace(EOT, "") if eot else chunk.text)
        eot = eot or reader.has_markers
        _require_text(reader, corpus)
        tok, first_sha = CharTokenizer(sorted(chars), eot=eot), reader.sha256
    elif kind == "bpe":
        say(f"prepare: training a {arg}-symbol byte-level BPE on {corpus.name}")
        tok = train_bpe((c.text for c in reader.chunks()), arg, min_frequency=min_frequency)
        _require_text(reader, corpus)
        first_sha = reader.sha256
    clock["tokenizer"] = time.perf_counter()

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)   # incomplete until the new one is written
    say(f"prepare: encoding {corpus.name} ({tok.vocab_size:,}-symbol vocabulary)")
    dtype = token_dtype(tok.vocab_size)
    tmp = {s: out_dir / f".{s}.bin.tmp" for s in SPLITS}
    try:
        counts = _encode(reader, tok, tmp, dtype, round(1 / val_fraction), corpus)
        _require_text(reader, corpus)
        if first_sha is not None and reader.sha256 != first_sha:
            raise ValueError(f"corpus {str(corpus)!r} changed while it was being prepared")
        clock["encode"] = time.perf_counter()
        k = round(1 / val_fraction)
        rule = f"documents: document d is validation when d % {k} == {k - 1} (one in {k})"
        if counts["tokens"]["val"] == 0:
            rule = f"position: the last {val_fraction:g} of the tokens"
            _split_tail(tmp, dtype, counts, val_fraction, corpus)
        for s in SPLITS:
            os.replace(tmp[s], out_dir / f"{s}.bin")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    tok.save(out_dir / TOKENIZER_FILE)
    clock["end"] = time.perf_counter()
    total = sum(counts["tokens"].values())
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "corpus": {"name": corpus.name, "path": str(corpus.resolve()), "sha256": reader.sha256,
                   "bytes": reader.n_bytes},
        "tokenizer": {"spec": str(tokenizer), "type": type(tok).__name__,
                      "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "sha256": tok.sha256},
        "settings": settings, "dtype": dtype.name, "split": rule, **counts,
        "tokens_per_byte": round(total / reader.n_bytes, 5),
        "timing_s": {"tokenizer": round(clock["tokenizer"] - clock["start"], 3),
                     "encode": round(clock["encode"] - clock["tokenizer"], 3),
                     "write": round(clock["end"] - clock["encode"], 3),
                     "total": round(clock["end"] - clock["start"], 3)},
    }
    atomic_write_json(out_dir / META_FILE, meta)
    say(f"prepare: wrote {counts['tokens']['train']:,} train + {counts['tokens']['val']:,} val "
        f"tokens ({dtype.name}) of {counts['documents']['total']:,} documents to {out_dir} in "
        f"{meta['timing_s']['total']:.1f} s")
    return PreparedDataset(out_dir)


def _require_text(reader: CorpusReader, corpus: Path) -> None:
    if reader.n_bytes == 0:
        raise ValueError(f"corpus {str(corpus)!r} is empty: expected UTF-8 text")


def _up_to_date(corpus: Path, out_dir: Path, settings: dict, overwrite: bool, say) -> bool:
    """True when out_dir already holds this corpus prepared with these settings; an error when
    it holds something else (unless `overwrite`)."""
    meta_path = out_dir / META_FILE
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={str(out_dir)!r} is a file: expected a directory")
    if overwrite or not out_dir.is_dir():
        return False
    if not meta_path.is_file():
        ours = {f"{s}.bin" for s in SPLITS} | {TOKENIZER_FILE}
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in ours
                        and not p.name.startswith("."))
        if others:
            raise ValueError(f"out_dir={str(out_dir)!r} holds other files ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}) and no {META_FILE}: expected "
                             "an empty directory or one written by `sqt prepare`")
        return False
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        old_sha, old_settings = old["corpus"]["sha256"], old["settings"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(f"{str(meta_path)!r} is unreadable: pass overwrite=True (--overwrite) to "
                         "replace the directory's dataset") from None
    sha = corpus_sha256(corpus)
    changes = [f"{k}: {old_settings.get(k)!r} -> {v!r}" for k, v in settings.items()
               if old_settings.get(k) != v]
    if sha != old_sha:
        changes.insert(0, f"corpus sha256: {old_sha[:12]}... -> {sha[:12]}...")
    if changes:
        raise ValueError(f"out_dir={str(out_dir)!r} already holds a dataset prepared differently "
                         f"({'; '.join(changes)}): pass overwrite=True (--overwrite) to replace "
                         "it, or choose another directory")
    say(f"prepare: {out_dir} is up to date (same corpus text, sha256 {sha[:12]}..., and "
        "settings); nothing to do")
    return True


def _encode(reader: CorpusReader, tok, tmp: dict, dtype: np.dtype, every: int,
            corpus: Path) -> dict:
    """Stream the corpus through the tokenizer in batches; document d goes to val when
    d % every == every - 1. Returns token and document counts per split."""
    tokens = {s: 0 for s in SPLITS}
    docs = {s: 0 for s in SPLITS}
    files = {s: open(tmp[s], "wb") for s in SPLITS}
    eot = None if tok.eot_id is None else np.array([tok.eot_id], dtype=dtype)
    last_doc = -1

    def flush(batch):
        nonlocal last_doc
        try:
            arrays = tok.encode_batch([c.text for c in batch])
        except ValueError as e:
            raise ValueError(f"corpus {str(corpus)!r}: {e}") from None
        for chunk, ids in zip(batch, arrays):
            split = "val" if chunk.doc % every == every - 1 else "train"
            ids = ids.astype(dtype)
            if chunk.ends_doc:
                if eot is None:
                    raise ValueError(f"corpus {str(corpus)!r} has {EOT} document markers but the "
                                     "tokenizer has no end-of-text token: use char, bpe:VOCAB or "
                                     f"a tokenizer.json with {EOT}")
                ids = np.concatenate([ids, eot])
            files[split].write(ids.tobytes())
            tokens[split] += len(ids)
            if chunk.doc != last_doc:
                docs[split] += 1
                last_doc = chunk.doc

    try:
        batch, chars = [], 0
        for chunk in reader.chunks():
            batch.append(chunk)
            chars += len(chunk.text)
            if chars >= BATCH_CHARS:
                flush(batch)
                batch, chars = [], 0
        if batch:
            flush(batch)
    finally:
        for f in files.values():
            f.close()
    return {"tokens": tokens, "documents": {"total": reader.n_documents, **docs}}


def _split_tail(tmp: dict, dtype: np.dtype, counts: dict, val_fraction: float,
                corpus: Path) -> None:
    """Too few documents for the document rule: the validation split is the tail of the token
    stream, moved from the train file."""
    total = counts["tokens"]["train"]
    n_val = max(2, round(total * val_fraction))
    if total - n_val < 2:
        raise ValueError(f"corpus {str(corpus)!r} has {total} tokens: too short to split into "
                         f"train and validation with val_fraction={val_fraction}")
    tail = np.fromfile(tmp["train"], dtype=dtype, offset=(total - n_val) * dtype.itemsize)
    tail.tofile(tmp["val"])
    os.truncate(tmp["train"], (total - n_val) * dtype.itemsize)
    counts["tokens"] = {"train": total - n_val, "val": n_val}
    counts["documents"]["val"] = 1   # the tail of the last document
