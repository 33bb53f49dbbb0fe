"""Training data, offline: the bundled Tiny Shakespeare (sha256-checked), character-level text
files, corpora prepared once into memory-mapped token files (`prepare`, `PreparedDataset`, from
sqt.prepared), and the window gather that training draws its batches through."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np

from .prepared import PreparedDataset, parse_tokenizer_spec, prepare, token_dtype
from .tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

__all__ = ["BPETokenizer", "CharTokenizer", "PreparedDataset", "TextDataset", "gather_windows",
           "load_dataset", "load_text_file", "load_tinyshakespeare", "load_tokenizer",
           "parse_tokenizer_spec", "prepare", "read_bundled_text", "token_dtype"]

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt.gz"
"""karpathy/char-rnn's input.txt, the standard character-level corpus (1,115,394 bytes, 65
distinct characters); the checksum is of the decompressed text, so results stay comparable with
published numbers on it."""


def gather_windows(tokens: np.ndarray, starts, seq_len: int, *,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
    """Windows tokens[s : s + seq_len + 1] for each start s, as a (B, seq_len + 1) int64 array
    (inputs are [:, :-1], targets [:, 1:]). One contiguous copy per window, so on a memmap only
    the pages of the windows are read; `torch.from_numpy` of the result does not copy. `out`: an
    int64 (B, seq_len + 1) array to write into (a pinned buffer's view) instead of a new one."""
    starts = np.asarray(starts).reshape(-1)
    width = seq_len + 1
    if starts.size and (starts.min() < 0 or starts.max() > len(tokens) - width):
        raise ValueError(f"starts: expected offsets in 0..{len(tokens) - width} for windows of "
                         f"{width} tokens in {len(tokens)}, got {starts.min()}..{starts.max()}")
    if out is None:
        out = np.empty((starts.size, width), dtype=np.int64)
    elif out.shape != (starts.size, width) or out.dtype != np.int64:
        raise ValueError(f"out: expected an int64 array of shape {(starts.size, width)}, got "
                         f"{out.dtype} {out.shape}")
    for row, s in zip(out, starts.tolist()):
        row[:] = tokens[s:s + width]
    return out


@dataclass
class TextDataset:
    """A character-level corpus held in memory: the first (1 - val_fraction) of the text trains,
    the rest validates (a contiguous tail, not a random sample, so no validation text leaks into
    training)."""

    name: str
    tokenizer: CharTokenizer
    train: np.ndarray   # (N_train,) token ids, uint16 (uint32 past 65,536 symbols)
    val: np.ndarray     # (N_val,)
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.tokenizer.vocab_size,
                "tokenizer_sha256": self.tokenizer.sha256,
                "train_tokens": int(self.train.size), "val_tokens": int(self.val.size)}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_from_text(text: str, name: str, val_fraction: float = 0.1,
                      tokenizer: Optional[CharTokenizer] = None) -> TextDataset:
    if not (isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction!r}: expected a float in (0, 1)")
    if not text:
        raise ValueError(f"{name}: the text is empty: expected text to train on")
    tok = tokenizer or CharTokenizer.from_text(text)
    ids = tok.encode_array(text).astype(token_dtype(tok.vocab_size))
    n_train = int(len(ids) * (1 - val_fraction))
    if n_train < 2 or len(ids) - n_train < 2:
        raise ValueError(f"{name}: {len(ids)} characters is too short to split into train and "
                         f"validation with val_fraction={val_fraction}")
    return TextDataset(name, tok, ids[:n_train], ids[n_train:], _sha256(text))


def read_bundled_text(path=None, expected_sha256: str = TINY_SHAKESPEARE_SHA256) -> str:
    """The bundled Tiny Shakespeare text (or a gzip at `path`), checked against its sha256."""
    if path is None:
        source = resources.files("sqt").joinpath("data", TINY_SHAKESPEARE_FILE)
        where = str(source)
    else:
        source, where = Path(path), str(path)
    if not source.is_file():
        raise FileNotFoundError(f"{where!r} is missing: expected the gzip-compressed Tiny "
                                "Shakespeare shipped with the sqt package (reinstall sqt)")
    try:
        text = gzip.decompress(source.read_bytes()).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{where!r} is corrupt ({type(e).__name__}: {e}); expected a gzip of "
                         "UTF-8 text") from None
    got = _sha256(text)
    if got != expected_sha256:
        raise ValueError(f"{where!r} is corrupt: sha256 of its text is {got}, expected "
                         f"{expected_sha256}")
    return text


def load_tinyshakespeare(val_fraction: float = 0.1, path=None) -> TextDataset:
    """Tiny Shakespeare, 65-character vocabulary, 90/10 split (1,003,854 / 111,540 tokens)."""
    return dataset_from_text(read_bundled_text(path), "tinyshakespeare", val_fraction)


def load_text_file(path, val_fraction: float = 0.1) -> TextDataset:
    """Any UTF-8 text file (plain or .gz), character vocabulary built from its own text (with
    an end-of-text id if it holds `<|endoftext|>`; `prepare` is the way to split such a corpus at
    its document boundaries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} "
                                f"{'is a directory' if path.is_dir() else 'does not exist'}: "
                                "expected a UTF-8 text file (plain or .gz)")
    raw = path.read_bytes()
    try:
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"text file {str(path)!r} cannot be read as UTF-8 text "
                         f"({type(e).__name__}: {e})") from None
    if not text:
        raise ValueError(f"text file {str(path)!r} is empty: expected UTF-8 text to train on")
    if "\x00" in text:   # valid UTF-8, but token ids or other binary data, not text
        raise ValueError(f"text file {str(path)!r} holds NUL bytes: expected UTF-8 text (a "
                         "prepared dataset is given as its directory)")
    return dataset_from_text(text, path.name, val_fraction)


def load_dataset(name_or_path: str = "tinyshakespeare", val_fraction: float = 0.1):
    """`tinyshakespeare` (bundled), a directory written by `prepare`, or a path to a text file
    (character-level, split 1 - val_fraction / val_fraction)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or str(name_or_path) == "":
        raise ValueError(f"data={name_or_path!r}: expected 'tinyshakespeare', a directory written "
                         "by `sqt prepare` or the path of a UTF-8 text file")
    if name_or_path == "tinyshakespeare":
        return load_tinyshakespeare(val_fraction)
    if Path(name_or_path).is_dir():
        return PreparedDataset(name_or_path)
    return load_text_file(name_or_path, val_fraction)
