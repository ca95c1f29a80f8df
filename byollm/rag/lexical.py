"""Lexical retrieval: BM25 (Robertson et al.) with the `bm25s` library.

Texts are lower-cased, cut into words of 2+ letters or digits, English stopwords removed and each word
reduced to its Snowball (Porter 2) stem, so "scored", "scores" and "scoring" match. BM25 then scores a chunk by
the words of the query it contains, each weighted by its rarity (IDF) and saturated in its count (k1 = 1.5),
normalised by the chunk's length (b = 0.75).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from byollm.errors import require

STOPWORDS = "en"


def stemmer() -> Any:
    try:
        import Stemmer
    except ImportError:  # PyStemmer is in the rag extra; without it, exact words only
        return None
    return Stemmer.Stemmer("english")


class BM25:
    """A BM25 index over texts; rows are positions (0..n-1)."""

    def __init__(self, retriever: Any, stemmed: bool) -> None:
        self.retriever, self.stemmed = retriever, stemmed
        self._stem = stemmer() if stemmed else None
        self.n = int(retriever.scores["num_docs"]) if hasattr(retriever, "scores") else 0

    @classmethod
    def build(cls, texts: list[str], *, stem: bool = True) -> BM25:
        bm25s = require("bm25s", "rag")
        stem_with = stemmer() if stem else None
        retriever = bm25s.BM25()
        tokens = bm25s.tokenize(texts, stopwords=STOPWORDS, stemmer=stem_with, show_progress=False)
        retriever.index(tokens, show_progress=False)
        return cls(retriever, stem_with is not None)

    def tokenize(self, query: str) -> list[str]:
        bm25s = require("bm25s", "rag")
        return bm25s.tokenize([query], stopwords=STOPWORDS, stemmer=self._stem, return_ids=False,
                              show_progress=False)[0]

    def scores(self, query: str, allowed: np.ndarray | None = None) -> np.ndarray:
        """BM25 score of every position for `query` (0 where no query word occurs; -inf where not allowed)."""
        vocab = self.retriever.vocab_dict
        words = [w for w in self.tokenize(query) if w in vocab]
        out = np.zeros(self.n, dtype=np.float32)
        if words:
            out = np.asarray(self.retriever.get_scores(words), dtype=np.float32)
        if allowed is not None:
            mask = np.full(self.n, -np.inf, dtype=np.float32)
            mask[allowed] = 0.0
            out = out + mask
        return out

    def search(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of the best k positions with a score > 0, best first (ties: lower position)."""
        s = self.scores(query, allowed)
        order = np.lexsort((np.arange(len(s)), -s))[:k]
        order = order[s[order] > 0]
        return s[order], order

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, *, stemmed: bool = True) -> BM25:
        bm25s = require("bm25s", "rag")
        return cls(bm25s.BM25.load(str(folder), mmap=True, show_progress=False), stemmed)
