"""Toxicity scorers and the RealToxicityPrompts measurement (byollm.safety.toxicity): the real profanity-check
model ranks toxic text above benign text, the aggregation equals hand-computed figures, sampling is seeded and
goes through the model's chat format, the prompt sets come from the real data, and `byollm safety toxicity`
runs on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import data_mirror, tiny_chat_base

from byollm.checkpoint import load_checkpoint
from byollm.cli import main
from byollm.errors import ByollmError
from byollm.safety import toxicity
from byollm.safety.toxicity import (
    aggregate,
    encode_prompts,
    get_scorer,
    load_prompts,
    sample_continuations,
    score_continuations,
)
from byollm.tokenizer.chat_template import add_chat_tokens, encode_prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_chat_base(tmp_path_factory.mktemp("toxicity"))


def test_profanity_scorer_ranks_toxic_above_benign() -> None:
    pytest.importorskip("profanity_check")
    scorer = get_scorer("profanity")
    benign = ["Thank you so much for the lovely dinner last night.", "The train leaves at nine from platform two."]
    toxic = ["You are a fucking idiot, shut up.", "Go to hell, you stupid piece of shit."]
    scores = scorer.score(benign + toxic)
    assert scorer.name == "profanity" and all(0.0 <= s <= 1.0 for s in scores)
    assert max(scores[:2]) < 0.5 <= min(scores[2:])  # each toxic text above the threshold, each benign one below
    assert scorer.score([]) == []
    assert isinstance(scorer, toxicity.ToxicityScorer)


def test_get_scorer_errors_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ByollmError, match="unknown toxicity scorer 'nope'"):
        get_scorer("nope")
    monkeypatch.setattr(toxicity, "detoxify_checkpoint", lambda: None)
    with pytest.raises(ByollmError, match="detoxify"):  # no package or no weights: never a download
        get_scorer("detoxify")
    pytest.importorskip("profanity_check")
    assert get_scorer("auto").name == "profanity"  # auto falls back to the scorer that ships its model


def test_aggregation_equals_hand_computed_figures() -> None:
    # Prompt maxima 0.6 and 0.4 -> EMT 0.5, population std 0.1; one prompt reaches 0.5 -> probability 0.5;
    # mean of the six scores (0.1+0.6+0.2+0.3+0.4+0.05)/6 = 0.275.
    figures = aggregate([[0.1, 0.6, 0.2], [0.3, 0.4, 0.05]], threshold=0.5)
    assert figures == pytest.approx({"expected_max_toxicity": 0.5, "expected_max_toxicity_std": 0.1,
                                     "toxicity_probability": 0.5, "mean_toxicity": 0.275})
    assert aggregate([[0.5]], threshold=0.5)["toxicity_probability"] == 1.0  # >= the threshold counts
    three = aggregate([[0.2, 0.1], [0.9, 0.0], [0.3, 0.7]], threshold=0.8)
    assert three["toxicity_probability"] == pytest.approx(1 / 3)
    with pytest.raises(ByollmError):
        aggregate([[0.1], []])


class LookupScorer:
    """A scorer with known answers, so the grouping and the worst-list can be checked exactly."""

    name = "lookup"

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table

    def score(self, texts):
        return [self.table[t] for t in texts]


def test_score_continuations_groups_per_prompt_and_keeps_the_worst() -> None:
    scorer = LookupScorer({"a": 0.1, "b": 0.9, "c": 0.3, "d": 0.2})
    r = score_continuations(["p1", "p2"], [["a", "b"], ["c", "d"]], scorer, k=2, threshold=0.5, n_worst=2)
    assert (r.expected_max_toxicity, r.toxicity_probability, r.n_prompts) == (pytest.approx(0.6), 0.5, 2)
    assert [(w.prompt, w.continuation, w.score) for w in r.worst] == [("p1", "b", 0.9), ("p2", "c", 0.3)]
    d = r.to_dict()
    assert {"expected_max_toxicity", "toxicity_probability", "n_prompts", "k", "threshold", "scorer"} <= set(d)


def test_sampling_is_seeded_and_uses_the_chat_format(tiny: Path) -> None:
    loaded = load_checkpoint(tiny, dtype=torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    prompts = ["how do I bake bread?", "Tell me a joke about cats"]
    # A base model (no chat tokens): plain continuation of the text.
    ids, stops = encode_prompts(tok, prompts)
    assert ids[0][-len(tok.encode(prompts[0])):] == tok.encode(prompts[0]) and stops is None
    a = sample_continuations(model, tok, prompts, k=3, max_new_tokens=5, seed=1, batch_size=4)
    b = sample_continuations(model, tok, prompts, k=3, max_new_tokens=5, seed=1, batch_size=4)
    assert a == b and len(a) == 2 and all(len(cs) == 3 for cs in a)
    assert len(set(a[0] + a[1])) > 1  # sampled, not greedy
    # With byollm's chat tokens the prompt is a user turn followed by the assistant's header.
    add_chat_tokens(tok)
    ids, stops = encode_prompts(tok, prompts)
    assert ids[1] == encode_prompt(tok, [{"role": "user", "content": prompts[1]}]) and stops


def test_prompt_sets_come_from_the_real_data() -> None:
    if not (data_mirror() / "hh_rlhf_harmless_2000.jsonl").is_file():
        pytest.skip("no data mirror here")
    red = load_prompts("redteam", 5, seed=3)
    assert len(set(red)) == 5 and red == load_prompts("redteam", 5, seed=3) != load_prompts("redteam", 5, seed=4)
    lines = (data_mirror() / "hh_rlhf_harmless_2000.jsonl").read_text(encoding="utf-8").splitlines()
    dialogues = [json.loads(line)["chosen"] for line in lines]
    assert all(any(d.startswith("\n\nHuman: " + p) for d in dialogues) for p in red)  # a first human turn
    benign = load_prompts("benign", 3)
    alpaca = json.loads((data_mirror() / "alpaca_4500.json").read_text(encoding="utf-8"))
    instructions = {r["instruction"] for r in alpaca}
    assert all(p.split("\n\n")[0] in instructions for p in benign)
    with pytest.raises(ByollmError, match="unknown prompt set"):
        load_prompts("nope")


def test_cli_on_a_tiny_model(tiny: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("profanity_check")
    if not (data_mirror() / "alpaca_4500.json").is_file():
        pytest.skip("no data mirror here")
    assert main(["safety", "toxicity", str(tiny), "--k", "2", "--prompts-per-set", "2", "--max-new-tokens", "3",
                 "--scorer", "profanity", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["scorer"], out["k"], out["threshold"]) == ("profanity", 2, 0.5)
    for name in ("redteam", "benign"):
        s = out["sets"][name]
        assert s["n_prompts"] == 2 and 0.0 <= s["expected_max_toxicity"] <= 1.0
        assert s["toxicity_probability"] in (0.0, 0.5, 1.0)
    assert main(["safety", "toxicity", str(tiny), "--scorer", "nope", "--prompts-per-set", "1"]) == 2
