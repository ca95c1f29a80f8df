"""The chat format: how a conversation becomes one token sequence, the same for training and for inference.

A chat model reads a conversation as plain tokens. Which part is the system prompt, which the user and which
the assistant is marked by *control tokens*: special tokens of their own that ordinary text can never produce.
byollm's template is one line per message,

    <|system|>You are a helpful assistant.<|end|>
    <|user|>What is 2+2?<|end|>
    <|assistant|>4<|end|>

that is: a role header (`<|system|>`, `<|user|>` or `<|assistant|>`), the message text exactly as given,
`<|end|>`, and a newline *between* messages (none after the last one). To ask the model for a reply, the
prompt ends with the bare assistant header (`add_generation_prompt=True`):

    <|user|>What is 2+2?<|end|>
    <|assistant|>

and the model writes the reply and then `<|end|>`, which is therefore the stop token (and the tokenizer's
eos after `add_chat_tokens`). The choices, and why:
- The header is followed by the text directly (no newline), so each message's text sits between two
  special tokens and is tokenised on its own: the ids of a conversation are exactly the ids of its pieces,
  which makes the training labels exact and the Hugging Face template give the very same ids.
- Training labels (`encode_chat`) are the ids of each assistant reply *and its closing `<|end|>`* (so the
  model learns to stop); headers, system and user turns and the newlines are -100 (not trained).
- The exported tokenizer carries the same template in Jinja (`CHAT_TEMPLATE`, written as `chat_template`
  by `save_hf`), so `AutoTokenizer.from_pretrained(dir).apply_chat_template(messages, tokenize=True)` gives
  our ids. Its assistant parts are wrapped in `{% generation %}` blocks, so transformers'
  `return_assistant_tokens_mask=True` (TRL's `assistant_only_loss`) marks exactly the tokens we train on.

Example:

    tok = load_tokenizer("out/tok")
    add_chat_tokens(tok)                       # 4 control tokens (+ <|pad|>), eos becomes <|end|>
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids, labels = encode_chat(tok, msgs)      # labels: -100 except "Hello!" and <|end|>
    prompt = encode_prompt(tok, msgs[:1])     # ends with <|assistant|>: generate from here
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from byollm.errors import TokenizerError
from byollm.tokenizer.base import Tokenizer

SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
PAD = "<|pad|>"  # added by add_chat_tokens when the tokenizer has no pad token; never in rendered text
ROLES = ("system", "user", "assistant")
HEADERS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
SEPARATOR = "\n"  # between messages
IGNORE_INDEX = -100  # label of a token that is not trained (PyTorch's cross_entropy default ignore_index)

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}

# The same template for transformers (Jinja). transformers compiles templates with trim_blocks and
# lstrip_blocks, so the template is one line and every newline it outputs is an explicit '\n' expression.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('byollm chat roles are system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    f"{{{{ '{ASSISTANT}' }}}}{{% generation %}}{{{{ message['content'] + '{END}' }}}}{{% endgeneration %}}"
    "{%- else -%}"
    f"{{{{ '<|' + message['role'] + '|>' + message['content'] + '{END}' }}}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    f"{{%- if messages -%}}{{{{ '\\n' }}}}{{%- endif -%}}{{{{ '{ASSISTANT}' }}}}"
    "{%- endif -%}"
)


# --------------------------------------------------------------------------------------------------
# The tokens
# --------------------------------------------------------------------------------------------------


def add_chat_tokens(tok: Tokenizer, *, set_eos: bool = True, add_pad: bool = True) -> list[int]:
    """Add the control tokens <|system|>, <|user|>, <|assistant|>, <|end|> to `tok` (known ones keep their id).

    set_eos: make <|end|> the eos token, so generation (ours and transformers') stops after a reply.
    add_pad: when `tok` has no pad token, add <|pad|> and make it the pad token (padding with eos would
        make collators that mask pad ids also mask the <|end|> the model must learn).
    Returns the ids of the four control tokens. The model's embedding must cover the new ids (vocab_size).
    """
    ids = tok.add_special_tokens(CHAT_TOKENS)
    if add_pad and tok.pad_token is None:
        tok.add_special_tokens([PAD])
        tok.set_roles(pad=PAD)
    if set_eos:
        tok.set_roles(eos=END)
    return ids


def has_chat_tokens(tok: Tokenizer | None) -> bool:
    """Whether `tok` has all four control tokens (as special tokens), i.e. can render byollm's chat format."""
    return tok is not None and all(t in tok.special_tokens for t in CHAT_TOKENS)


def require_chat_tokens(tok: Tokenizer | None) -> None:
    if not has_chat_tokens(tok):
        missing = [t for t in CHAT_TOKENS if tok is None or t not in tok.special_tokens]
        raise TokenizerError(
            f"this model was not trained with a chat template (its tokenizer lacks {', '.join(missing)}); "
            "run byollm sft first"
        )


def end_id(tok: Tokenizer) -> int:
    """The id of <|end|>: the stop token of a reply."""
    require_chat_tokens(tok)
    return tok.special_tokens[END]


# --------------------------------------------------------------------------------------------------
# Messages -> text
# --------------------------------------------------------------------------------------------------


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """Validate a conversation: a list of {"role", "content"} with a known role and string content that does
    not contain a control token (it would end the message early). Raises TokenizerError naming the message."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"a conversation is a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TokenizerError(f"message {i} must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise TokenizerError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise TokenizerError(f"message {i} content is a {type(m['content']).__name__}, expected a string")
        if found := [t for t in CHAT_TOKENS if t in m["content"]]:
            raise TokenizerError(f"message {i} ({m['role']}) contains the chat control token {found[0]}, which "
                                 "would end or start a message early; remove it from the text")
    return list(messages)


def render(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text in byollm's chat format (see the module docstring).

    add_generation_prompt: end with the assistant header, asking the model for the next reply.
    """
    messages = check_messages(messages)
    text = SEPARATOR.join(HEADERS[m["role"]] + m["content"] + END for m in messages)
    if add_generation_prompt:
        text += (SEPARATOR if messages else "") + ASSISTANT
    return text


# --------------------------------------------------------------------------------------------------
# Messages -> ids
# --------------------------------------------------------------------------------------------------


def _pieces(tok: Tokenizer, messages: Sequence[Message]) -> list[tuple[list[int], bool]]:
    """(ids, trained) pieces whose concatenation is tok.encode(render(messages))."""
    require_chat_tokens(tok)
    special = tok.special_tokens
    sep = tok.encode(SEPARATOR, allowed_special=False)
    out: list[tuple[list[int], bool]] = []
    for i, m in enumerate(check_messages(messages)):
        if i:
            out.append((sep, False))
        out.append(([special[HEADERS[m["role"]]]], False))
        reply = m["role"] == "assistant"
        # Content sits between two special tokens, so it is tokenised on its own, as in the whole string.
        out.append((tok.encode(m["content"]) + [special[END]], reply))
    return out


def encode_chat(tok: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a whole conversation, for training.

    ids == tok.encode(render(messages)). labels[i] == ids[i] on the tokens of every assistant reply and its
    closing <|end|>, and IGNORE_INDEX (-100) elsewhere (headers, system and user messages, separators).
    Labels are not shifted: the loss predicts labels[i + 1] from position i.
    """
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in _pieces(tok, messages):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_prompt(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of the conversation so far followed by the assistant header: generate the reply from here
    (== tok.encode(render(messages, add_generation_prompt=True)))."""
    ids = [i for piece, _ in _pieces(tok, messages) for i in piece]
    if messages:
        ids += tok.encode(SEPARATOR, allowed_special=False)
    return ids + [tok.special_tokens[ASSISTANT]]


def encode_response(tok: Tokenizer, content: str) -> list[int]:
    """Ids of one assistant reply as it follows encode_prompt: its text and the closing <|end|>.

    encode_prompt(tok, msgs) + encode_response(tok, reply) == encode_chat(tok, msgs + [assistant reply])[0].
    """
    check_messages([{"role": "assistant", "content": content}])
    return tok.encode(content) + [end_id(tok)]


def hf_tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json entries for the chat format (empty when `tok` has no chat tokens)."""
    return {"chat_template": CHAT_TEMPLATE} if has_chat_tokens(tok) else {}


__all__ = [
    "ASSISTANT", "CHAT_TEMPLATE", "CHAT_TOKENS", "END", "IGNORE_INDEX", "PAD", "ROLES", "SEPARATOR", "SYSTEM", "USER",
    "Message", "add_chat_tokens", "check_messages", "encode_chat", "encode_prompt", "encode_response", "end_id",
    "has_chat_tokens", "hf_tokenizer_config", "render", "require_chat_tokens",
]
