"""The index directory on disk: versions, the manifest and the SQLite chunk store.

```
INDEX/
  CURRENT              the name of the live version ("v-000003"), replaced atomically
  v-000003/
    manifest.json      embedding model + dimension, chunker settings, FAISS kind, the sources and their hashes
    chunks.sqlite      every chunk of every source (text, source, offsets, title, headings, tags, groups, meta);
                       `position` is its row in the vectors (NULL for a duplicate of another chunk)
    embeddings.npy     (positions, dim) float32, normalised: reused by the next update for unchanged chunks
    dense.faiss        the FAISS index over the same rows
    bm25/              the bm25s index over the same rows
```

An update writes a whole new version in a temporary folder (`byollm.atomic.atomic_dir_write`), then points
CURRENT at it (`atomic_write_text`, one rename) and deletes the older versions. A writer killed at any point
leaves CURRENT naming a complete version, so the index stays usable; leftovers are removed by the next update.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from byollm.atomic import atomic_dir_write, atomic_write_text
from byollm.errors import ByollmError
from byollm.rag.chunk import Chunk

FORMAT = "byollm-rag-index"
FORMAT_VERSION = 1
POINTER = "CURRENT"
_VERSION = re.compile(r"^v-(\d{6})$")

SCHEMA = """
CREATE TABLE chunks (
  row INTEGER PRIMARY KEY, position INTEGER, id TEXT NOT NULL, source TEXT NOT NULL, doc_id TEXT, title TEXT,
  headings TEXT, start INTEGER, end INTEGER, tags TEXT, groups_ TEXT, meta TEXT, text TEXT NOT NULL, ekey TEXT);
CREATE INDEX chunks_position ON chunks(position);
CREATE INDEX chunks_source ON chunks(source);
"""
COLUMNS = "position, id, source, doc_id, title, headings, start, end, tags, groups_, meta, text, ekey"


class RagIndexError(ByollmError):
    """An index directory that is missing, damaged, or built in a way this request does not fit."""


class EmbeddingMismatchError(RagIndexError):
    """Embeddings of another model (or dimension) than the index's own: they are not comparable."""


def current_version(index_dir: Path) -> Path | None:
    """The live version folder, or None when `index_dir` holds no index yet."""
    pointer = index_dir / POINTER
    if not pointer.exists():
        if index_dir.exists() and any(p for p in index_dir.iterdir() if not p.name.startswith(".")):
            raise RagIndexError(f"{index_dir} exists but is not a byollm RAG index (no {POINTER} file); "
                                "give a new or empty folder to --index")
        return None
    name = pointer.read_text().strip()
    version = index_dir / name
    if not _VERSION.match(name) or not (version / "manifest.json").exists():
        raise RagIndexError(f"{index_dir} is damaged: {POINTER} names '{name}', which is not a complete version; "
                            "rebuild it with byollm rag index ... --index DIR --rebuild")
    return version


def publish(index_dir: Path, write: Callable[[Path], None]) -> Path:
    """Write a new version with `write(tmp_folder)`, make it the live one, delete the others."""
    index_dir.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in index_dir.iterdir() if (m := _VERSION.match(p.name))]
    name = f"v-{max(numbers, default=0) + 1:06d}"
    atomic_dir_write(index_dir / name, write)
    atomic_write_text(index_dir / POINTER, name + "\n")
    for p in index_dir.iterdir():  # older versions and what killed writers left behind
        if p.name != name and p.is_dir() and (_VERSION.match(p.name) or p.name.startswith(".v-")):
            shutil.rmtree(p, ignore_errors=True)
    return index_dir / name


def read_manifest(version: Path) -> dict[str, Any]:
    manifest = json.loads((version / "manifest.json").read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise RagIndexError(f"{version.parent} is a RAG index of another format "
                            f"({manifest.get('format')} v{manifest.get('version')}); rebuild it with --rebuild")
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **manifest},
                                                     indent=1))


def write_chunks(path: Path, rows: list[tuple[Chunk, int | None, str]]) -> None:
    """Every (chunk, position or None, embedding key) into a new SQLite file."""
    con = sqlite3.connect(path)
    try:
        con.executescript(SCHEMA)
        con.executemany(f"INSERT INTO chunks ({COLUMNS}) VALUES ({', '.join('?' * 13)})", [
            (pos, c.id, c.source, c.doc_id, c.title, json.dumps(c.headings), c.start, c.end, json.dumps(c.tags),
             json.dumps(c.groups), json.dumps(c.meta, default=str), c.text, ekey) for c, pos, ekey in rows])
        con.commit()
    finally:
        con.close()


def _chunk(r: tuple) -> Chunk:
    (_, _, source, doc_id, title, headings, start, end, tags, groups, meta, text, _) = r
    return Chunk(text, source, start, end, title or "", tuple(json.loads(headings)), doc_id or "",
                 tuple(json.loads(tags)), tuple(json.loads(groups)), json.loads(meta))


class ChunkStore:
    """Read access to chunks.sqlite: chunks by position, and the columns filters need."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._con: sqlite3.Connection | None = None

    @property
    def con(self) -> sqlite3.Connection:
        if self._con is None:
            self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return self._con

    def get(self, positions: list[int]) -> list[Chunk]:
        """The chunks at these positions, in the same order."""
        if not positions:
            return []
        found = {r[0]: _chunk(r) for r in self.con.execute(
            f"SELECT {COLUMNS} FROM chunks WHERE position IN ({','.join('?' * len(positions))})", positions)}
        return [found[p] for p in positions]

    def rows(self) -> list[tuple[Chunk, int | None, str]]:
        """Every row (duplicates included) as (chunk, position, embedding key), in stored order."""
        return [(_chunk(r), r[0], r[12]) for r in self.con.execute(f"SELECT {COLUMNS} FROM chunks ORDER BY row")]

    def columns(self) -> tuple[list[str], list[tuple[str, ...]], list[tuple[str, ...]]]:
        """(source, tags, groups) of every position, in position order."""
        out: tuple[list, list, list] = ([], [], [])
        for source, tags, groups in self.con.execute(
                "SELECT source, tags, groups_ FROM chunks WHERE position IS NOT NULL ORDER BY position"):
            out[0].append(source)
            out[1].append(tuple(json.loads(tags)))
            out[2].append(tuple(json.loads(groups)))
        return out

    def doc_ids(self) -> set[str]:
        """The content hashes of the documents the indexed chunks come from."""
        return {r[0] for r in self.con.execute("SELECT DISTINCT doc_id FROM chunks WHERE position IS NOT NULL")}

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
