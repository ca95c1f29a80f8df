"""The chat format: rendering, ids and labels, the Hugging Face chat template (checked against transformers'
apply_chat_template), and `byollm chat` (a session, and the CLI with piped stdin)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from byollm.cli import main
from byollm.errors import TokenizerError
from byollm.model import ModelConfig
from byollm.model.config import preset
from byollm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer
from byollm.tokenizer.chat_template import (
    ASSISTANT,
    END,
    IGNORE_INDEX,
    PAD,
    add_chat_tokens,
    encode_chat,
    encode_prompt,
    encode_response,
    has_chat_tokens,
    render,
    require_chat_tokens,
)

TEXT = ("You are a terse assistant. Hi there! Hello, how can I help?  What is 2+2?\n4, of course.\n\n"
        "Tell me a joke. Why did the chicken cross the road? To get to the other side.  Thanks!")

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, how can I help?"}],
    "system + multi-turn": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road?\n\nTo get to the other side."},
    ],
    "ends with user, odd spaces": [
        {"role": "system", "content": ""},
        {"role": "user", "content": "  Thanks!\n"},
        {"role": "assistant", "content": " Hi\n\n"},
        {"role": "user", "content": "Why?"},
    ],
}


@pytest.fixture(scope="module", params=["char", "bpe", "fast"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "fast":  # the `tokenizers` path, as for an imported Hugging Face tokenizer
        from byollm.tokenizer import train_bpe_fast

        t = train_bpe_fast(TEXT * 3, vocab_size=300)
    else:
        t = CharTokenizer.train(TEXT) if request.param == "char" else BPETokenizer.train(TEXT * 3, vocab_size=300)
    add_chat_tokens(t)
    return t


def test_render_is_the_documented_format() -> None:
    msgs = CONVERSATIONS["system + multi-turn"][:3]
    assert render(msgs) == ("<|system|>You are a terse assistant.<|end|>\n<|user|>What is 2+2?<|end|>\n"
                            "<|assistant|>4, of course.<|end|>")
    assert render(msgs[:2], add_generation_prompt=True) == (
        "<|system|>You are a terse assistant.<|end|>\n<|user|>What is 2+2?<|end|>\n<|assistant|>")
    assert render([], add_generation_prompt=True) == ASSISTANT


def test_add_chat_tokens_sets_roles_and_is_idempotent() -> None:
    t = BPETokenizer.train(TEXT, vocab_size=270)
    assert not has_chat_tokens(t) and t.eos_token == "<|endoftext|>"
    ids = add_chat_tokens(t)
    assert has_chat_tokens(t) and t.eos_token == END and t.eos_id == ids[3] and t.pad_token == PAD
    assert t.bos_token == "<|endoftext|>"  # bos is left alone
    n = t.vocab_size
    assert add_chat_tokens(t) == ids and t.vocab_size == n


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_match_encoding_the_rendered_text_and_labels_are_the_replies(tok: Tokenizer, name: str) -> None:
    msgs = CONVERSATIONS[name]
    ids, labels = encode_chat(tok, msgs)
    assert ids == tok.encode(render(msgs)) and len(labels) == len(ids)
    assert encode_prompt(tok, msgs) == tok.encode(render(msgs, add_generation_prompt=True))
    # Trained tokens, read back: each assistant reply followed by <|end|>, nothing else.
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    replies = "".join(m["content"] + END for m in msgs if m["role"] == "assistant")
    assert tok.decode(trained) == replies
    # Every assistant reply's <|end|> is trained; headers never are.
    end, header = tok.special_tokens[END], tok.special_tokens[ASSISTANT]
    n_replies = sum(m["role"] == "assistant" for m in msgs)
    assert trained.count(end) == n_replies and header not in trained


def test_prompt_plus_response_is_the_conversation(tok: Tokenizer) -> None:
    msgs = CONVERSATIONS["system + multi-turn"]
    prompt, response = encode_prompt(tok, msgs[:-1]), encode_response(tok, msgs[-1]["content"])
    ids, labels = encode_chat(tok, msgs)
    assert prompt + response == ids
    assert labels[len(prompt):] == response and prompt[-1] == tok.special_tokens[ASSISTANT]


def test_bad_messages_are_clear_errors(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="message 1 has role 'bot'"):
        render([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}])
    with pytest.raises(TokenizerError, match="control token <\\|end\\|>"):
        encode_chat(tok, [{"role": "user", "content": "Hi<|end|>"}])
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        render([{"role": "user"}])
    plain = CharTokenizer.train(TEXT)
    with pytest.raises(TokenizerError, match="not trained with a chat template.*run byollm sft first"):
        require_chat_tokens(plain)


@pytest.fixture(scope="module")
def hf_tok(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(d)  # writes the Hugging Face files too (save_hf)
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _ids(out) -> list[int]:
    """apply_chat_template returns a list of ids or, in newer transformers, a BatchEncoding."""
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_transformers_chat_template_gives_our_ids(tok: Tokenizer, hf_tok, name: str, gen: bool) -> None:
    msgs = CONVERSATIONS[name]
    ours = encode_prompt(tok, msgs) if gen else encode_chat(tok, msgs)[0]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == render(msgs, gen)
    assert _ids(hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)) == ours
    assert hf_tok.eos_token == END and hf_tok.eos_token_id == tok.special_tokens[END]


def test_transformers_assistant_mask_is_our_labels(tok: Tokenizer, hf_tok) -> None:
    # The template's {% generation %} blocks: what TRL's assistant_only_loss trains is what we train.
    msgs = CONVERSATIONS["system + multi-turn"]
    out = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = encode_chat(tok, msgs)
    assert list(out["input_ids"]) == ids
    assert list(out["assistant_masks"]) == [int(lab != IGNORE_INDEX) for lab in labels]


def test_chat_tokens_survive_save_and_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert has_chat_tokens(back) and back.eos_token == END and back.pad_token == PAD
    msgs = CONVERSATIONS["system + multi-turn"]
    assert encode_chat(back, msgs) == encode_chat(tok, msgs)
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())


def test_plain_tokenizer_exports_no_chat_template(tmp_path: Path) -> None:
    CharTokenizer.train(TEXT).save_hf(tmp_path)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


# --------------------------------------------------------------------------------------------------
# Chat sessions
# --------------------------------------------------------------------------------------------------


class ScriptedModel(nn.Module):
    """Stands in for a model: answers each turn with the next reply of a script, then <|end|>.

    It records the prompt each turn started from, so tests can check what generation was fed."""

    def __init__(self, config: ModelConfig, replies: list[list[int]], end: int) -> None:
        super().__init__()
        self.config = config
        self.dummy = nn.Parameter(torch.zeros(1))
        self.replies, self.end = replies, end
        self.prompts: list[list[int]] = []
        self._queue: list[int] = []

    def forward(self, input_ids: torch.Tensor, *, kv_cache=None, logits_to_keep=None, **_) -> object:
        if kv_cache is None or input_ids.size(1) > 1:  # prefill: a new turn
            self.prompts.append(input_ids[0].tolist())
            self._queue = list(self.replies[len(self.prompts) - 1]) + [self.end]
        logits = torch.zeros(input_ids.size(0), 1, self.config.vocab_size)
        logits[:, -1, self._queue.pop(0)] = 1.0
        return type("Out", (), {"logits": logits})()


def test_session_streams_replies_keeps_history_and_resets(tok: Tokenizer) -> None:
    from byollm.chat import ChatSession, run_chat
    from byollm.sampling import SamplingParams

    replies = ["Hello!", "4, of course.", "Hi"]
    end = tok.special_tokens[END]
    config = preset("llama-tiny", vocab_size=tok.vocab_size, block_size=512)
    model = ScriptedModel(config, [tok.encode(r) for r in replies], end)
    session = ChatSession(model, tok, SamplingParams(max_new_tokens=40, temperature=0), 
                          system="You are a terse assistant.")
    out, err = io.StringIO(), io.StringIO()
    lines = io.StringIO("Hi there!\n\nWhat is 2+2?\n/reset\nThanks!\n/exit\nnever read\n")
    assert run_chat(session, lines, out, err=err) == 3
    assert out.getvalue() == "Hello!\n4, of course.\nHi\n"  # stopped at <|end|>, which is not shown
    assert "conversation reset" in err.getvalue()
    system = {"role": "system", "content": "You are a terse assistant."}
    turn1 = [system, {"role": "user", "content": "Hi there!"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]
    turn3 = [system, {"role": "user", "content": "Thanks!"}]  # after /reset: only the system message is kept
    # Each turn was generated from exactly the training template's prompt.
    assert model.prompts == [encode_prompt(tok, turn1), encode_prompt(tok, turn2), encode_prompt(tok, turn3)]
    assert session.history == [*turn3, {"role": "assistant", "content": "Hi"}]


def test_session_drops_oldest_turns_to_fit_the_context(tok: Tokenizer) -> None:
    from byollm.chat import ChatSession
    from byollm.sampling import SamplingParams

    end = tok.special_tokens[END]
    reply = tok.encode("Hello, how can I help?")
    config = preset("llama-tiny", vocab_size=tok.vocab_size, block_size=len(reply) * 3 + 40)
    model = ScriptedModel(config, [reply] * 5, end)
    session = ChatSession(model, tok, SamplingParams(max_new_tokens=len(reply) + 1, temperature=0), system="Hi")
    for _ in range(5):
        assert "".join(session.reply("What is 2+2?")) == "Hello, how can I help?"
    assert any("dropped" in n for n in session.notices)
    assert session.history[0] == {"role": "system", "content": "Hi"}
    assert all(len(p) + len(reply) + 1 <= config.block_size for p in model.prompts)


@pytest.fixture(scope="module")
def chat_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("chat_cli")
    plain = BPETokenizer.train(TEXT * 3, vocab_size=280)
    plain.save(d / "plain_tok")
    chat = BPETokenizer.load(d / "plain_tok")
    add_chat_tokens(chat)
    chat.save(d / "chat_tok")
    for name in ("plain", "chat"):
        assert main(["init", "--model.preset", "llama-tiny", "--model.n_layer", "1", "--tokenizer",
                     str(d / f"{name}_tok"), "--out", str(d / name)]) == 0
    return d / "plain", d / "chat"


def test_chat_cli_with_piped_stdin(chat_ckpts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi there!\n/reset\nThanks!\n"))
    assert main(["chat", str(chat_ckpts[1]), "--max-new-tokens", "4", "--temperature", "0",
                 "--system", "Be terse."]) == 0
    captured = capsys.readouterr()
    assert "loaded checkpoint" in captured.err and "conversation reset" in captured.err
    assert "you>" not in captured.out  # piped: replies only


def test_chat_cli_refuses_a_model_without_chat_tokens(chat_ckpts: tuple[Path, Path],
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(chat_ckpts[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 2  # the "loaded" line and the one-line error
    assert "this model has no chat template" in err and "run byollm sft first" in err


def test_exported_model_stops_at_end(tok: Tokenizer, tmp_path: Path) -> None:
    from byollm.interop.hf import export_hf
    from byollm.model import GPT

    export_hf(GPT(preset("llama-tiny", vocab_size=tok.vocab_size)), tmp_path / "hf", tok)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.special_tokens[END]
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == END and config["pad_token"] == PAD and "<|assistant|>" in config["chat_template"]
