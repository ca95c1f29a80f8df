"""Grounded SFT examples (byollm.capstone.grounded): checked against the SQuAD file itself and hand-made replies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from byollm.capstone.grounded import ABSTAIN, build_grounded, grounded_pairs, score_replies
from byollm.data import resolve
from byollm.rag.prompt import INSTRUCTION, SYSTEM_PROMPT

BLOCK = re.compile(r"<<<SOURCE (\d+)>>>\n(.*?)\n<<<END SOURCE \1>>>", re.S)


@pytest.fixture(scope="module")
def squad() -> Path:
    return resolve("squad").path


@pytest.fixture(scope="module")
def grounded(squad: Path) -> tuple[list[dict], list[dict]]:
    return build_grounded(squad, k=2, chunk_tokens=96, heldout_fraction=0.2)


def _passages(record: dict) -> dict[int, str]:
    return {int(n): text for n, text in BLOCK.findall(record["messages"][1]["content"])}


def test_each_answerable_reply_cites_the_passage_that_holds_the_answer_and_no_other_passage_holds_it(
        grounded: tuple[list[dict], list[dict]], squad: Path) -> None:
    train, heldout = grounded
    contexts = [p["context"] for a in json.loads(squad.read_text())["data"] for p in a["paragraphs"]]
    for r in train + heldout:
        system, user, reply = r["messages"]
        assert system == {"role": "system", "content": SYSTEM_PROMPT}
        assert user["content"].endswith(INSTRUCTION) and reply["role"] == "assistant"
        passages = _passages(r)
        assert sorted(passages) == [1, 2] and r["sources"] == 2
        assert f"\n\nQuestion: {r['question'].strip()}\n\n" in user["content"]
        assert all(any(text in c for c in contexts) for text in passages.values())  # cut from the paragraphs
        holds = {n for n, text in passages.items() if any(a.lower() in text.lower() for a in r["answers"])}
        if r["cited"]:
            assert r["cited"] in holds and reply["content"].startswith(f"According to [{r['cited']}], ")
        else:
            assert reply["content"] == ABSTAIN and not holds


def test_held_out_paragraphs_never_appear_in_training(grounded: tuple[list[dict], list[dict]]) -> None:
    train, heldout = grounded
    seen = {text for r in train for text in _passages(r).values()}
    assert heldout and not seen & {text for r in heldout for text in _passages(r).values()}
    abstain = sum(not r["cited"] for r in train) / len(train)
    assert 0.15 < abstain < 0.25  # ABSTAIN_SHARE = 0.2


def test_grounded_pairs_prefer_the_cited_answer_or_abstaining_as_the_passages_allow(
        grounded: tuple[list[dict], list[dict]]) -> None:
    train, _ = grounded
    pairs = grounded_pairs(train)
    assert len(pairs) == len(train)
    for pair, r in zip(pairs, train, strict=True):
        assert pair["prompt"] == r["messages"][:2]
        if r["cited"]:
            assert (pair["chosen"], pair["rejected"]) == (r["messages"][2]["content"], ABSTAIN)
        else:  # abstaining beats confidently citing a passage that does not hold the answer
            assert pair["chosen"] == ABSTAIN and re.fullmatch(r"According to \[[12]\], .+\.", pair["rejected"])
            span = pair["rejected"].split("], ", 1)[1].lower()
            assert not any(a.lower() in span for a in r["answers"])


def test_score_replies_counts_citations_answers_and_abstentions() -> None:
    def record(cited: int, answer: str) -> dict:
        user = "Sources:\n\n[1] t\n<<<SOURCE 1>>>\na\n<<<END SOURCE 1>>>\n\n[2] t\n<<<SOURCE 2>>>\nb\n" \
               "<<<END SOURCE 2>>>\n\nQuestion: Who won?\n\n" + INSTRUCTION
        return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
                             {"role": "assistant", "content": f"{answer} [{cited}]" if cited else ABSTAIN}],
                "question": "Who won?", "answers": [answer], "sources": 2, "cited": cited}

    records = [record(1, "Denver Broncos"), record(2, "Santa Clara"), record(2, "Levi's Stadium"), record(0, "x")]
    replies = ["The Denver Broncos [1].", "Santa Clara [1]", "I do not know.", "I don't know: the sources do not say."]
    got = score_replies(records, replies)
    assert got["answerable"] == 3 and got["unanswerable"] == 1
    assert got["cites_a_source"] == round(2 / 3, 4)  # [1], [1], none
    assert got["cites_the_right_source"] == round(1 / 3, 4)  # only the first names the passage that holds it
    assert got["answer_in_reply"] == round(2 / 3, 4)  # "the" is dropped by SQuAD's normalisation
    assert got["abstains_when_answerable"] == round(1 / 3, 4)
    assert got["abstains_when_unanswerable"] == 1.0
    assert got["example"]["question"] == "Who won?"
