"""RAG answer quality on the SQuAD sample: exact match, token F1 and gold citations of generated answers.

The real SmolLM2-135M-Instruct answers through our engine (`byollm.rag.answer.load_generator()`, greedy,
`--max-new-tokens` 32) a fixed seeded sample of `--n` questions of the SQuAD file, each in every condition:

- `rag`: retrieval (`--retriever` hybrid, `--k` 3) from an in-memory index of the file's paragraphs (every
  paragraph a document, our chunker, as `byollm rag eval`), the RAG prompt (`byollm.rag.prompt`), no
  not-found threshold (every question is answerable; `best_score` is recorded);
- `rag_short`: the same sources with a one-sentence system prompt;
- `rag_example` (not run by default): our system prompt, the instruction's placeholder "[n]" replaced by an
  example number ("cite them by number, like [1]"); since 2026-12-03 that is the default instruction, so it
  equals `rag` (the benchmarks.md rows of that day were measured with OLD_INSTRUCTION as the default);
- `closed`: closed-book, the question alone ("answer briefly"), no sources.

Metrics, per condition, over the questions: SQuAD v1.1's official exact match and token F1 (answers
normalised: lowercase, punctuation and the articles a/an/the removed, whitespace collapsed; the best over
the gold answers), computed on the answer with its `[n]` markers removed; `contains`: the share whose
normalised answer contains a normalised gold answer (a long sentence holding the right span scores low F1);
for the retrieval conditions, `cites_gold`: the share whose citations include a chunk of the question's own
paragraph, and `gold_in_sources`: the share with that chunk among the k sources (the ceiling of both).

Each answer is appended to `--out` (JSON lines) as it is made, so a run cut short still reports: the
summary is recomputed from whatever the file holds (`--summary-only`); `--resume` skips what it holds.

    .venv/bin/python benchmarks/bench_rag_answers.py --n 60 --out rag_answers.jsonl   # ~25 min on 2 cores
    .venv/bin/python benchmarks/bench_rag_answers.py --n 3 --out /tmp/smoke.jsonl     # smoke run
    .venv/bin/python benchmarks/bench_rag_answers.py --out rag_answers.jsonl --summary-only
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import string
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SQUAD = Path(os.environ.get("BYOLLM_DATA_MIRROR", ROOT.parent / "shared" / "data")) / \
    "squad_v1.1_dev_super_bowl_50.json"
CLOSED_SYSTEM = "You are a helpful assistant. Answer the question briefly, in a few words."
SHORT_SYSTEM = "Answer from the numbered sources only and cite them as [n]."
# the default instruction until 2026-12-03:
OLD_INSTRUCTION = "Answer the question using only the sources above, and cite them as [n]."
EXAMPLE_INSTRUCTION = "Answer the question using only the sources above, and cite them by number, like [1]."
CONDITIONS = ("rag", "rag_short", "closed", "rag_example")
DEFAULT_CONDITIONS = ("rag", "rag_short", "closed")


# --------------------------------------------------------------------------------------------------
# SQuAD v1.1's official metrics (evaluate-v1.1.py)
# --------------------------------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lowercase, remove punctuation, remove the articles a/an/the, collapse whitespace (as evaluate-v1.1.py)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def best(metric: Any, prediction: str, truths: list[str]) -> float:
    return max(metric(prediction, t) for t in truths)


def contains(prediction: str, truths: list[str]) -> float:
    p = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(t)} " in p for t in truths if normalize_answer(t)))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def sample_questions(path: Path, n: int, seed: int) -> list[dict[str, Any]]:
    from byollm.rag.chunk import content_hash
    from byollm.rag.ingest import read_squad

    qs = [{"id": q.id, "question": q.question, "answers": q.answers, "gold": content_hash(p.context)}
          for p in read_squad(path) for q in p.questions if not q.is_impossible]
    return random.Random(seed).sample(qs, min(n, len(qs)))


def strip_citations(text: str) -> str:
    from byollm.rag.safety import CITATION

    return " ".join(CITATION.sub(" ", text).split())


def generate(generator: Any, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, str | None]:
    text = "".join(generator.stream(messages, max_tokens=max_tokens, temperature=0.0, seed=0))
    return text, generator.last_finish_reason


def answer_one(condition: str, q: dict[str, Any], index: Any, generator: Any, a: argparse.Namespace) -> dict:
    from byollm.rag.answer import finish, prepare
    from byollm.rag.prompt import INSTRUCTION

    t = time.perf_counter()
    row: dict[str, Any] = {"condition": condition, "id": q["id"], "question": q["question"], "answers": q["answers"]}
    if condition == "closed":
        messages = [{"role": "system", "content": CLOSED_SYSTEM}, {"role": "user", "content": q["question"]}]
        raw, reason = generate(generator, messages, a.max_new_tokens)
        row.update(raw=raw, answer=raw.strip(), finish_reason=reason)
    else:
        context = generator.context

        def fits(messages: list[dict[str, str]]) -> bool:
            return generator.count_tokens(messages) + a.max_new_tokens <= context

        prompt = prepare(index, q["question"], k=a.k, retriever=a.retriever, min_score=float("-inf"),
                         specials=generator.specials, fits=fits)
        if condition == "rag_short":
            prompt.messages = [{"role": "system", "content": SHORT_SYSTEM}, *prompt.messages[1:]]
        elif condition == "rag_example":
            user = prompt.messages[-1]["content"]
            assert user.endswith(INSTRUCTION)
            prompt.messages[-1] = {"role": "user", "content": user[:-len(INSTRUCTION)] + EXAMPLE_INSTRUCTION}
        raw, reason = generate(generator, prompt.messages, a.max_new_tokens)
        ans = finish(prompt, raw, reason)
        by_n = {s.n: s for s in ans.sources}
        cited_docs = [by_n[c.n].chunk.doc_id for c in ans.citations]
        row.update(raw=raw, answer=ans.text, finish_reason=reason, best_score=ans.best_score,
                   source_docs=[s.chunk.doc_id == q["gold"] for s in ans.sources],
                   cited=[c.n for c in ans.citations], cites_gold=q["gold"] in cited_docs,
                   gold_in_sources=any(s.chunk.doc_id == q["gold"] for s in ans.sources),
                   prompt_tokens=generator.count_tokens(prompt.messages))
    pred = strip_citations(row["answer"])
    row.update(em=best(exact_match, pred, q["answers"]), f1=best(f1_score, pred, q["answers"]),
               contains=contains(pred, q["answers"]), seconds=round(time.perf_counter() - t, 2))
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for condition in CONDITIONS:
        mine = [r for r in rows if r["condition"] == condition]
        if not mine:
            continue
        s = {"n": len(mine), **{m: round(sum(r[m] for r in mine) / len(mine), 4) for m in ("em", "f1", "contains")},
             "seconds_per_answer": round(sum(r["seconds"] for r in mine) / len(mine), 2)}
        if condition != "closed":
            s.update({m: round(sum(bool(r[m]) for r in mine) / len(mine), 4)
                      for m in ("cites_gold", "gold_in_sources")})
            s["cites_any"] = round(sum(bool(r["cited"]) for r in mine) / len(mine), 4)
        out[condition] = s
    return out


def table(summary: dict[str, dict[str, float]]) -> str:
    cols = ["n", "em", "f1", "contains", "cites_gold", "cites_any", "gold_in_sources", "seconds_per_answer"]
    lines = ["| condition | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for cond, s in summary.items():
        lines.append(f"| {cond} | " + " | ".join(str(s.get(c, "-")) for c in cols) + " |")
    return "\n".join(lines)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qa", type=Path, default=SQUAD, help="a SQuAD v1.1 file")
    p.add_argument("--n", type=int, default=60, help="questions in the seeded sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=3, help="sources per question")
    p.add_argument("--retriever", default="hybrid", choices=["bm25", "dense", "hybrid"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS),
                   help=f"comma-separated, of {', '.join(CONDITIONS)}")
    p.add_argument("--ckpt", default=None, help="the model (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("rag_answers.jsonl"), help="one JSON line per answer")
    p.add_argument("--resume", action="store_true", help="skip the answers --out already holds")
    p.add_argument("--summary-only", action="store_true", help="summarise --out and exit")
    a = p.parse_args()
    if a.summary_only:
        print(table(summarise(read_rows(a.out))))
        return

    import torch

    from byollm.rag.answer import load_generator
    from byollm.rag.evaluate import squad_questions
    from byollm.rag.index import RagIndex

    torch.set_num_threads(a.threads)
    conditions = [c for c in a.conditions.split(",") if c]
    questions = sample_questions(a.qa, a.n, a.seed)
    t = time.perf_counter()
    docs, _, _ = squad_questions(a.qa)
    index = RagIndex.from_documents(docs, progress=False)
    print(f"[bench] indexed {len(docs)} paragraphs into {len(index)} chunks in {time.perf_counter() - t:.1f} s",
          file=sys.stderr)
    generator = load_generator(a.ckpt)
    done = {(r["condition"], r["id"]) for r in read_rows(a.out)} if a.resume else set()
    if not a.resume:
        a.out.write_text("")
    with a.out.open("a") as f:
        for i, q in enumerate(questions, 1):
            for condition in conditions:  # interleaved: a run cut short has every condition on the same questions
                if (condition, q["id"]) in done:
                    continue
                row = answer_one(condition, q, index, generator, a)
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"[bench] {i}/{len(questions)} {condition:<9} em {row['em']:.0f} f1 {row['f1']:.2f} "
                      f"{row['seconds']:.1f}s  {row['answer'][:70]!r}", file=sys.stderr)
    summary = summarise(read_rows(a.out))
    print(json.dumps({"retriever": a.retriever, "k": a.k, "max_new_tokens": a.max_new_tokens, "n": len(questions),
                      "seed": a.seed, "summary": summary}))
    print(table(summary))


if __name__ == "__main__":
    main()
