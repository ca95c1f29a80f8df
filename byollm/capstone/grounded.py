"""Grounded SFT examples: teaching a model pretrained here the RAG prompt's contract, and measuring it on unseen text.

The server's RAG prompt (byollm.rag.prompt) gives the model numbered, delimited sources and asks it to answer from
them, cite them by number like [1], and say so when they do not hold the answer. SmolLM2 was instruction-tuned on
data like that; a model pretrained from scratch on Shakespeare and Alpaca has never seen such a prompt, and after
SFT on Alpaca alone it ignores the sources and writes no [n]. So the scratch track adds *grounded* examples to its
SFT data, built from SQuAD (a question, the paragraph that answers it, the answer span):

    system   the server's rules (SYSTEM_PROMPT), word for word
    user     the server's user message: the sources, cut by the index's own chunker at the index's chunk size,
             numbered and delimited by the same code, then the question and the instruction
    reply    "According to [n], <answer span>."        n = the position of the passage that holds the answer
             "I do not know: the sources do not say."  when no given passage holds it (ABSTAIN_SHARE of examples)

The citation comes first. With the span first ("Roger Goodell [1]") a 0.8M-parameter model, which cannot yet copy a
span from a passage, found the one constant reply the cheapest to predict and answered every held-out question
with "I do not know" (greedy decoding picks the likeliest first token, and 20% of the replies began with "I",
while the spans began with hundreds of different tokens); with the citation first, the likeliest start of a reply
is the citation.

The prompt is built by `rag_messages`, the function the server calls, so what the model learns is exactly what it
will be asked. Paragraphs are split into train and held-out *by paragraph* (a seeded permutation), and
`grounded_figures` measures, on held-out paragraphs only, how often the model cites a source, cites the right one,
writes the answer, and abstains when it should (and when it should not).
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

import numpy as np

from byollm.data.instruct import SPLIT_SEED

ABSTAIN = "I do not know: the sources do not say."
ABSTAIN_SHARE = 0.2  # examples whose sources do not hold the answer (the model must learn to say so)
_ABSTAINS = re.compile(r"\b(do not|don't) know\b|sources do not say", re.I)
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _chunks_of(paragraphs: list[Any], source: str, chunk_tokens: int | None) -> list[list[Any]]:
    """Each paragraph's chunks, cut as `byollm rag index` cuts a document (the embedding model's token counts)."""
    from byollm.rag.chunk import ChunkerSettings, chunk_text
    from byollm.rag.dense import DEFAULT_MODEL, Embedder

    embedder = Embedder(DEFAULT_MODEL)
    defaults = ChunkerSettings()
    settings = ChunkerSettings(chunk_tokens or defaults.size, defaults.overlap, embedder.name)
    return [chunk_text(p.context, source, embedder.count_tokens, settings, title=p.title.replace("_", " "))
            for p in paragraphs]


def _holding(chunks: list[Any], start: int, answer: str) -> Any | None:
    """The first chunk whose span holds the answer (offsets into the paragraph), None when the cut split it."""
    for c in chunks:
        if c.start <= start and start + len(answer) <= c.end:
            return c
    return None


def build_grounded(squad_path: Path, *, k: int, chunk_tokens: int | None, heldout_fraction: float,
                   seed: int = SPLIT_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, heldout) grounded records {"messages": [system, user, assistant], "question", "answers": [...],
    "sources": k, "cited": n (0: no source holds the answer)}.

    k sources per question: the chunk holding the answer at a random position among k - 1 chunks of other
    paragraphs, or (ABSTAIN_SHARE of questions) k chunks of other paragraphs and the ABSTAIN reply."""
    from byollm.rag.index import Hit
    from byollm.rag.ingest import read_squad
    from byollm.rag.prompt import number_sources, rag_messages

    paragraphs = read_squad(squad_path)
    chunks = _chunks_of(paragraphs, squad_path.name, chunk_tokens)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paragraphs))
    n_heldout = max(1, round(heldout_fraction * len(paragraphs)))
    heldout_ids = set(order[:n_heldout].tolist())
    parts: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    normal = {id(c): _normal(c.text) for cs in chunks for c in cs}
    for pi, p in enumerate(paragraphs):
        part = "heldout" if pi in heldout_ids else "train"
        others = [c for pj, cs in enumerate(chunks) if (pj in heldout_ids) == (part == "heldout") and pj != pi
                  for c in cs]  # distractors from the same side of the split
        for q in p.questions:
            gold = _holding(chunks[pi], q.answer_starts[0], q.answers[0]) if q.answers else None
            if gold is None:
                continue
            # a distractor must not hold the answer too (many paragraphs name the same teams and players)
            answers = [_normal(a) for a in q.answers if _normal(a)]
            pool = [c for c in others if not any(a in normal[id(c)] for a in answers)]
            abstain = rng.random() < ABSTAIN_SHARE
            need = k if abstain else k - 1
            if len(pool) < need:  # an answer every other passage holds ("Super Bowl"): no honest distractor
                continue
            picked = [pool[i] for i in rng.choice(len(pool), size=need, replace=False)]
            cited = 0
            if not abstain:
                cited = int(rng.integers(0, k)) + 1
                picked.insert(cited - 1, gold)
            sources = number_sources([Hit(c, 1.0, r) for r, c in enumerate(picked, start=1)])
            reply = ABSTAIN if abstain else f"According to [{cited}], {q.answers[0].strip().rstrip('.')}."
            messages = [*rag_messages(q.question, sources), {"role": "assistant", "content": reply}]
            parts[part].append({"messages": messages, "question": q.question, "answers": sorted(set(q.answers)),
                                "sources": k, "cited": cited})
    return parts["train"], parts["heldout"]


def grounded_pairs(records: list[dict[str, Any]], seed: int = SPLIT_SEED) -> list[dict[str, Any]]:
    """Preference pairs that keep the contract through preference tuning: for an answerable question the cited
    answer is chosen over ABSTAIN; for an unanswerable one ABSTAIN is chosen over a confident citation of another
    question's answer. (DPO on HH-RLHF alone moves a small model toward refusals: without these pairs the tuned
    model answered every grounded question "I do not know", citing nothing.)"""
    rng = np.random.default_rng(seed)
    normal = [[_normal(a) for a in r["answers"]] for r in records]
    pairs = []
    for i, r in enumerate(records):
        prompt, reply = r["messages"][:-1], r["messages"][-1]["content"]
        if r["cited"]:
            pairs.append({"prompt": prompt, "chosen": reply, "rejected": ABSTAIN})
            continue
        own = set(normal[i])
        others = [j for j in [*range(i + 1, len(records)), *range(i)]  # another question's answer, not this one's
                  if records[j]["cited"] and not any(a in own or any(x in a for x in own if x) for a in normal[j])]
        if not others:
            continue
        wrong = records[others[int(rng.integers(0, min(len(others), 50)))]]["answers"][0].strip().rstrip(".")
        pairs.append({"prompt": prompt, "chosen": ABSTAIN,
                      "rejected": f"According to [{int(rng.integers(1, r['sources'] + 1))}], {wrong}."})
    return pairs


def _normal(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_NO_PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def grounded_figures(model: Any, tokenizer: Any, records: list[dict[str, Any]], *, tokens: int,
                     max_len: int) -> dict[str, Any]:
    """How a chat model answers grounded prompts (greedy, at most `tokens` new tokens; prompts longer than
    max_len - tokens are left out and counted)."""
    from byollm.tokenizer.chat_format import chat_format
    from byollm.train.align import answer_prompts

    fmt = chat_format(tokenizer)
    kept = [r for r in records if len(fmt.encode_prompt(r["messages"][:-1])) <= max_len - tokens]
    replies = answer_prompts(model, tokenizer, [r["messages"][:-1] for r in kept], tokens, 0.0, 0)
    return {**score_replies(kept, replies), "left_out_too_long": len(records) - len(kept)}


def score_replies(records: list[dict[str, Any]], replies: list[str]) -> dict[str, Any]:
    """Shares of the answerable records whose reply cites a source, cites the one holding the answer, contains an
    answer (SQuAD-normalised) or says it does not know; of the unanswerable ones, the share that says so."""
    from byollm.rag.safety import parse_citations

    answerable = cites = right = found = abstain_wrongly = unanswerable = abstains = 0
    example = None
    for r, reply in zip(records, replies, strict=True):
        cited = parse_citations(reply, r["sources"]).cited
        says_unknown = bool(_ABSTAINS.search(reply))
        if r["cited"]:
            answerable += 1
            cites += bool(cited)
            right += r["cited"] in cited
            found += any(_normal(a) and _normal(a) in _normal(reply) for a in r["answers"])
            abstain_wrongly += says_unknown
            if example is None:
                example = {"question": r["question"], "expected": r["messages"][-1]["content"], "reply": reply}
        else:
            unanswerable += 1
            abstains += says_unknown

    def share(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {"answerable": answerable, "unanswerable": unanswerable,
            "cites_a_source": share(cites, answerable), "cites_the_right_source": share(right, answerable),
            "answer_in_reply": share(found, answerable), "abstains_when_unanswerable": share(abstains, unanswerable),
            "abstains_when_answerable": share(abstain_wrongly, answerable), "example": example}
