"""Hybrid retrieval: reciprocal rank fusion of BM25 and dense rankings, filters, access groups, reranking.

Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009): each retriever ranks the chunks, and a
chunk's fused score is the sum over the rankings it appears in of 1 / (k + rank), rank 1-based. With k = 60,
first place is worth 1/61 ~ 0.0164 and tenth 1/70 ~ 0.0143: the constant damps the difference between the
top places, so a chunk ranked well by both retrievers beats one ranked first by only one of them. It needs
no score calibration: BM25 scores and cosines are on different scales and only their orders are used.

Access groups and filters are applied *before* ranking (`allowed_positions`): a chunk the caller may not see
is never scored, so it cannot appear in results, citations or scores, nor push a visible chunk down.
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

RRF_K = 60


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K, weights: Sequence[float] | None = None,
        ) -> list[tuple[int, float]]:
    """Fuse rankings (lists of ids, best first) into (id, score) pairs, best first.

    score(d) = sum_i weights[i] / (k + rank_i(d)); ties go to the id seen first (rankings in order).
    """
    weights = list(weights) if weights is not None else [1.0] * len(rankings)
    scores: dict[int, float] = {}
    for w, ranking in zip(weights, rankings, strict=True):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + w / (k + rank)
    order = {item: i for i, item in enumerate(scores)}  # first appearance, for deterministic ties
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def matches(source: str, tags: tuple[str, ...], filters: dict[str, Any]) -> bool:
    """Whether a chunk passes `filters`: {"source": pattern(s)} (fnmatch globs, any may match; a folder path
    matches what is under it), {"tags": tag(s)} (the chunk has at least one), {"exclude_tags": tag(s)}."""
    for key, value in filters.items():
        if key == "source":
            patterns = _listed(value)
            if not any(fnmatch.fnmatchcase(source, p) or source.startswith(p.rstrip("/") + "/") or source == p
                       for p in patterns):
                return False
        elif key == "tags":
            if not set(_listed(value)) & set(tags):
                return False
        elif key == "exclude_tags":
            if set(_listed(value)) & set(tags):
                return False
        else:
            raise ValueError(f"unknown filter '{key}': use source, tags or exclude_tags")
    return True


def allowed_positions(sources: list[str], tags: list[tuple[str, ...]], groups: list[tuple[str, ...]],
                      caller_groups: set[str] | None, filters: dict[str, Any] | None) -> np.ndarray | None:
    """The positions a caller in `caller_groups` may see that pass `filters` (None: every position).

    A chunk with no groups is public; otherwise the caller needs one of its groups. None means unrestricted.
    """
    restricted = caller_groups is not None and any(groups)
    if not restricted and not filters:
        return None
    keep = [i for i in range(len(sources))
            if (not restricted or not groups[i] or set(groups[i]) & caller_groups)  # type: ignore[operator]
            and (not filters or matches(sources[i], tags[i], filters))]
    return np.asarray(keep, dtype=np.int64)


class Reranker:
    """A cross-encoder that re-scores (query, chunk) pairs; `load` returns None when the model is unavailable."""

    def __init__(self, model: Any, name: str) -> None:
        self.model, self.name = model, name

    @classmethod
    def load(cls, name: str, device: str = "cpu") -> Reranker | None:
        try:
            from sentence_transformers import CrossEncoder

            return cls(CrossEncoder(name, device=device), name)
        except Exception as e:  # no such model offline, no network: go on without reranking
            print(f"[byollm] reranker '{name}' is not available ({type(e).__name__}); results are not reranked",
                  file=sys.stderr)
            return None

    def scores(self, query: str, texts: list[str]) -> list[float]:
        if not texts:
            return []
        return [float(s) for s in self.model.predict([(query, t) for t in texts])]
