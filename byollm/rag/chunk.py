"""Chunks and the recursive, token-aware chunker.

A document is cut into chunks of at most `size` tokens of the *embedding model's* tokenizer (a chunk longer
than the model's window would be truncated silently when embedded), with up to `overlap` tokens repeated
between neighbours so a sentence cut at a boundary is whole in one of them.

The cut is recursive: a span that is too long is split at paragraph breaks, pieces still too long at line
breaks, then at sentence ends, then between words, and a single over-long "word" at characters. The pieces
are then packed greedily back into chunks. So a chunk ends at the coarsest boundary that lets it fit.

Everything works on character spans of the source text, never on copies, so every chunk maps back exactly:
`text[chunk.start:chunk.end] == chunk.text`, and every non-space character of the text is in some chunk.
The chunker is deterministic: the same text and settings give the same chunks, with the same ids.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TokenCounter = Callable[[str], int]

# Coarsest first: paragraphs, lines, sentence ends, words. A separator stays at the end of the piece before it.
SEPARATORS = (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n\s*"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


def content_hash(text: str) -> str:
    """The id of a piece of text: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Chunk:
    """A retrievable piece of a document, with everything needed to cite it and to decide who may see it.

    `start`/`end` are character offsets into the text the source was read as (a file's text, or the text
    extracted from HTML/PDF, or one SQuAD paragraph / JSONL record): `source_text[start:end] == text`.
    `groups` empty means public; otherwise only callers in one of the groups may see the chunk.
    """

    text: str
    source: str  # the file (or other origin) it came from: re-indexing the source replaces its chunks
    start: int
    end: int
    title: str = ""
    headings: tuple[str, ...] = ()  # the heading path (Markdown: "Guide > Section > Subsection")
    doc_id: str = ""  # content hash of the document (unit) it was cut from
    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def id(self) -> str:
        """Content hash of the text: equal texts are one chunk (deduplication)."""
        return content_hash(self.text)

    def header(self) -> str:
        """Title and heading path, as one line ("" when neither): put before the text when embedding."""
        parts = [self.title.replace("_", " ")] if self.title else []
        parts += [h for h in self.headings if h and (not parts or h != parts[-1])]
        return " > ".join(parts)

    def embed_text(self) -> str:
        """What the retrievers see: the header line (if any), then the text."""
        header = self.header()
        return f"{header}\n{self.text}" if header else self.text

    def visible_to(self, groups: set[str] | None) -> bool:
        """Whether a caller in `groups` may see this chunk (None: an unrestricted caller)."""
        return groups is None or not self.groups or bool(set(self.groups) & groups)


def token_counter(tokenizer: Any) -> TokenCounter:
    """A `str -> int` token counter from a callable counter, a Hugging Face tokenizer or anything with encode().

    Hugging Face tokenizers count without special tokens ([CLS]/[SEP] are added once per chunk, not per piece).
    """
    if hasattr(tokenizer, "tokenize"):  # transformers tokenizers
        return lambda text: len(tokenizer.tokenize(text))
    if hasattr(tokenizer, "encode"):
        def count(text: str) -> int:
            ids = tokenizer.encode(text)
            return len(ids.ids if hasattr(ids, "ids") else ids)  # tokenizers.Encoding or a list of ids
        return count
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"cannot count tokens with {type(tokenizer).__name__}: give a callable or a tokenizer")


def words(text: str) -> int:
    """The simplest token counter: whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True)
class ChunkerSettings:
    """Chunk size and overlap, in tokens of `tokenizer` (recorded in an index's manifest).

    The default 240 fits all-MiniLM-L6-v2's 256-token window with room for the header line and [CLS]/[SEP];
    on the SQuAD sample it beat 100 and 128 (docs/benchmarks.md).
    """

    size: int = 240
    overlap: int = 32
    tokenizer: str = "words"  # which counter the sizes are in: the embedding model's name, or "words"

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.overlap < self.size:
            raise ValueError(f"chunk size must be >= 1 and 0 <= overlap < size (got {self.size}, {self.overlap})")


def split_spans(text: str, count: TokenCounter, size: int, start: int = 0, end: int | None = None,
                level: int = 0) -> list[tuple[int, int]]:
    """Cut text[start:end] into contiguous spans of at most `size` tokens, at the coarsest separators possible.

    The spans tile [start, end) exactly (nothing lost, nothing repeated).
    """
    end = len(text) if end is None else end
    if end <= start:
        return []
    if count(text[start:end]) <= size:
        return [(start, end)]
    if level == len(SEPARATORS):  # one unbreakable word: the longest prefixes that fit, one after another
        spans = []
        while start < end:
            lo, hi = start + 1, end
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if count(text[start:mid]) <= size else (lo, mid - 1)
            spans.append((start, lo))
            start = lo
        return spans
    cuts = [m.end() for m in SEPARATORS[level].finditer(text, start, end) if start < m.end() < end]
    bounds = [start, *cuts, end]
    spans: list[tuple[int, int]] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        spans += split_spans(text, count, size, a, b, level + 1) if len(cuts) == 0 or count(text[a:b]) > size \
            else [(a, b)]
    return spans


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def chunk_spans(text: str, count: TokenCounter, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of `text`: pieces from `split_spans` packed greedily up to `size` tokens,
    each new chunk starting with the last pieces of the one before that fit in `overlap` tokens.

    Sizes are added piece by piece (exact for tokenizers that split at whitespace first, as WordPiece and
    most BPEs do); a packed chunk is then counted whole and shortened if the sum was optimistic.
    """
    pieces = split_spans(text, count, size)
    counts = [count(text[a:b]) for a, b in pieces]
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and (j == i or total + counts[j] <= size):
            total += counts[j]
            j += 1
        while j - i > 1 and count(text[pieces[i][0]:pieces[j - 1][1]]) > size:
            j -= 1
        a, b = _strip(text, pieces[i][0], pieces[j - 1][1])
        if a < b:
            out.append((a, b))
        if j == len(pieces):
            break
        back, kept = j, 0  # the overlap: whole pieces from the end of this chunk, and the next must make progress
        while back - 1 > i and kept + counts[back - 1] <= overlap and kept + counts[back - 1] + counts[j] <= size:
            back -= 1
            kept += counts[back]
        i = back
    return out


def chunk_text(text: str, source: str, count: TokenCounter, settings: ChunkerSettings, *, title: str = "",
               headings: tuple[str, ...] = (), offset: int = 0, tags: tuple[str, ...] = (),
               groups: tuple[str, ...] = (), meta: dict[str, Any] | None = None,
               doc_id: str | None = None) -> list[Chunk]:
    """The chunks of one document. `offset` is added to every span (a Markdown section inside its file)."""
    doc_id = doc_id or content_hash(text)
    return [Chunk(text[a:b], source, offset + a, offset + b, title, tuple(headings), doc_id, tuple(tags),
                  tuple(groups), dict(meta or {}))
            for a, b in chunk_spans(text, count, settings.size, settings.overlap)]
