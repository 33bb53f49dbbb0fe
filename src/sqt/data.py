"""Training text, offline: the bundled Tiny Shakespeare (gzip inside the package, sha256-checked on
load), any user text file, the character tokenizer, and the train/val token tensors."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

import torch

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILE = "tinyshakespeare.txt.gz"
"""karpathy/char-rnn's input.txt, the standard character-level corpus (1,115,394 bytes, 65
distinct characters); the checksum is of the decompressed text, so results stay comparable with
published numbers on it."""


class CharTokenizer:
    """One token per distinct character, ids in sorted character order (as nanoGPT's
    shakespeare_char, so Tiny Shakespeare gets the usual 65-symbol vocabulary)."""

    def __init__(self, chars: Iterable[str]):
        chars = "".join(chars)
        if not chars:
            raise ValueError("CharTokenizer chars='': expected at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars: expected distinct characters, got repeats")
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError:
            bad = sorted(set(text) - set(self._stoi))
            raise ValueError(f"text contains {len(bad)} character(s) not in the tokenizer's "
                             f"vocabulary of {self.vocab_size}: {''.join(bad)[:40]!r}") from None

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        out = []
        for i in ids:
            if not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise ValueError(f"token id {i!r}: expected an integer in 0..{self.vocab_size - 1}")
            out.append(self.chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        ok = isinstance(d, dict) and d.get("type") == "char" and isinstance(d.get("chars"), str)
        if not ok:
            got = d.get("type") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"tokenizer type={got!r}: expected {{'type': 'char', 'chars': str}}")
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


@dataclass
class TextDataset:
    """A corpus as token ids: the first (1 - val_fraction) of the text trains, the rest validates
    (a contiguous tail, not a random sample, so no validation text leaks into training)."""

    name: str
    tokenizer: CharTokenizer
    train: torch.Tensor   # int64 (N_train,)
    val: torch.Tensor     # int64 (N_val,)
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.tokenizer.vocab_size,
                "train_tokens": int(self.train.numel()), "val_tokens": int(self.val.numel())}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dataset_from_text(text: str, name: str, val_fraction: float = 0.1,
                      tokenizer: Optional[CharTokenizer] = None) -> TextDataset:
    if not (isinstance(val_fraction, float) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction={val_fraction!r}: expected a float in (0, 1)")
    tok = tokenizer or CharTokenizer.from_text(text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
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
    """Any UTF-8 text file (plain or .gz), character vocabulary built from its own text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist: expected a UTF-8 text "
                                "file (plain or .gz)")
    raw = path.read_bytes()
    try:
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"text file {str(path)!r} cannot be read as UTF-8 text "
                         f"({type(e).__name__}: {e})") from None
    return dataset_from_text(text, path.name, val_fraction)


def load_dataset(name_or_path: str = "tinyshakespeare", val_fraction: float = 0.1) -> TextDataset:
    """`tinyshakespeare` (bundled) or a path to a text file."""
    if name_or_path == "tinyshakespeare":
        return load_tinyshakespeare(val_fraction)
    return load_text_file(name_or_path, val_fraction)
