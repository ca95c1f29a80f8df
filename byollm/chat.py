"""A chat session with a chat model (`byollm chat CKPT`): one trained here, or an imported instruct model.

The session keeps the conversation (an optional system message, then user and assistant turns), renders it
in the model's own chat format exactly as training did (`byollm.tokenizer.chat_format`: byollm's template for a
model trained here, the tokenizer's Jinja template, e.g. SmolLM2's ChatML, for an imported one; the history
followed by the assistant header), and streams the reply with the generator until the model writes the
format's end of turn (<|end|>, <|im_end|>, ...). The reply is added to the history, so the next question sees
the whole conversation. When the history no longer fits the model's context (block_size), the oldest turns
are dropped (the system message stays).

    session = ChatSession(model, tok, SamplingParams(temperature=0.7), system="Be brief.")
    for piece in session.reply("What is the capital of France?"):
        print(piece, end="", flush=True)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

import torch.nn as nn

from byollm.errors import ByollmError
from byollm.generate import iter_generate
from byollm.sampling import SamplingParams
from byollm.tokenizer.base import Tokenizer
from byollm.tokenizer.chat_format import chat_format


class ChatSession:
    """The conversation so far, and how to get the model's next reply to it."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, params: SamplingParams | None = None, *,
                 system: str | None = None) -> None:
        self.format = chat_format(tokenizer)  # TokenizerError when the model has no chat template
        self.model, self.tokenizer = model, tokenizer
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.7)
        self.params.stop_token_ids = self.format.stop_ids
        self.system = system
        self.history: list[dict[str, str]] = []
        self.notices: list[str] = []  # what the session had to do (history dropped, sliding window)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> tuple[list[int], bool]:
        """Prompt ids for the history, dropping the oldest turns while it does not fit; (ids, sliding window)."""
        config = self.model.config
        budget = config.block_size - self.params.max_new_tokens
        ids = self.format.encode_prompt(self.history)
        head = 1 if self.history and self.history[0]["role"] == "system" else 0
        dropped = 0
        while len(ids) > budget and len(self.history) - head > 1:
            del self.history[head]  # the oldest turn; then its replies, so the history starts with a user turn
            dropped += 1
            while len(self.history) - head > 1 and self.history[head]["role"] == "assistant":
                del self.history[head]
                dropped += 1
            ids = self.format.encode_prompt(self.history)
        if dropped:
            self.notices.append(f"dropped the {dropped} oldest message(s) to fit the context of "
                                f"{config.block_size} tokens")
        sliding = config.pos_embedding == "learned" and len(ids) > budget
        if sliding:
            self.notices.append(f"the prompt ({len(ids)} tokens) + max_new_tokens exceeds block_size="
                                f"{config.block_size}: using a sliding context window")
        return ids, sliding

    def reply(self, user: str) -> Iterator[str]:
        """Add the user's message, then yield the reply's text piece by piece; the whole reply joins the history."""
        self.history.append({"role": "user", "content": user})
        try:
            self.format.check_messages(self.history[-1:])
            ids, sliding = self._prompt()
        except ByollmError:
            self.history.pop()
            raise
        pieces = []
        for event in iter_generate(self.model, [ids], self.params, tokenizer=self.tokenizer, sliding_window=sliding):
            if event.text:
                pieces.append(event.text)
                yield event.text
        self.history.append({"role": "assistant", "content": "".join(pieces)})


HELP = "commands: /reset (forget the conversation), /exit (quit); anything else is your message"


def run_chat(session: ChatSession, lines: TextIO | None = None, out: TextIO | None = None, *,
             interactive: bool | None = None, err: TextIO | None = None) -> int:
    """Read messages line by line from `lines` (stdin), stream replies to `out` (stdout); returns the number
    of replies.

    interactive (default: whether `lines` is a terminal) shows "you> " prompts; piped input gets each reply
    followed by a newline and nothing else on stdout, so the output can be read by programs and tests.
    """
    lines, out, err = lines or sys.stdin, out or sys.stdout, err or sys.stderr  # looked up now: tests swap them
    interactive = lines.isatty() if interactive is None else interactive
    if interactive:
        print(f"[byollm] chat; {HELP}", file=err)
    replies = 0
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        command = text.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            print("[byollm] conversation reset", file=err)
            continue
        if command in ("/help", "/?"):
            print(HELP, file=err)
            continue
        if not command:
            continue
        if interactive:
            out.write("assistant> ")
        try:
            for piece in session.reply(text):
                out.write(piece)
                out.flush()
        except ByollmError as e:  # e.g. a control token typed into the message: say so and go on
            print(f"byollm: error: {e}", file=err)
            continue
        out.write("\n")
        out.flush()
        replies += 1
        for notice in session.notices:
            print(f"[byollm] {notice}", file=err)
        session.notices.clear()
    return replies
