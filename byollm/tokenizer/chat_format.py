"""Which conversation format a tokenizer speaks, and one interface for turning conversations into ids.

Everything that turns a conversation into tokens (`byollm chat`, the server's /v1/chat/completions, SFT / DPO /
ORPO / reward data, PPO prompts) asks `chat_format(tok)` and uses what it returns:

- **byollm's own format** (`chat_template.py`) when the tokenizer has our control tokens (<|system|>,
  <|user|>, <|assistant|>, <|end|>): a model trained here keeps exactly the ids and labels it was trained on;
- else **the tokenizer's own Jinja template** (an imported model's `chat_template`, from tokenizer_config.json,
  chat_template.jinja or a GGUF file), rendered as transformers renders it (`jinja_template.py`), so an
  imported instruct model (SmolLM2's ChatML, Llama 3, Gemma, ...) gets the text it was trained on;
- else a `TokenizerError`: the model was never taught a conversation format.

    fmt = chat_format(tok)
    prompt = fmt.encode_prompt(messages)           # generate the reply from here; stop at fmt.stop_ids
    ids, labels = fmt.encode_chat(messages)        # training: labels -100 except each reply + its end token
    chosen = fmt.encode_response(prompt_messages, "a reply")   # what follows encode_prompt (DPO)

**Labels with a Jinja template.** A template is a program, not a list of pieces, so where a reply sits in the
text is found by rendering prefixes: for the assistant message k, `render(messages[:k],
add_generation_prompt=True)` ends where the reply starts and `render(messages[:k+1])` ends after its turn. Both
must be prefixes of the whole conversation's text (true of ChatML, Llama 3, Gemma...; a template that rewrites
earlier turns, e.g. one dropping old reasoning, is refused with a clear error). The trained part of the turn is
its text up to and including the first end-of-turn token (`<|im_end|>`; the newline ChatML writes after it is
not trained, as it is never generated). The text is then tokenised *segment by segment* (untrained, reply,
untrained, ...) so that every token belongs to exactly one segment and the labels are exact: tokenising the
whole text and masking by character offsets could give a token that straddles a boundary. Each cut is right
after a special token or the header's newline, where the tokenizer splits anyway, so the segment-wise ids are
the whole-text ids (the tests check this for ChatML conversations). The one exception is a reply that starts
with spaces: whole, the header's "\n" and the spaces would merge into one token, which the model never sees
at inference (its prompt ends with the "\n" token, then it writes the reply's tokens); segment-wise, training
shows it exactly what it will read and write.

**Special tokens in messages.** The rendered text is encoded with special tokens allowed (the template writes
`<|im_start|>` as text), so a message's own text must not contain any special token string: it would forge
or end a turn. Such a message is refused (TokenizerError naming the message and the token), as byollm's own
format refuses its control tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import regex

from byollm.errors import TokenizerError
from byollm.tokenizer.base import Tokenizer
from byollm.tokenizer.chat_template import (
    IGNORE_INDEX,
    Message,
    check_messages,
    encode_chat,
    encode_prompt,
    encode_response,
    end_id,
    has_chat_tokens,
    render,
    require_chat_tokens,
)
from byollm.tokenizer.jinja_template import TOKEN_VARIABLES, compile_chat_template, render_chat_template

# Tokens that end a turn (or the whole text) in the common templates: ChatML (Qwen, SmolLM), Llama 3 (and its
# tool-call turn end), Gemma, Phi-3 and gpt-oss, and the end-of-text tokens a chat model may emit instead.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|return|>",
                      "<|endoftext|>", "<|end_of_text|>")

NO_TEMPLATE = ("run byollm sft first or give a tokenizer with a chat_template (in tokenizer_config.json or "
               "chat_template.jinja)")


class ChatFormat(ABC):
    """How conversations become ids for one tokenizer (see the module docstring). Build with `chat_format`."""

    name: str  # "byollm", or the template's family ("ChatML", "Llama 3", "Gemma", "Jinja")
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]  # generation of a reply stops after any of these

    @abstractmethod
    def check_messages(self, messages: Sequence[Message]) -> list[Message]:
        """Validate a conversation (shape, roles, no control token in a text); TokenizerError naming the message."""

    @abstractmethod
    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text."""

    @abstractmethod
    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the conversation followed by the assistant's header: generate the reply from here."""

    @abstractmethod
    def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, labels) for training: labels are IGNORE_INDEX except each assistant reply and its end token."""

    @abstractmethod
    def encode_response(self, prompt: Sequence[Message], content: str) -> list[int]:
        """Ids of an assistant reply to `prompt` as they follow encode_prompt(prompt), its end token included."""


class ByollmChatFormat(ChatFormat):
    """byollm's own template (`byollm.tokenizer.chat_template`), unchanged: the format of models trained here."""

    name = "byollm"

    def __init__(self, tok: Tokenizer) -> None:
        require_chat_tokens(tok)
        self.tokenizer = tok
        self.stop_ids = tuple(sorted({end_id(tok)} | ({tok.eos_id} if tok.eos_id is not None else set())))

    def check_messages(self, messages: Sequence[Message]) -> list[Message]:
        return check_messages(messages)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return render(messages, add_generation_prompt)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return encode_prompt(self.tokenizer, messages)

    def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        return encode_chat(self.tokenizer, messages)

    def encode_response(self, prompt: Sequence[Message], content: str) -> list[int]:
        return encode_response(self.tokenizer, content)  # each reply is tokenised on its own in our format


def template_family(source: str) -> str:
    """A readable name for a template, from the tokens it writes."""
    for marker, family in (("<|im_start|>", "ChatML"), ("<|start_header_id|>", "Llama 3"),
                           ("<start_of_turn>", "Gemma"), ("[INST]", "Mistral")):
        if marker in source:
            return family
    return "Jinja"


class JinjaChatFormat(ChatFormat):
    """The tokenizer's own Jinja chat template, rendered as transformers does (`jinja_template`)."""

    def __init__(self, tok: Tokenizer, source: str) -> None:
        compile_chat_template(source)  # a broken template is an error now, not at the first message
        self.tokenizer, self.source = tok, source
        self.name = template_family(source)
        self.variables = _token_variables(tok)
        specials = sorted(tok.special_tokens, key=len, reverse=True)  # longest first, as the tokenizer matches
        self._control = regex.compile("|".join(regex.escape(t) for t in specials)) if specials else None
        stops = {tok.special_tokens[t] for t in END_OF_TURN_TOKENS if t in tok.special_tokens}
        stops |= {tok.eos_id} if tok.eos_id is not None else set()
        if (eot := _eot_id(tok)) is not None:
            stops.add(eot)
        self.stop_ids = tuple(sorted(stops))
        by_id = {i: t for t, i in tok.special_tokens.items()}
        self._stop_strings = [by_id[i] for i in self.stop_ids if i in by_id]

    def check_messages(self, messages: Sequence[Message]) -> list[Message]:
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TokenizerError(f"a conversation is a list of messages, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be an object with 'role' and 'content', got {m!r:.80}")
            if not isinstance(m["role"], str) or not m["role"]:
                raise TokenizerError(f"message {i} has role {m['role']!r}; a role is a non-empty string")
            if not isinstance(m["content"], str):
                raise TokenizerError(f"message {i} content is a {type(m['content']).__name__}, expected a string")
            if self._control is not None and (found := self._control.search(m["content"])):
                raise TokenizerError(f"message {i} ({m['role']}) contains the chat control token {found.group()}, "
                                     "which would end or start a message early; remove it from the text")
        return list(messages)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        return self._render(self.check_messages(messages), add_generation_prompt)

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """render() of messages already checked."""
        return render_chat_template(self.source, messages, add_generation_prompt=add_generation_prompt,
                                    variables=self.variables)

    def _encode(self, text: str) -> list[int]:
        # The template writes its control tokens as text; messages were checked to hold none of their own.
        return self.tokenizer.encode(text, allowed_special=True) if text else []

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        return self._encode(self.render(messages, add_generation_prompt=True))

    def _reply_span(self, messages: list[Message], k: int, text: str) -> tuple[int, int]:
        """(start, end) in `text` (a rendering that continues messages[:k + 1]) of assistant message k's trained
        part: its turn after the generation prompt, up to and including the first end-of-turn token."""
        before = self._render(messages[:k], add_generation_prompt=True)
        through = self._render(messages[: k + 1])
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise TokenizerError(
                f"the {self.name} chat template is not prefix-stable (rendering the conversation up to message {k} "
                "is not the start of rendering it whole), so the assistant replies cannot be located for training "
                "labels; use a template that renders earlier turns the same way")
        turn = through[len(before):]
        ends = [j + len(s) for s in self._stop_strings if (j := turn.find(s)) >= 0]
        return len(before), len(before) + (min(ends) if ends else len(turn))

    def encode_chat(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        msgs = self.check_messages(messages)
        text = self._render(msgs)
        ids: list[int] = []
        labels: list[int] = []
        cut = 0
        for k, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            start, end = self._reply_span(msgs, k, text)
            if start < cut:
                raise TokenizerError(f"the {self.name} chat template puts message {k} before the previous reply ends; "
                                     "the replies cannot be located for training labels")
            for segment, trained in ((text[cut:start], False), (text[start:end], True)):
                piece = self._encode(segment)
                ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            cut = end
        rest = self._encode(text[cut:])
        return ids + rest, labels + [IGNORE_INDEX] * len(rest)

    def encode_response(self, prompt: Sequence[Message], content: str) -> list[int]:
        msgs = self.check_messages([*prompt, {"role": "assistant", "content": content}])
        text = self._render(msgs)
        start, end = self._reply_span(msgs, len(msgs) - 1, text)
        return self._encode(text[start:end])


def _token_variables(tok: Tokenizer) -> dict[str, str]:
    """The named special tokens transformers gives a template: ours for bos/eos/pad, the config's for the rest."""
    roles = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    out: dict[str, str] = {}
    for name in TOKEN_VARIABLES:
        value: Any = roles[name] if name in roles else tok.hf_config.get(name)
        value = value.get("content") if isinstance(value, Mapping) else value
        if isinstance(value, str):
            out[name] = value
    return out


def _eot_id(tok: Tokenizer) -> int | None:
    """An end-of-turn token named by the tokenizer's config (the GGUF importer's `eot_token`: a token or an id)."""
    eot = tok.hf_config.get("eot_token")
    eot = eot.get("content") if isinstance(eot, Mapping) else eot
    if isinstance(eot, str):
        return tok.special_tokens.get(eot, tok.token_to_id(eot))
    if isinstance(eot, int) and not isinstance(eot, bool) and 0 <= eot < tok.vocab_size:
        return eot
    return None


def chat_template_source(tok: Tokenizer | None) -> str | None:
    """The tokenizer's own Jinja chat template, if it has one (a named list or dict of templates: "default")."""
    template = getattr(tok, "hf_config", {}).get("chat_template") if tok is not None else None
    if isinstance(template, list):  # transformers' older form: [{"name": "default", "template": "..."}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
    if isinstance(template, Mapping):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def has_chat_format(tok: Tokenizer | None) -> bool:
    """Whether `tok` can render conversations: byollm's chat tokens, or a chat template of its """
    return has_chat_tokens(tok) or chat_template_source(tok) is not None


def chat_format(tok: Tokenizer | None) -> ChatFormat:
    """The conversation format of `tok`: byollm's when it has our chat tokens, else its own Jinja template, else
    a TokenizerError saying how to get one."""
    if tok is None:
        raise TokenizerError(f"this model has no chat template: it has no tokenizer; {NO_TEMPLATE}")
    if has_chat_tokens(tok):
        return ByollmChatFormat(tok)
    if (source := chat_template_source(tok)) is not None:
        return JinjaChatFormat(tok, source)
    raise TokenizerError(f"this model has no chat template: its tokenizer has neither byollm's chat tokens nor a "
                         f"chat_template; {NO_TEMPLATE}")


__all__ = ["END_OF_TURN_TOKENS", "ByollmChatFormat", "ChatFormat", "JinjaChatFormat", "chat_format",
           "chat_template_source", "has_chat_format", "template_family"]
