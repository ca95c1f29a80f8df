"""Small stand-ins for the RAG tests: chunks, an index with RagIndex's search() shape, a scripted generator.

The index scores a chunk by the share of the query's words it contains (a hand-checkable score in [0, 1]) and
applies access groups inside search, as byollm.rag.index.RagIndex does: `groups=None` is an unrestricted caller,
a chunk without groups is public."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeChunk:
    id: str
    text: str
    source: str = "doc.md"
    title: str = "Doc"
    heading_path: list[str] = field(default_factory=list)
    start: int = 0
    end: int = 0
    tags: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)


@dataclass
class FakeHit:
    chunk: FakeChunk
    score: float
    rank: int


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class FakeIndex:
    def __init__(self, chunks: list[FakeChunk], *, leaky: bool = False) -> None:
        self.chunks, self.leaky = chunks, leaky
        self.calls: list[dict[str, Any]] = []

    def search(self, query: str, k: int = 5, retriever: str = "hybrid", groups: set[str] | None = None,
               filters: dict[str, Any] | None = None) -> list[FakeHit]:
        self.calls.append({"query": query, "k": k, "retriever": retriever, "groups": groups, "filters": filters})
        q = words(query)
        visible = [c for c in self.chunks
                   if self.leaky or groups is None or not c.groups or set(c.groups) & set(groups)]
        scored = sorted(((len(q & words(c.text)) / max(1, len(q)), c) for c in visible), key=lambda t: -t[0])
        return [FakeHit(c, s, r) for r, (s, c) in enumerate(scored[:k], start=1) if s > 0]


class ScriptedGenerator:
    """Replies with `reply` in pieces of a few characters; records the messages it was given."""

    def __init__(self, reply: str = "Paris [1].", specials: tuple[str, ...] = ("<|im_start|>", "<|im_end|>"),
                 context: int | None = None, tokens_per_char: float = 0.25) -> None:
        self.reply, self.specials, self._context, self.ratio = reply, specials, context, tokens_per_char
        self.seen: list[list[dict[str, str]]] = []
        self.last_finish_reason: str | None = None

    @property
    def context(self) -> int | None:
        return self._context

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return int(sum(len(m["content"]) for m in messages) * self.ratio)

    def stream(self, messages: list[dict[str, str]], *, max_tokens: int, temperature: float,
               seed: int | None) -> Iterator[str]:
        self.seen.append(messages)
        for i in range(0, len(self.reply), 4):
            yield self.reply[i:i + 4]
        self.last_finish_reason = "stop"


CHUNKS = [
    FakeChunk("c1", "Paris is the capital of France and its largest city.", "geo/france.md", "France", ["Cities"]),
    FakeChunk("c2", "Berlin is the capital of Germany.", "geo/germany.md", "Germany"),
    FakeChunk("c3", "The salary of the chief executive of France Corp is 3 million euros.", "hr/pay.md", "Pay",
              groups=["hr"]),
    FakeChunk("c4", "Staff handbook: the capital budget of France Corp is set by the board.", "staff/budget.md",
              "Budget", groups=["staff"]),
]
