"""A corpus file read as a stream of documents: UTF-8 text, plain or gzip, `<|endoftext|>` lines
between documents, long documents cut only where tokenization cannot tell, the sha256 of its text."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import re
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from .tokenizer import EOT

MARKER_LINE = re.compile(r"^" + re.escape(EOT) + r"\r?$\n?", re.M)
"""A line holding only `<|endoftext|>` (with its line break): the end of a document."""

SAFE_CUT = re.compile(r"(?<=[!-~])[ \n](?=[!-~])")
"""Where a text may be cut in two without changing its tokens: before a single space or newline
between two printable ASCII characters. GPT-2's pre-tokenizer regex never lets a piece run across
such a point (a letter/number/punctuation run stops at the whitespace; a single whitespace before a
non-space is a piece of its own or the start of the next), so encoding the two halves gives the
ids of encoding the whole. Characters trivially agree."""

READ_BYTES = 1 << 22


class Chunk(NamedTuple):
    text: str
    doc: int          # index of the document (empty documents are skipped, not counted)
    ends_doc: bool    # an `<|endoftext|>` line follows: the document ends here


def safe_cut(text: str, start: int, limit: int) -> Optional[int]:
    """The largest safe cut point in text[start:limit] (looking back a little first: the common
    case), else the first one after `limit`; None when text[start:] has none."""
    for back in (1 << 12, 1 << 16, limit - start):
        last = None
        for last in SAFE_CUT.finditer(text, max(start + 1, limit - back), limit):
            pass
        if last is not None:
            return last.start()
    m = SAFE_CUT.search(text, limit)
    return m.start() if m else None


class CorpusReader:
    """Iterate `chunks()` (any number of times): the corpus's documents in order, long ones cut
    into pieces of about `chunk_chars` characters at safe points, marker lines left out. After a
    full pass, `sha256` (of the text's UTF-8 bytes, decompressed), `n_bytes`, `n_documents` and
    `has_markers` describe what was read."""

    def __init__(self, path, *, chunk_chars: int = 1 << 18):
        self.path = Path(path)
        self.chunk_chars = chunk_chars
        self.sha256: Optional[str] = None
        self.n_bytes = self.n_documents = 0
        self.has_markers = False

    def _blocks(self) -> Iterator[bytes]:
        opener = gzip.open if self.path.suffix == ".gz" else open
        try:
            with opener(self.path, "rb") as f:
                while block := f.read(READ_BYTES):
                    yield block
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"corpus {str(self.path)!r} cannot be read "
                             f"({type(e).__name__}: {e}); expected UTF-8 text, plain or .gz") from None

    def _lines(self) -> Iterator[str]:
        """Decoded text in pieces that end at a line break (the last piece may not)."""
        digest, n_bytes = hashlib.sha256(), 0
        decoder = codecs.getincrementaldecoder("utf-8")()
        carry = ""
        try:
            for block in self._blocks():
                digest.update(block)
                n_bytes += len(block)
                text = carry + decoder.decode(block)
                cut = text.rfind("\n") + 1
                carry = text[cut:]
                if cut:
                    yield text[:cut]
            tail = carry + decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus {str(self.path)!r} is not UTF-8 text (byte {e.start} of a "
                             f"block near byte {n_bytes}: {e.reason})") from None
        if tail:
            yield tail
        self.sha256, self.n_bytes = digest.hexdigest(), n_bytes

    def _pieces(self, text: str) -> list[str]:
        """`text` cut at safe points into pieces of about chunk_chars (the last one up to twice
        that; longer only where the text has nowhere safe to cut)."""
        pieces, start = [], 0
        while len(text) - start >= 2 * self.chunk_chars:
            cut = safe_cut(text, start, start + self.chunk_chars)
            if cut is None:
                break
            pieces.append(text[start:cut])
            start = cut
        return pieces + [text[start:]]

    def chunks(self) -> Iterator[Chunk]:
        doc, pending, markers = 0, "", False
        for text in self._lines():
            pos = 0
            for m in MARKER_LINE.finditer(text):
                markers = True
                pending += text[pos:m.start()]
                pos = m.end()
                if pending:
                    *head, last = self._pieces(pending)
                    yield from (Chunk(p, doc, False) for p in head)
                    yield Chunk(last, doc, True)
                    doc, pending = doc + 1, ""
            pending += text[pos:]
            if len(pending) >= 2 * self.chunk_chars:
                *head, pending = self._pieces(pending)
                yield from (Chunk(p, doc, False) for p in head)
        if pending:
            yield from (Chunk(p, doc, False) for p in self._pieces(pending))
            doc += 1
        self.n_documents, self.has_markers = doc, markers


def corpus_sha256(path) -> str:
    """The sha256 of a corpus's text (decompressed when .gz), in one streaming pass."""
    reader = CorpusReader(path)
    for _ in reader._lines():
        pass
    return reader.sha256
