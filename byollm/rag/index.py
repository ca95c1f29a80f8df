"""The RAG index: build or update it from files, open it, search it (BM25, dense or hybrid).

`index_paths` reads files into documents (`ingest`), cuts them into chunks (`chunk`), embeds what is new and
writes a new version of the index directory (`store`); `RagIndex.open` reads only the manifest, so it takes
milliseconds, and loads the FAISS file, the BM25 arrays and the chunk store on first use.

Updates are incremental: a source whose file is unchanged keeps its chunks and their embeddings; a changed
file's chunks are replaced; a source whose file no longer exists is dropped. Duplicate chunks (the same text,
visible to the same groups) are stored but indexed once.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from byollm.rag.chunk import Chunk, ChunkerSettings, chunk_text, content_hash
from byollm.rag.dense import (
    DEFAULT_MODEL,
    HNSW_THRESHOLD,
    Embedder,
    HNSWSettings,
    build_faiss,
    faiss_search,
    read_faiss,
    write_faiss,
)
from byollm.rag.hybrid import RRF_K, Reranker, allowed_positions, rrf
from byollm.rag.ingest import Document, iter_files, read_documents
from byollm.rag.lexical import BM25, STOPWORDS, stemmer
from byollm.rag.store import (
    ChunkStore,
    EmbeddingMismatchError,
    RagIndexError,
    current_version,
    publish,
    read_manifest,
    write_chunks,
    write_manifest,
)

__all__ = ["Hit", "RagIndex", "IndexReport", "index_paths", "RagIndexError", "EmbeddingMismatchError"]
RETRIEVERS = ("bm25", "dense", "hybrid")
CANDIDATES = 50  # each retriever's list that hybrid fuses (at least 2k)


@dataclass
class Hit:
    chunk: Chunk
    score: float  # the retriever's own: BM25 score, cosine similarity, RRF score (or the reranker's)
    rank: int  # 1-based
    scores: dict[str, float] = field(default_factory=dict)  # every score known for this chunk: bm25, dense, rrf


@dataclass
class IndexReport:
    path: Path | None
    added: list[str] = field(default_factory=list)  # sources (re)chunked
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    chunks: int = 0  # indexed (unique) chunks
    duplicates: int = 0
    embedded: int = 0  # chunks embedded by this update (the others reused their vectors)

    def summary(self) -> str:
        return (f"{self.chunks} chunks ({self.duplicates} duplicates skipped) from {len(self.added)} new or "
                f"changed, {len(self.unchanged)} unchanged and {len(self.removed)} removed sources; "
                f"{self.embedded} embedded")


class RagIndex:
    """Chunks with their BM25 and FAISS indexes; on disk (`open`) or in memory (`from_documents`)."""

    def __init__(self, manifest: dict[str, Any], *, version: Path | None = None, chunks: list[Chunk] | None = None,
                 embeddings: np.ndarray | None = None, dense: Any = None, bm25: BM25 | None = None,
                 embedder: Embedder | None = None) -> None:
        self.manifest, self.version = manifest, version
        self._chunks, self._embeddings, self._dense, self._bm25, self._embedder = (
            chunks, embeddings, dense, bm25, embedder)
        self._store = ChunkStore(version / "chunks.sqlite") if version else None
        self._columns: tuple[list, list, list] | None = None
        self._rerankers: dict[str, Reranker | None] = {}

    # --- opening and building ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> RagIndex:
        path = Path(path)
        version = current_version(path)
        if version is None:
            raise RagIndexError(f"no RAG index at {path}: build one with byollm rag index PATH... --index {path}")
        return cls(read_manifest(version), version=version)

    @classmethod
    def from_documents(cls, docs: Iterable[Document], *, model: str = DEFAULT_MODEL,
                       settings: ChunkerSettings | None = None, embedder: Embedder | None = None,
                       progress: bool | None = None) -> RagIndex:
        """An index in memory (nothing written): `rag eval` without --index, tests."""
        embedder = embedder or Embedder(model)
        settings = settings or ChunkerSettings(tokenizer=embedder.name)
        rows = _unique(_chunk_documents(list(docs), embedder, settings))
        chunks = [c for c, pos, _ in rows if pos is not None]
        vecs = embedder.embed([c.embed_text() for c in chunks], progress=progress)
        return cls(_manifest(embedder, settings, len(chunks), len(rows), {}), chunks=chunks, embeddings=vecs,
                   dense=build_faiss(vecs), bm25=BM25.build([c.embed_text() for c in chunks]), embedder=embedder)

    def __len__(self) -> int:
        return int(self.manifest["chunks"])

    @property
    def model(self) -> str:
        return str(self.manifest["embedding"]["model"])

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(self.model)
        return self._embedder

    @property
    def dense(self) -> Any:
        if self._dense is None:
            self._dense = read_faiss(self.version / "dense.faiss")  # type: ignore[operator]
        return self._dense

    @property
    def bm25(self) -> BM25:
        if self._bm25 is None:
            self._bm25 = BM25.load(self.version / "bm25",  # type: ignore[operator]
                                   stemmed=self.manifest["lexical"]["stemmer"] is not None)
        return self._bm25

    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.load(self.version / "embeddings.npy", mmap_mode="r")  # type: ignore[operator]
        return self._embeddings

    def chunks(self, positions: list[int]) -> list[Chunk]:
        if self._chunks is not None:
            return [self._chunks[p] for p in positions]
        return self._store.get(positions)  # type: ignore[union-attr]

    def doc_ids(self) -> set[str]:
        """Content hashes of the documents (SQuAD paragraphs, Markdown sections, ...) in the index."""
        if self._chunks is not None:
            return {c.doc_id for c in self._chunks}
        return self._store.doc_ids()  # type: ignore[union-attr]

    def all_chunks(self) -> list[Chunk]:
        return self.chunks(list(range(len(self))))

    def _allowed(self, groups: set[str] | None, filters: dict | None) -> np.ndarray | None:
        if groups is None and not filters:
            return None
        if self._columns is None:
            if self._chunks is not None:
                self._columns = ([c.source for c in self._chunks], [c.tags for c in self._chunks],
                                 [c.groups for c in self._chunks])
            else:
                self._columns = self._store.columns()  # type: ignore[union-attr]
        return allowed_positions(*self._columns, set(groups) if groups is not None else None, filters)

    # --- search ------------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, retriever: str = "hybrid", *, groups: set[str] | None = None,
               filters: dict | None = None, rerank: str | None = None, rrf_k: int = RRF_K) -> list[Hit]:
        """The k best chunks for `query` that the caller may see, best first.

        retriever: "bm25", "dense" or "hybrid" (RRF of both). groups: the caller's access groups (None: an
        unrestricted caller; chunks without groups are public). filters: see `hybrid.matches`. rerank: a
        cross-encoder name or path that re-orders the candidates (skipped with a note when unavailable).
        """
        return self.search_batch([query], k, retriever, groups=groups, filters=filters, rerank=rerank,
                                 rrf_k=rrf_k)[0]

    def search_batch(self, queries: list[str], k: int = 5, retriever: str = "hybrid", *,
                     groups: set[str] | None = None, filters: dict | None = None, rerank: str | None = None,
                     rrf_k: int = RRF_K, query_vectors: np.ndarray | None = None) -> list[list[Hit]]:
        """`search` for many queries at once (embedded in one batch, or given as `query_vectors`)."""
        if retriever not in RETRIEVERS:
            raise ValueError(f"unknown retriever '{retriever}': use one of {', '.join(RETRIEVERS)}")
        if len(self) == 0 or k < 1:
            return [[] for _ in queries]
        allowed = self._allowed(groups, filters)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]
        depth = max(CANDIDATES, 2 * k) if (retriever == "hybrid" or rerank) else k
        dense_lists: list[tuple[np.ndarray, np.ndarray]] = []
        qvecs = None
        if retriever != "bm25":
            qvecs = self.embedder.embed(queries, progress=False) if query_vectors is None else query_vectors
            scores, positions = faiss_search(self.dense, qvecs, depth, allowed)
            dense_lists = [(s[p >= 0], p[p >= 0]) for s, p in zip(scores, positions, strict=True)]
        out = []
        for qi, query in enumerate(queries):
            bm_all = self.bm25.scores(query, allowed) if retriever != "dense" else None
            if retriever == "dense":
                ranked = [(int(p), float(s)) for s, p in zip(*dense_lists[qi], strict=True)]
            elif retriever == "bm25":
                ranked = _top(bm_all, depth)  # type: ignore[arg-type]
            else:
                lexical = [p for p, _ in _top(bm_all, depth)]  # type: ignore[arg-type]
                ranked = rrf([lexical, [int(p) for p in dense_lists[qi][1]]], k=rrf_k)[:depth]
            hits = self._hits(ranked, retriever, bm_all, qvecs[qi] if qvecs is not None else None)
            if rerank:
                hits = self._rerank(rerank, query, hits)
            out.append([Hit(h.chunk, h.score, r, h.scores) for r, h in enumerate(hits[:k], 1)])
        return out

    def _hits(self, ranked: list[tuple[int, float]], retriever: str, bm_all: np.ndarray | None,
              qvec: np.ndarray | None) -> list[Hit]:
        positions = [p for p, _ in ranked]
        chunks = self.chunks(positions)
        hits = []
        cos = np.asarray(self.embeddings[positions] @ qvec) if qvec is not None and positions else None
        for i, ((p, score), chunk) in enumerate(zip(ranked, chunks, strict=True)):
            scores = {retriever if retriever != "hybrid" else "rrf": score}
            if bm_all is not None:
                scores["bm25"] = float(bm_all[p])
            if cos is not None:
                scores["dense"] = float(cos[i])
            hits.append(Hit(chunk, float(score), i + 1, scores))
        return hits

    def _rerank(self, name: str, query: str, hits: list[Hit]) -> list[Hit]:
        if name not in self._rerankers:
            self._rerankers[name] = Reranker.load(name)
        model = self._rerankers[name]
        if model is None:
            return hits
        for h, s in zip(hits, model.scores(query, [h.chunk.embed_text() for h in hits]), strict=True):
            h.scores["rerank"], h.score = s, s
        return sorted(hits, key=lambda h: -h.score)


def _top(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [(int(p), float(scores[p])) for p in order if scores[p] > 0]


# --- building and updating ---------------------------------------------------------------------------------


def _chunk_documents(docs: list[Document], embedder: Embedder, settings: ChunkerSettings) -> list[Chunk]:
    count = embedder.count_tokens
    out: list[Chunk] = []
    for d in docs:
        out += chunk_text(d.text, d.source, count, settings, title=d.title, headings=d.headings, offset=d.offset,
                          tags=d.tags, groups=d.groups, meta=d.meta)
    return out


def _unique(chunks: list[Chunk]) -> list[tuple[Chunk, int | None, str]]:
    """(chunk, position, embedding key): the first chunk of each (text, groups) gets the next position."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    rows = []
    for c in chunks:
        key = (c.id, tuple(sorted(c.groups)))
        rows.append((c, None if key in seen else len(seen), content_hash(c.embed_text())))
        seen.add(key)
    return rows


def _manifest(embedder: Embedder, settings: ChunkerSettings, n: int, rows: int, sources: dict) -> dict[str, Any]:
    return {"embedding": {"model": embedder.name, "dim": embedder.dim, "normalized": True,
                          "max_tokens": embedder.max_tokens},
            "chunker": {"size": settings.size, "overlap": settings.overlap, "tokenizer": settings.tokenizer},
            "dense": {"kind": "hnsw" if n >= HNSW_THRESHOLD else "flat", "hnsw_threshold": HNSW_THRESHOLD,
                      **({"M": HNSWSettings().M, "ef_construction": HNSWSettings().ef_construction,
                          "ef_search": HNSWSettings().ef_search} if n >= HNSW_THRESHOLD else {})},
            "lexical": {"library": "bm25s", "stopwords": STOPWORDS,
                        "stemmer": "english" if stemmer() is not None else None},
            "chunks": n, "rows": rows, "sources": sources,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _file_hash(path: Path, extra: dict[str, Any]) -> str:
    h = hashlib.sha256(path.read_bytes())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def _is_file_source(source: str) -> bool:
    return os.path.isabs(source)


def index_paths(paths: Iterable[str | Path], index_dir: str | Path, *, model: str | None = None,
                chunk_size: int | None = None, chunk_overlap: int | None = None, tags: Iterable[str] = (),
                groups: Iterable[str] = (), text_field: str | None = None, rebuild: bool = False,
                progress: bool | None = None) -> IndexReport:
    """Create or update the index at `index_dir` with the files under `paths`; returns what changed.

    The embedding model and chunk settings default to the index's own (else all-MiniLM-L6-v2, 240 / 32
    tokens); asking for another model than the index was built with is an EmbeddingMismatchError (embeddings
    of two models are not comparable); other chunk settings need --rebuild too. `tags` and `groups` apply to
    every chunk of these files (JSONL records may carry their own as well).
    """
    index_dir = Path(index_dir)
    version = None if rebuild else current_version(index_dir)
    old = RagIndex(read_manifest(version), version=version) if version else None
    defaults = ChunkerSettings()
    if old is not None:
        built = old.manifest["embedding"]["model"]
        if model is not None and model != built:
            raise EmbeddingMismatchError(
                f"{index_dir} holds embeddings of '{built}' (dim {old.manifest['embedding']['dim']}), not '{model}': "
                f"embeddings of two models cannot be mixed; leave --model out, or rebuild with --rebuild")
        model = built
        size, overlap = old.manifest["chunker"]["size"], old.manifest["chunker"]["overlap"]
        if (chunk_size or size, chunk_overlap if chunk_overlap is not None else overlap) != (size, overlap):
            raise RagIndexError(f"{index_dir} was chunked with size {size} / overlap {overlap} tokens; give the same "
                                "or rebuild with --rebuild")
        chunk_size, chunk_overlap = size, overlap
    embedder = Embedder(model or DEFAULT_MODEL)
    if old is not None and embedder.dim != old.manifest["embedding"]["dim"]:
        raise EmbeddingMismatchError(f"{index_dir} has {old.manifest['embedding']['dim']}-dim embeddings but "
                                     f"'{embedder.name}' gives {embedder.dim}; rebuild with --rebuild")
    settings = ChunkerSettings(chunk_size or defaults.size,
                               chunk_overlap if chunk_overlap is not None else defaults.overlap, embedder.name)
    tags, groups = tuple(tags), tuple(groups)
    report = IndexReport(index_dir)

    old_rows: dict[str, list[Chunk]] = {}
    old_vectors: dict[str, int] = {}  # embedding key -> old position
    if old is not None:
        for chunk, pos, ekey in old._store.rows():  # type: ignore[union-attr]
            old_rows.setdefault(chunk.source, []).append(chunk)
            if pos is not None:
                old_vectors[ekey] = pos
    sources = dict(old.manifest["sources"]) if old is not None else {}
    new_rows: dict[str, list[Chunk]] = {}
    for f in iter_files(paths):
        source = str(f.resolve())
        digest = _file_hash(f, {"tags": tags, "groups": groups, "text_field": text_field})
        if source in old_rows and sources.get(source, {}).get("sha256") == digest:
            report.unchanged.append(source)
            new_rows[source] = old_rows[source]
            continue
        docs = read_documents(f, source=source, tags=tags, groups=groups, text_field=text_field)
        new_rows[source] = _chunk_documents(docs, embedder, settings)
        sources[source] = {"sha256": digest, "chunks": len(new_rows[source])}
        report.added.append(source)
    for source, chunks in old_rows.items():  # kept from before unless the file is gone
        if source in new_rows:
            continue
        if _is_file_source(source) and not Path(source).exists():
            report.removed.append(source)
            sources.pop(source, None)
        else:
            new_rows[source] = chunks
    rows = _unique([c for s in sorted(new_rows) for c in new_rows[s]])
    unique = [(c, ekey) for c, pos, ekey in rows if pos is not None]
    report.chunks, report.duplicates = len(unique), len(rows) - len(unique)
    vecs = np.zeros((len(unique), embedder.dim), dtype=np.float32)
    todo = [i for i, (_, ekey) in enumerate(unique) if ekey not in old_vectors]
    reuse = [(i, old_vectors[ekey]) for i, (_, ekey) in enumerate(unique) if ekey in old_vectors]
    if reuse:
        vecs[[i for i, _ in reuse]] = old.embeddings[[p for _, p in reuse]]  # type: ignore[union-attr]
    if todo:
        print(f"[byollm] embedding {len(todo)} chunks with {embedder.name}", file=sys.stderr)
        vecs[todo] = embedder.embed([unique[i][0].embed_text() for i in todo], progress=progress)
    report.embedded = len(todo)
    manifest = _manifest(embedder, settings, len(unique), len(rows), sources)

    def write(folder: Path) -> None:
        write_chunks(folder / "chunks.sqlite", rows)
        np.save(folder / "embeddings.npy", vecs)
        write_faiss(build_faiss(vecs), folder / "dense.faiss")
        (folder / "bm25").mkdir()
        if unique:
            BM25.build([c.embed_text() for c, _ in unique]).save(folder / "bm25")
        write_manifest(folder, manifest)

    publish(index_dir, write)
    return report
