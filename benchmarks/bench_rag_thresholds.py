"""Calibrating RAG's "not found" thresholds: best-hit scores of answerable vs off-topic questions, per retriever.

The index is the SQuAD sample's paragraphs (in memory, as `byollm rag eval` builds it). In-domain: its 810
answerable questions (their paragraph is in the index). Off-topic: hand-written questions about Shakespeare,
cooking and other subjects the sample does not cover, plus the Alpaca sample's instructions that are
questions without an input (some touch sport or the US: an honest, not hand-picked, off-topic set).

For each retriever the score compared with a threshold is the one `byollm.rag.answer.relevance` reads: BM25's
score, dense's cosine, and for hybrid the best dense cosine (and best BM25 score) among the fused hits (RRF
scores only order: the top fused score is ~1/61 whatever the query). It prints the distributions, the ROC AUC
of "best score" as a detector of in-domain questions, and, for a grid of thresholds, the share of in-domain
questions kept and of off-topic ones refused.

    .venv/bin/python benchmarks/bench_rag_thresholds.py            # ~1 minute on 2 cores
    .venv/bin/python benchmarks/bench_rag_thresholds.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BYOLLM_DATA_MIRROR", ROOT.parent / "shared" / "data"))
OFF_TOPIC = [
    "Who wrote Romeo and Juliet?", "In which city is Hamlet's castle set?", "How does Macbeth die?",
    "What is the name of Prospero's daughter in The Tempest?", "Who is Desdemona's husband?",
    "How many sonnets did Shakespeare write?", "Which play features the character Shylock?",
    "Where was William Shakespeare born?", "What did King Lear divide among his daughters?",
    "Who says 'To be, or not to be'?", "How long should I boil an egg for a soft yolk?",
    "What temperature do you bake sourdough bread at?", "How do I make a roux for gravy?",
    "What is the difference between baking soda and baking powder?", "How much salt goes into pasta water?",
    "Which herbs go well with roast lamb?", "How do you caramelise onions?", "What is a good substitute for eggs "
    "in a cake?", "How long does a turkey take to roast?", "What spices are in garam masala?",
    "What is the capital of Australia?", "How far is the Moon from the Earth?", "What causes the seasons?",
    "Who painted the Mona Lisa?", "How does photosynthesis work?", "What is the boiling point of water on Mount "
    "Everest?", "How many bones are in the human body?", "What is a Python list comprehension?",
    "Who discovered penicillin?", "What is the tallest mountain in Africa?",
]


def off_topic_questions(n_alpaca: int, seed: int) -> list[str]:
    qs = list(OFF_TOPIC)
    alpaca = DATA / "alpaca_4500.json"
    if alpaca.exists():
        rows = json.loads(alpaca.read_text())
        pool = [r["instruction"] for r in rows if not r.get("input") and r["instruction"].strip().endswith("?")]
        qs += random.Random(seed).sample(pool, min(n_alpaca, len(pool)))
    return qs


def best_scores(index, questions: list[str], k: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    vecs = index.embedder.embed(questions, progress=False)
    out: dict[str, list[float]] = {"bm25": [], "dense": [], "hybrid_dense": [], "hybrid_bm25": []}
    for retriever in ("bm25", "dense", "hybrid"):
        for hits in index.search_batch(questions, k, retriever, query_vectors=vecs):
            if retriever == "hybrid":
                out["hybrid_dense"].append(max((h.scores["dense"] for h in hits), default=-1.0))
                out["hybrid_bm25"].append(max((h.scores["bm25"] for h in hits), default=0.0))
            else:
                out[retriever].append(max((h.score for h in hits), default=0.0 if retriever == "bm25" else -1.0))
    return {name: np.asarray(v) for name, v in out.items()}


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(an in-domain question's best score > an off-topic one's), ties half."""
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + ties / 2)


def describe(x: np.ndarray) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(x, q)), 4) for q in (1, 5, 25, 50, 75, 95, 99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qa", type=Path, default=DATA / "squad_v1.1_dev_super_bowl_50.json")
    p.add_argument("--alpaca", type=int, default=300, help="Alpaca questions added to the off-topic set")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    from byollm.rag.evaluate import squad_questions
    from byollm.rag.index import RagIndex

    docs, questions, _ = squad_questions(a.qa)
    index = RagIndex.from_documents(docs, progress=False)
    inside = best_scores(index, [q.text for q in questions], a.k)
    off = off_topic_questions(a.alpaca, a.seed)
    outside = best_scores(index, off, a.k)
    grids = {"bm25": [0, 1, 2, 3, 4, 5, 6, 8], "dense": [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4],
             "hybrid_dense": [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4], "hybrid_bm25": [0, 2, 4, 6, 8]}
    report = {"in_domain": len(questions), "off_topic": len(off), "retrievers": {}}
    for name, grid in grids.items():
        pos, neg = inside[name], outside[name]
        rows = [{"threshold": t, "in_domain_kept": round(float((pos >= t).mean() if t else (pos > t).mean()), 4),
                 "off_topic_refused": round(float((neg < t).mean() if t else (neg <= t).mean()), 4)} for t in grid]
        report["retrievers"][name] = {"auc": round(auc(pos, neg), 4), "in_domain": describe(pos),
                                      "off_topic": describe(neg), "grid": rows}
        print(f"\n{name}: AUC {auc(pos, neg):.4f}")
        print(f"  in-domain best score  {describe(pos)}")
        print(f"  off-topic best score  {describe(neg)}")
        for r in rows:
            print(f"  threshold {r['threshold']:>5}: in-domain kept {r['in_domain_kept']:.3f}, "
                  f"off-topic refused {r['off_topic_refused']:.3f}")
    # hybrid's gate as byollm.rag.answer applies it: dense cosine >= t_dense or BM25 >= t_bm25
    both = []
    for td in (0.25, 0.3, 0.35):
        for tb in (4, 6, 8, float("inf")):
            keep_in = (inside["hybrid_dense"] >= td) | (inside["hybrid_bm25"] >= tb)
            keep_out = (outside["hybrid_dense"] >= td) | (outside["hybrid_bm25"] >= tb)
            both.append({"dense": td, "bm25": tb, "in_domain_kept": round(float(keep_in.mean()), 4),
                         "off_topic_refused": round(float(1 - keep_out.mean()), 4)})
            print(f"hybrid gate dense >= {td} or bm25 >= {tb}: in-domain kept {keep_in.mean():.3f}, "
                  f"off-topic refused {1 - keep_out.mean():.3f}")
    report["hybrid_gate"] = both
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
