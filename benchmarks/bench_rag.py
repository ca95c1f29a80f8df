"""RAG retrieval speed on this machine: embedding throughput, index build time, query latency, HNSW recall.

- embedding: all-MiniLM-L6-v2 (sentence-transformers, normalised) on `--embed-chunks` real chunks (the guide's
  own pages, ~200 tokens each), chunks/s;
- search at 10k and 100k chunks: synthetic unit vectors (dim 384, clustered so neighbours are not all ties),
  exact `IndexFlatIP` and HNSW (M, efConstruction, efSearch as `byollm.rag.dense.HNSWSettings`); build seconds,
  single-query latency p50/p95 over `--queries` queries (one at a time, as a server answers them), and HNSW
  recall@10 against the exact top 10;
- BM25 (bm25s) build and query latency on the same number of synthetic word chunks.

    .venv/bin/python benchmarks/bench_rag.py                  # ~3-5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_rag.py --sizes 10000     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def percentiles(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def synthetic(n: int, d: int, rng: np.random.Generator, centers: int = 1000) -> np.ndarray:
    c = rng.standard_normal((centers, d)).astype(np.float32)
    x = c[rng.integers(0, centers, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_embedding(n: int) -> dict[str, float]:
    from byollm.rag.chunk import ChunkerSettings, chunk_text
    from byollm.rag.dense import Embedder
    from byollm.rag.ingest import iter_files, read_documents

    emb = Embedder()
    texts: list[str] = []
    for f in iter_files([ROOT / "docs"]):
        for d in read_documents(f):
            texts += [c.embed_text() for c in chunk_text(d.text, str(f), emb.count_tokens, ChunkerSettings())]
    texts = (texts * (n // max(len(texts), 1) + 1))[:n]
    emb.embed(texts[:32])  # warm-up
    t = time.perf_counter()
    emb.embed(texts, progress=False)
    s = time.perf_counter() - t
    tokens = sum(emb.count_tokens(x) for x in texts) / len(texts)
    return {"chunks": n, "mean_tokens": round(tokens, 1), "seconds": s, "chunks_per_s": n / s}


def bench_vectors(n: int, queries: int, rng: np.random.Generator) -> dict[str, object]:
    import faiss

    from byollm.rag.dense import HNSWSettings, build_faiss

    d = 384
    x, q = synthetic(n, d, rng), synthetic(queries, d, rng)
    out: dict[str, object] = {"chunks": n}
    t = time.perf_counter()
    flat = build_faiss(x, hnsw_threshold=n + 1)
    out["flat_build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    hnsw = build_faiss(x, hnsw_threshold=1)
    out["hnsw_build_s"] = time.perf_counter() - t
    _, exact = flat.search(q, 10)
    for name, index in (("flat", flat), ("hnsw", hnsw)):
        times = []
        for i in range(queries):
            t = time.perf_counter()
            index.search(q[i:i + 1], 10)
            times.append(time.perf_counter() - t)
        out[name] = percentiles(times)
    s = HNSWSettings()
    for ef in sorted({64, 128, 256, 512, 1024, s.ef_search}):
        hnsw.hnsw.efSearch = ef
        times, found = [], []
        for i in range(queries):
            t = time.perf_counter()
            _, ids = hnsw.search(q[i:i + 1], 10)
            times.append(time.perf_counter() - t)
            found.append(len(set(ids[0]) & set(exact[i])) / 10)
        out[f"hnsw_ef{ef}"] = {**percentiles(times), "recall@10": float(np.mean(found))}
    out["hnsw_settings"] = {"M": s.M, "ef_construction": s.ef_construction, "ef_search": s.ef_search}
    out["faiss_threads"] = faiss.omp_get_max_threads()
    return out


def bench_bm25(n: int, queries: int, rng: np.random.Generator) -> dict[str, float]:
    from byollm.rag.lexical import BM25

    vocab = [f"w{i}" for i in range(20000)]
    zipf = np.minimum(rng.zipf(1.2, (n, 120)), len(vocab)) - 1
    texts = [" ".join(vocab[j] for j in row) for row in zipf]
    t = time.perf_counter()
    bm = BM25.build(texts, stem=False)
    build = time.perf_counter() - t
    times = []
    for _ in range(queries):
        query = " ".join(vocab[j] for j in np.minimum(rng.zipf(1.2, 8), len(vocab)) - 1)
        t = time.perf_counter()
        bm.search(query, 50)
        times.append(time.perf_counter() - t)
    return {"chunks": n, "build_s": build, **percentiles(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--embed-chunks", type=int, default=256)
    ap.add_argument("--json", type=str, default=None, help="also write the results here")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    results: dict[str, object] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                                  "load_avg_1m": os.getloadavg()[0]}
    results["embedding"] = bench_embedding(a.embed_chunks)
    print(json.dumps(results["embedding"]), flush=True)
    for n in a.sizes:
        results[f"vectors_{n}"] = bench_vectors(n, a.queries, rng)
        print(json.dumps(results[f"vectors_{n}"]), flush=True)
        results[f"bm25_{n}"] = bench_bm25(n, a.queries, rng)
        print(json.dumps(results[f"bm25_{n}"]), flush=True)
    results["load_avg_1m_end"] = os.getloadavg()[0]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
