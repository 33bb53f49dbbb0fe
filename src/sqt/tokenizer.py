"""Tokenizers: one token per character, or byte-level BPE trained locally with the Hugging Face
`tokenizers` library. Both are saved as a Hugging Face `tokenizer.json`, so `transformers` loads
them too, and both treat `<|endoftext|>` (the document separator) as one special token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .utils import atomic_write_bytes

EOT = "<|endoftext|>"
"""The end-of-text token: it separates documents in a corpus and in training windows."""

MIN_BPE_VOCAB = 256 + 1
"""A byte-level BPE needs one symbol per byte value and the end-of-text token."""

TOKENIZER_FILE = "tokenizer.json"
_N_CODEPOINTS = 0x110000


def _ids_list(ids) -> list:
    """Token ids from a list, a numpy array or a torch tensor, as Python ints."""
    return ids.reshape(-1).tolist() if hasattr(ids, "tolist") else list(ids)


class _TokenizerJSON:
    """What both tokenizers share: the tokenizer.json form, its hash, and saving it."""

    def to_hf(self) -> Tokenizer:
        raise NotImplementedError

    def to_json(self) -> str:
        """The Hugging Face `tokenizer.json` text (deterministic: the same tokenizer gives the
        same text, which is what `sha256` hashes)."""
        return self.to_hf().to_str()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path) -> Path:
        """Write `tokenizer.json` to `path` (a file path, or an existing directory to write
        `tokenizer.json` into); returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        atomic_write_bytes(path, self.to_json().encode("utf-8"))
        return path

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.to_json() == self.to_json()

    def __hash__(self) -> int:
        return hash(self.sha256)


class CharTokenizer(_TokenizerJSON):
    """One token per distinct character, ids in sorted character order (as nanoGPT's
    shakespeare_char, so Tiny Shakespeare gets the usual 65-symbol vocabulary).

    With `eot=True` the vocabulary gets one more id, `eot_id = len(chars)`, for `<|endoftext|>`:
    `encode` turns every occurrence of that string into this one id (never into its 13
    characters) and `decode` gives the string back, so the round trip stays exact. A corpus
    with `<|endoftext|>` document markers gets it (`from_text` decides that); one without keeps
    exactly its characters (Tiny Shakespeare stays at 65)."""

    def __init__(self, chars: Iterable[str], *, eot: bool = False):
        chars = "".join(chars)
        if not chars:
            raise ValueError("CharTokenizer chars='': expected at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars: expected distinct characters, got repeats")
        self.chars = chars
        self.eot_id: Optional[int] = len(chars) if eot else None
        self._stoi = {c: i for i, c in enumerate(chars)}
        self._table: Optional[np.ndarray] = None   # code point -> id (-1: unknown), built lazily

    @classmethod
    def from_text(cls, text: str, *, eot: Optional[bool] = None) -> "CharTokenizer":
        """The characters of `text`, sorted. `eot=None` adds the end-of-text id when the text
        contains `<|endoftext|>` (whose characters then count only where they occur elsewhere)."""
        eot = EOT in text if eot is None else eot
        return cls(sorted(set(text.replace(EOT, "") if eot else text)), eot=eot)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + (self.eot_id is not None)

    def _encode_piece(self, text: str) -> np.ndarray:
        if self._table is None:
            self._table = np.full(_N_CODEPOINTS, -1, dtype=np.int64)
            self._table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        ids = self._table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
        if ids.size and ids.min() < 0:
            bad = sorted(set(text) - set(self._stoi))
            raise ValueError(f"text contains {len(bad)} character(s) not in the tokenizer's "
                             f"vocabulary of {self.vocab_size}: {''.join(bad)[:40]!r}")
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode`, as an int64 numpy array (vectorised: fast on megabytes of text)."""
        if self.eot_id is None:
            return self._encode_piece(text)
        pieces = []
        for i, piece in enumerate(text.split(EOT)):
            if i:
                pieces.append(np.array([self.eot_id], dtype=np.int64))
            pieces.append(self._encode_piece(piece))
        return np.concatenate(pieces)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once, one int64 numpy array each."""
        return [self.encode_array(t) for t in texts]

    def decode(self, ids) -> str:
        out = []
        for i in _ids_list(ids):
            if not (isinstance(i, int) and 0 <= i < self.vocab_size):
                raise ValueError(f"token id {i!r}: expected an integer in 0..{self.vocab_size - 1}")
            out.append(EOT if i == self.eot_id else self.chars[i])
        return "".join(out)

    def to_dict(self) -> dict:
        """The form older checkpoints keep in config.json."""
        d = {"type": "char", "chars": self.chars}
        return {**d, "eot": True} if self.eot_id is not None else d

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        ok = isinstance(d, dict) and d.get("type") == "char" and isinstance(d.get("chars"), str)
        if not ok:
            got = d.get("type") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"tokenizer type={got!r}: expected {{'type': 'char', 'chars': str}}")
        return cls(d["chars"], eot=bool(d.get("eot", False)))

    def to_hf(self) -> Tokenizer:
        """A BPE model whose vocabulary is the characters, with no merges, no pre-tokenizer and a
        Fuse decoder: `transformers` loads it and encodes/decodes exactly as this class does."""
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(self.chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
        if self.eot_id is not None:
            tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return tok

    @classmethod
    def from_hf_json(cls, spec: dict) -> Optional["CharTokenizer"]:
        """The CharTokenizer that `spec` (a parsed tokenizer.json) is the saved form of, or None
        when it is not one."""
        model = spec.get("model") or {}
        vocab = model.get("vocab")
        if not (model.get("type") == "BPE" and not model.get("merges") and isinstance(vocab, dict)
                and spec.get("pre_tokenizer") is None and spec.get("normalizer") is None
                and (spec.get("decoder") or {}).get("type") == "Fuse"):
            return None
        chars = sorted(vocab, key=vocab.get)
        if sorted(vocab.values()) != list(range(len(vocab))) or any(len(c) != 1 for c in chars):
            return None
        added = spec.get("added_tokens") or []
        if [(a.get("content"), a.get("id")) for a in added] not in ([], [(EOT, len(chars))]):
            return None
        return cls(chars, eot=bool(added))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class BPETokenizer(_TokenizerJSON):
    """Byte-level BPE (GPT-2's pre-tokenizer regex, no normalizer), a thin wrapper over a
    `tokenizers.Tokenizer`. Every UTF-8 text round-trips exactly; `<|endoftext|>` anywhere in a
    text is the single token `eot_id`."""

    def __init__(self, backend: Tokenizer):
        self.backend = backend
        self.eot_id: Optional[int] = backend.token_to_id(EOT)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Many texts at once, tokenized in parallel by the library's threads (without the
        offsets bookkeeping of `encode`); one int64 numpy array each."""
        out = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.int64) for e in out]

    def decode(self, ids) -> str:
        ids = _ids_list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise ValueError(f"token id {bad[0]!r}: expected an integer in 0..{self.vocab_size - 1}")
        return self.backend.decode(ids, skip_special_tokens=False)

    def to_hf(self) -> Tokenizer:
        return self.backend

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              show_progress: bool = False) -> BPETokenizer:
    """Train a byte-level BPE on `texts` (any iterable of strings, streamed; split long documents
    where `corpus.safe_cuts` allows and the merges come out as if each were whole). The
    vocabulary is `<|endoftext|>` (id 0), the 256 byte symbols, then merges until `vocab_size`
    (fewer when the text runs out of pairs seen `min_frequency` times)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) \
            or not MIN_BPE_VOCAB <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size={vocab_size!r}: expected an integer from {MIN_BPE_VOCAB} "
                         f"(256 bytes + {EOT}) to 2**32")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency!r}: expected an integer >= 1")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[AddedToken(EOT, special=True, normalized=False)],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def decode_stream(tokenizer, ids: Iterable[int]) -> Iterator[str]:
    """Text as the ids arrive (for printing while generating): a byte-level BPE token can hold
    part of a character, so ids are held back until what they decode to is whole."""
    pending: list[int] = []
    for i in ids:
        pending.append(int(i))
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):
            pending = []
            yield text
    if pending:
        yield tokenizer.decode(pending)


def tokenizer_from_json(text: str, where: str = "tokenizer.json"):
    """A tokenizer from the text of a tokenizer.json: a CharTokenizer when it is one's saved
    form, else a BPETokenizer around whatever Hugging Face tokenizer it describes."""
    try:
        spec = json.loads(text)
        backend = Tokenizer.from_str(text)
    except Exception as e:  # the library raises its own exception types for malformed files
        raise ValueError(f"{where!r} is not a valid Hugging Face tokenizer.json "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    return CharTokenizer.from_hf_json(spec) or BPETokenizer(backend)


def load_tokenizer(path_or_spec):
    """A tokenizer from a `tokenizer.json` file, a directory holding one (a checkpoint or a
    prepared dataset), or the `{"type": "char", "chars": ...}` dict older checkpoints keep in
    config.json."""
    if isinstance(path_or_spec, dict):
        return CharTokenizer.from_dict(path_or_spec)
    path = Path(path_or_spec)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} does not exist: expected a "
                                f"{TOKENIZER_FILE} file or a directory holding one")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(file)!r} is not UTF-8 JSON ({e})") from None
    return tokenizer_from_json(text, str(file))
