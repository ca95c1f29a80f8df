"""`byollm rag eval`: retrieval quality on SQuAD questions.

The protocol (issue 15, so numbers compare across retrievers, chunkers and indexes):
- every paragraph of the SQuAD file is a document, cut by our chunker;
- a question's gold document is its own paragraph; a retrieved chunk is a hit when it overlaps that paragraph
  (a chunk of it: chunks never cross documents), recognised by the paragraph's content hash;
- SQuAD 2.0's unanswerable questions (`is_impossible`) are left out: no passage holds their answer;
- for each retriever, over the questions: recall@1 and recall@5 (a hit among the first 1 / 5 chunks),
  MRR@10 (1 / the rank of the first hit, 0 past 10) and nDCG@10 with the paragraph as the one relevant
  document (its first chunk counts: 1 / log2(1 + rank), 0 past 10). With one chunk per paragraph these are the
  usual definitions.

With `--index DIR` the questions run against that index (which must contain the file's paragraphs: index the
SQuAD file into it with `byollm rag index`; other documents in it are distractors); without, the paragraphs
are indexed in memory with the default model and chunker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from byollm.errors import DataError
from byollm.rag.chunk import content_hash
from byollm.rag.index import RETRIEVERS, RagIndex
from byollm.rag.ingest import Document, read_squad

DEPTH = 10


@dataclass(frozen=True)
class Question:
    text: str
    gold: str  # content hash of its paragraph


def squad_questions(path: str | Path) -> tuple[list[Document], list[Question], int]:
    """(one document per paragraph, the answerable questions, how many unanswerable ones were left out)."""
    paragraphs = read_squad(path)
    docs = [Document(p.context, str(path), title=p.title, meta={"paragraph": i}) for i, p in enumerate(paragraphs)]
    questions = [Question(q.question, content_hash(p.context)) for p in paragraphs for q in p.questions
                 if not q.is_impossible]
    skipped = sum(q.is_impossible for p in paragraphs for q in p.questions)
    if not questions:
        raise DataError(f"{path} has no answerable questions to evaluate retrieval with")
    return docs, questions, skipped


def first_hit_ranks(index: RagIndex, questions: list[Question], retriever: str, depth: int = DEPTH,
                    batch: int = 64, vectors: np.ndarray | None = None) -> list[int]:
    """For each question, the rank (1-based) of the first chunk of its paragraph in the top `depth`; 0 if none.
    `vectors`: the questions' embeddings, when already computed."""
    ranks = []
    for i in range(0, len(questions), batch):
        part = questions[i:i + batch]
        qv = vectors[i:i + batch] if vectors is not None and retriever != "bm25" else None
        for q, hits in zip(part, index.search_batch([q.text for q in part], depth, retriever, query_vectors=qv),
                           strict=True):
            ranks.append(next((h.rank for h in hits if h.chunk.doc_id == q.gold), 0))
    return ranks


def retrieval_metrics(ranks: list[int]) -> dict[str, float]:
    n = len(ranks)
    return {"recall@1": sum(r == 1 for r in ranks) / n,
            "recall@5": sum(1 <= r <= 5 for r in ranks) / n,
            "mrr@10": sum(1 / r for r in ranks if 1 <= r <= 10) / n,
            "ndcg@10": sum(1 / math.log2(1 + r) for r in ranks if 1 <= r <= 10) / n}


def evaluate_squad(qa: str | Path, *, index: str | Path | None = None, retrievers: tuple[str, ...] = RETRIEVERS,
                   chunk_size: int | None = None, chunk_overlap: int | None = None,
                   progress: bool | None = None) -> dict[str, dict[str, float]]:
    """{retriever: {"recall@1", "recall@5", "mrr@10", "ndcg@10"}} on the SQuAD file `qa` (see the module)."""
    from byollm.rag.chunk import ChunkerSettings
    from byollm.rag.dense import DEFAULT_MODEL

    docs, questions, _ = squad_questions(qa)
    if index is not None:
        rag = RagIndex.open(index)
        missing = {q.gold for q in questions} - rag.doc_ids()
        if missing:
            raise DataError(f"the index {index} lacks {len(missing)} of the {len(docs)} paragraphs of {qa}: add them "
                            f"with byollm rag index {qa} --index {index}")
    else:
        defaults = ChunkerSettings()
        settings = ChunkerSettings(chunk_size or defaults.size,
                                   defaults.overlap if chunk_overlap is None else chunk_overlap, DEFAULT_MODEL)
        rag = RagIndex.from_documents(docs, settings=settings, progress=progress)
    vectors = rag.embedder.embed([q.text for q in questions], progress=progress) \
        if set(retrievers) - {"bm25"} else None
    return {r: retrieval_metrics(first_hit_ranks(rag, questions, r, vectors=vectors)) for r in retrievers}


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = ["recall@1", "recall@5", "mrr@10", "ndcg@10"]
    lines = [f"{'retriever':<10}" + "".join(f"{n:>10}" for n in names)]
    lines += [f"{r:<10}" + "".join(f"{m[n]:>10.3f}" for n in names) for r, m in results.items()]
    return "\n".join(lines)
