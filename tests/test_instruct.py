"""Instruction and preference data: converters (Alpaca, HH-RLHF, generic JSON), the held-out split, the
tokenised example format the objectives consume, and bad data (a clear error or a counted, reported skip)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import data_mirror

from byollm.data.instruct import (
    Conversation,
    DataReport,
    PreferencePair,
    alpaca_to_messages,
    hh_to_messages,
    load_conversations,
    load_pairs,
    preference_examples,
    record_to_pair,
    sft_examples,
    to_conversations,
    to_pairs,
)
from byollm.errors import DataError
from byollm.tokenizer import BPETokenizer, Tokenizer
from byollm.tokenizer.chat_template import ASSISTANT, END, IGNORE_INDEX, add_chat_tokens, encode_chat, encode_prompt

HH = "\n\nHuman: Hi, can you help?\n\nAssistant: Sure.\n\nHuman: What is 2+2?\n\nAssistant: {}"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = "Human: Assistant: Sure. What is 2+2? It is 4. Four! Hi, can you help? Hello there, friend.\n" * 20
    t = BPETokenizer.train(text, vocab_size=320)
    add_chat_tokens(t)
    return t


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------------------------------
# Converters
# --------------------------------------------------------------------------------------------------


def test_alpaca_with_and_without_input() -> None:
    rec = {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"}
    assert alpaca_to_messages(rec) == [u("Add the numbers.\n\n2, 2"), a("4")]
    assert alpaca_to_messages({**rec, "input": ""}) == [u("Add the numbers."), a("4")]
    assert alpaca_to_messages({"instruction": "Say hi.", "output": "Hi"}) == [u("Say hi."), a("Hi")]


def test_hh_transcript_to_messages_and_pair() -> None:
    assert hh_to_messages(HH.format("It is 4.")) == [u("Hi, can you help?"), a("Sure."), u("What is 2+2?"),
                                                      a("It is 4.")]
    pair = record_to_pair({"chosen": HH.format("It is 4."), "rejected": HH.format("Five.")}, 7)
    assert pair == PreferencePair([u("Hi, can you help?"), a("Sure."), u("What is 2+2?")], "It is 4.", "Five.", 7)


def test_generic_messages_and_preference_records() -> None:
    convs, report = to_conversations([{"messages": [{"role": "system", "content": "S"}, u("q"), a("r")]}])
    assert convs == [Conversation([{"role": "system", "content": "S"}, u("q"), a("r")], 0)] and report.kept == 1
    pairs, _ = to_pairs([
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"messages": [u("q"), a("r"), u("q2")], "chosen": "good", "rejected": "bad"},
        {"prompt": [u("q")], "chosen": [a("good")], "rejected": [a("bad")]},  # TRL's conversational form
    ])
    assert pairs[0] == PreferencePair([u("q")], "good", "bad", 0)
    assert pairs[1].prompt == [u("q"), a("r"), u("q2")] and pairs[2] == PreferencePair([u("q")], "good", "bad", 2)


@pytest.mark.parametrize(("records", "message"), [
    ([{"prompt": "q", "chosen": "x", "rejected": "y"}, {"prompt": "q", "chosen": "good"}],
     "prefs.jsonl: record 1 has no field 'rejected'"),
    ([{"prompt": "q", "chosen": 3, "rejected": "y"}], "record 0: field 'chosen' is a int"),
    ([["not", "an", "object"]], "record 0 is a list"),
    ([{"prompt": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}], "role 'bot'"),
    ([{"prompt": [u("q"), a("r")], "chosen": "a", "rejected": "b"}], "prompt ends with an assistant"),
    ([{"chosen": "no markers", "rejected": "at all"}], "record 0 is not a preference record"),
    ([{"chosen": "\n\nAssistant only", "rejected": "\n\nHuman: x"}], "not a preference record"),
])
def test_malformed_preference_records_are_clear_errors(records: list, message: str) -> None:
    with pytest.raises(DataError, match=message):
        to_pairs(records, source="prefs.jsonl")


def test_malformed_sft_records_are_clear_errors() -> None:
    with pytest.raises(DataError, match="record 1 has no field 'output'"):
        to_conversations([{"instruction": "a", "output": "b"}, {"instruction": "a", "input": ""}])
    with pytest.raises(DataError, match="record 0 .* is not an SFT record"):
        to_conversations([{"question": "a"}])


# --------------------------------------------------------------------------------------------------
# Tokenised examples
# --------------------------------------------------------------------------------------------------


def test_sft_examples_format(tok: Tokenizer) -> None:
    conv = [u("What is 2+2?"), a("It is 4.")]
    examples, report = sft_examples(tok, [conv, Conversation(conv, 5)], max_len=100)
    ids, labels = encode_chat(tok, conv)
    assert examples == [{"input_ids": ids, "labels": labels}] * 2 and str(report) == "kept all 2 conversations"
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert tok.decode(trained) == "It is 4." + END


def test_preference_examples_format(tok: Tokenizer) -> None:
    pair = PreferencePair([u("Hi, can you help?"), a("Sure."), u("What is 2+2?")], "It is 4.", "Five.", 0)
    (ex,), report = preference_examples(tok, [pair], max_len=200)
    assert set(ex) == {"prompt_ids", "chosen_ids", "rejected_ids"} and report.kept == 1
    assert ex["prompt_ids"] == encode_prompt(tok, pair.prompt) and ex["prompt_ids"][-1] == tok.special_tokens[ASSISTANT]
    assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == tok.special_tokens[END]
    # prompt + chosen is exactly the conversation a model is trained on with SFT
    assert ex["prompt_ids"] + ex["chosen_ids"] == encode_chat(tok, [*pair.prompt, a("It is 4.")])[0]
    assert tok.decode(ex["rejected_ids"]) == "Five." + END


def test_bad_pairs_are_counted_and_reported(tok: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    long = "Hello there, friend. " * 40
    records = [
        {"prompt": "q", "chosen": "Four!", "rejected": "It is 4."},  # fine
        {"prompt": "q", "chosen": "", "rejected": "It is 4."},  # empty reply
        {"prompt": "q", "chosen": "Sure.", "rejected": "Sure."},  # identical
        {"prompt": "q", "chosen": long, "rejected": "Sure."},  # over-long reply
        {"prompt": "q", "chosen": "Four!", "rejected": "  \n"},  # empty (whitespace) reply
        {"prompt": "q", "chosen": "Four!<|end|>", "rejected": "It is 4."},  # control token in the text
        {"chosen": HH.format("It is 4."), "rejected": HH.replace("help", "hop").format("Five.")},  # prompts differ
        {"chosen": HH.format("It is 4."), "rejected": HH.format("It is 4.")},  # identical HH replies
    ]
    pairs, report = to_pairs(records, source="prefs.jsonl")
    with caplog.at_level(logging.WARNING, logger="byollm.data.instruct"):
        examples, report = preference_examples(tok, pairs, max_len=64, report=report)
    assert len(examples) == 1 and report.total == 8 and report.kept == 1 and report.n_skipped == 7
    assert report.skipped == {
        "whose chosen/rejected differ before the last reply": [6],
        "with an empty chosen/rejected reply": [1, 4],
        "with identical chosen/rejected": [2, 7],
        "over-long (> 64 tokens)": [3],
        "with a chat control token in the text": [5],
    }
    line = str(report)
    assert line.startswith("skipped 7 of 8 pairs from prefs.jsonl: "
                           "2 with an empty chosen/rejected reply [records 1, 4]")
    assert "1 over-long (> 64 tokens) [record 3]" in line
    assert line in caplog.text  # logged as a warning, never a silent drop


def test_strict_turns_a_skip_into_an_error(tok: Tokenizer) -> None:
    pairs = [PreferencePair([u("q")], "Sure.", "Sure.", 3)]
    with pytest.raises(DataError, match="record 3: with identical chosen/rejected"):
        preference_examples(tok, pairs, max_len=64, strict=True)


def test_long_prompts_are_cut_from_the_left_up_to_a_limit(tok: Tokenizer) -> None:
    history = [u("Hello there, friend. " * 10), a("Sure."), u("What is 2+2?")]
    pair = PreferencePair(history, "It is 4.", "Four!", 0)
    full = encode_prompt(tok, history)
    reply = max(len(tok.encode("It is 4.")), len(tok.encode("Four!"))) + 1
    max_len = len(full) // 2 + reply
    (ex,), report = preference_examples(tok, [pair], max_len=max_len, min_prompt_len=8)
    assert ex["prompt_ids"] == full[-(max_len - reply):]  # the newest tokens and the assistant header kept
    assert len(ex["prompt_ids"]) + reply <= max_len and report.truncated == [0]
    assert "1 prompts cut from the left" in str(report)
    # Room for fewer than min_prompt_len prompt tokens: skipped, not cut further.
    examples, report = preference_examples(tok, [pair], max_len=reply + 4, min_prompt_len=8)
    assert examples == [] and report.skipped == {f"over-long (> {reply + 4} tokens)": [0]}


def test_bad_sft_conversations_are_counted(tok: Tokenizer) -> None:
    convs = [
        [u("What is 2+2?"), a("It is 4.")],
        [u("What is 2+2?"), a("")],  # empty reply
        [u("What is 2+2?")],  # no reply at all
        [u("Hello there, friend. " * 30), a("Sure.")],  # over-long
        [u("Hi <|user|>"), a("Sure.")],  # control token
    ]
    examples, report = sft_examples(tok, convs, max_len=40)
    assert len(examples) == 1 and report.kept == 1
    assert report.skipped == {"with an empty assistant reply": [1], "with no assistant reply": [2],
                              "over-long (> 40 tokens)": [3], "with a chat control token in the text": [4]}
    with pytest.raises(DataError, match="conversation 0: message 0 has role"):
        sft_examples(tok, [[{"role": "human", "content": "x"}]], max_len=40)


def test_report_with_nothing_skipped() -> None:
    assert str(DataReport("pairs", 3)) == "kept all 3 pairs"


# --------------------------------------------------------------------------------------------------
# Files and the real data (through the data mirror)
# --------------------------------------------------------------------------------------------------


def test_jsonl_file_with_held_out_split(tmp_path: Path) -> None:
    p = tmp_path / "prefs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) + "\n"
                         for i in range(20)))
    train, _ = load_pairs(p, split="train", val_fraction=0.25, seed=1)
    val, _ = load_pairs(p, split="val", val_fraction=0.25, seed=1)
    assert len(train) == 15 and len(val) == 5
    assert {x.index for x in train}.isdisjoint({x.index for x in val})
    assert [x.index for x in val] == [x.index for x in load_pairs(p, split="val", val_fraction=0.25, seed=1)[0]]


def _need(name: str) -> None:
    if not (data_mirror() / name).is_file():
        pytest.skip(f"{name} is not in the data mirror {data_mirror()}")


def test_alpaca_through_the_registry(monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> None:
    _need("alpaca_4500.json")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(data_mirror()))
    train, report = load_conversations("alpaca", split="train")
    val, _ = load_conversations("alpaca", split="val")
    assert len(train) == 4050 and len(val) == 450 and report.total == 4050
    assert {c.index for c in train}.isdisjoint({c.index for c in val})
    c = next(c for c in train if c.index == 0)  # the first record has an input
    assert c.messages[0]["content"] == ("Are the two sentences below grammatically correct? Output yes or no.\n\n"
                                        "Sentence 1: I am going to the store.\nSentence 2: I goes to the store.")
    assert c.messages[1] == a("No")
    examples, report = sft_examples(tok, val[:100], max_len=256)
    assert len(examples) + report.n_skipped == 100


def test_hh_rlhf_through_the_registry(monkeypatch: pytest.MonkeyPatch, tok: Tokenizer) -> None:
    _need("hh_rlhf_harmless_2000.jsonl")
    monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(data_mirror()))
    train, report = load_pairs("hh-rlhf", split="train")
    val, val_report = load_pairs("hh-rlhf", split="val")
    assert report.total == 1800 and val_report.total == 200
    assert len(train) + report.n_skipped == 1800 and len(train) > 1700  # a few bad pairs, all counted
    assert {p.index for p in train}.isdisjoint({p.index for p in val})
    first = next(p for p in train + val if p.index == 0)
    assert first.prompt[0] == u("what are some pranks with a pen i can do?")
    assert first.prompt[-1]["role"] == "user" and first.chosen != first.rejected
    examples, report = preference_examples(tok, val, max_len=256, report=val_report)
    assert report.total == 200 and len(examples) + report.n_skipped == 200  # conversion and length skips together
    assert all(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= 256 for e in examples)
