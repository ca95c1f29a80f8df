"""The interface every byollm tokenizer implements, and the small pieces they share.

A tokenizer turns text into a list of integer ids and back. Besides the ordinary vocabulary it has *special
tokens* such as "<|endoftext|>": strings that never come out of ordinary text splitting but map to one id of
their own. Some of them play a *role* the rest of the code needs to know about: bos (begin of sequence),
eos (end of sequence) and pad. GPT-2 uses its single "<|endoftext|>" token as both bos and eos.
"""

from __future__ import annotations

import codecs
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import regex

from byollm.errors import TokenizerError

if TYPE_CHECKING:  # pragma: no cover - only for type hints
    import tokenizers

# Our own small description of a saved tokenizer: which class wrote it and its special tokens.
META_FILE = "byollm_tokenizer.json"
FORMAT_VERSION = 1

# When nobody says which special token is bos/eos/pad, we pick the first conventional name that exists.
_ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "<|endoftext|>"),
    "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|endoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
}


_KEEP: Any = object()  # set_roles: "leave this role as it is"


def guess_roles(special_tokens: Iterable[str]) -> dict[str, str | None]:
    """Pick bos/eos/pad among `special_tokens` by their conventional names (None when there is none)."""
    present = set(special_tokens)
    return {role: next((t for t in names if t in present), None) for role, names in _ROLE_CANDIDATES.items()}


def split_on_special(text: str, special_tokens: Iterable[str]) -> list[tuple[str, bool]]:
    """Cut `text` into (piece, is_special) parts so that special tokens can be looked up as a whole.

    >>> split_on_special("a<|endoftext|>b", ["<|endoftext|>"])
    [('a', False), ('<|endoftext|>', True), ('b', False)]
    """
    specials = sorted(set(special_tokens), key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
    if not specials or not any(s in text for s in specials):
        return [(text, False)] if text else []
    pattern = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
    # With one capture group, re.split alternates: text, special, text, special, ..., text.
    parts = pattern.split(text)
    return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]


class Tokenizer(ABC):
    """What the rest of byollm relies on: encode/decode, special tokens and their roles, save/load.

    Subclasses fill `special_tokens` (name -> id) and implement the abstract methods.
    """

    special_tokens: dict[str, int]
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    # Extra tokenizer_config.json entries to write back in save_hf (FastTokenizer keeps an imported one's).
    hf_config: dict[str, Any] = {}  # noqa: RUF012 - read only; instances assign their own dict

    def _init_roles(self, roles: dict[str, str | None] | None) -> None:
        """Use the given roles, or guess them from the special tokens' names."""
        roles = guess_roles(self.special_tokens) if roles is None else roles
        self.bos_token = self.eos_token = self.pad_token = None
        self.set_roles(bos=roles.get("bos"), eos=roles.get("eos"), pad=roles.get("pad"))

    def set_roles(self, *, bos: str | None = _KEEP, eos: str | None = _KEEP, pad: str | None = _KEEP) -> None:
        """Say which special tokens are bos, eos and pad (None: no such token; a role not given is kept)."""
        new = {"bos": self.bos_token if bos is _KEEP else bos, "eos": self.eos_token if eos is _KEEP else eos}
        new["pad"] = self.pad_token if pad is _KEEP else pad
        for role, token in new.items():
            if token is not None and token not in self.special_tokens:
                raise TokenizerError(
                    f"cannot use {token!r} as the {role} token: it is not one of this tokenizer's special tokens "
                    f"{sorted(self.special_tokens)}; add it first with add_special_tokens([{token!r}])"
                )
        self.bos_token, self.eos_token, self.pad_token = new["bos"], new["eos"], new["pad"]

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.special_tokens[self.bos_token]

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.special_tokens[self.eos_token]

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.special_tokens[self.pad_token]

    # --- what each tokenizer implements -------------------------------------------------------------------

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: every id is in range(vocab_size)."""

    @abstractmethod
    def encode(self, text: str, *, allowed_special: bool = True) -> list[int]:
        """Text -> ids. With allowed_special=False, special token strings are encoded as plain text."""

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Ids -> text. Byte-level tokenizers replace incomplete UTF-8 with U+FFFD, like bytes.decode does."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry for an id, as the tokenizer spells it (e.g. 'Ġthe' in byte-level BPE)."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry spelled as id_to_token spells it, or None."""

    @abstractmethod
    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Add special tokens at the end of the vocabulary (known ones keep their id); return their ids."""

    @abstractmethod
    def to_hf(self) -> tokenizers.Tokenizer:
        """The same tokenizer as a `tokenizers.Tokenizer`, for tokenizer.json and Hugging Face transformers."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the tokenizer to `directory`; load it back with `byollm.tokenizer.load_tokenizer`."""

    @abstractmethod
    def save_hf(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers.

        `transformers.AutoTokenizer.from_pretrained(directory)` then gives the same ids as our encode (and our
        chat template when the tokenizer has the chat tokens). Implemented by `hf_files.write_hf_files`.
        """

    # --- shared behaviour ---------------------------------------------------------------------------------

    def encode_batch(self, texts: Iterable[str], *, allowed_special: bool = True) -> list[list[int]]:
        return [self.encode(text, allowed_special=allowed_special) for text in texts]

    @property
    def supports_bytes(self) -> bool:
        """Whether decode_bytes works: every token is a fixed byte string, so decoding can be incremental."""
        return False

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        """Ids -> the raw UTF-8 bytes they stand for (possibly ending in the middle of a character)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode to bytes; use decode() or StreamDecoder")

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"token id {i} is out of range for this tokenizer (vocab_size {self.vocab_size}); "
                    "were these ids made by a different tokenizer?"
                )

    def _meta(self, kind: str) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "type": kind,
            "special_tokens": self.special_tokens,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
        }

    def _write_meta(self, directory: Path, kind: str) -> None:
        write_json(directory / META_FILE, self._meta(kind))


class StreamDecoder:
    """Decode ids one at a time, e.g. while a model generates, yielding only complete characters.

    A byte-level token can end in the middle of a multi-byte UTF-8 character (an emoji is often 2-4 tokens),
    so printing decode([id]) per token would show garbage. For tokenizers whose tokens are bytes we feed an
    incremental UTF-8 decoder, which holds back an unfinished character. For the others we decode a short
    window of recent ids and only emit text once it no longer ends in U+FFFD (the replacement character).

    Example:

        stream = StreamDecoder(tok)
        for token_id in generated_ids:
            print(stream.put(token_id), end="", flush=True)
        print(stream.flush())
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.supports_bytes else None
        # Window state for the text path: ids[prefix:read] were already emitted, ids[read:] are pending.
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def put(self, token_id: int) -> str:
        """Take one id; return the text it completes (often '', sometimes several characters)."""
        if self._utf8 is not None:
            return self._utf8.decode(self.tokenizer.decode_bytes([token_id], skip_special=self.skip_special))
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        # Decoding with a little context before the new ids keeps tokenizers that drop a leading space happy.
        seen = decode(self._ids[self._prefix : self._read], skip_special=self.skip_special)
        text = decode(self._ids[self._prefix :], skip_special=self.skip_special)
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            del self._ids[: self._prefix]  # forget ids we no longer need as context
            self._read -= self._prefix
            self._prefix = 0
            return text[len(seen) :]
        return ""

    def flush(self) -> str:
        """End of stream: return whatever is still held back (broken UTF-8 becomes U+FFFD)."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        decode = self.tokenizer.decode
        seen = decode(self._ids[self._prefix : self._read], skip_special=self.skip_special)
        text = decode(self._ids[self._prefix :], skip_special=self.skip_special)
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(seen) :]


def stream_decode(tokenizer: Tokenizer, ids: Iterable[int], *, skip_special: bool = False) -> Iterator[str]:
    """Yield the text of `ids` piece by piece as it becomes complete (see StreamDecoder)."""
    stream = StreamDecoder(tokenizer, skip_special=skip_special)
    for token_id in ids:
        if piece := stream.put(token_id):
            yield piece
    if rest := stream.flush():
        yield rest


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TokenizerError(f"tokenizer file {path} is missing; save the tokenizer again") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON ({e}); save the tokenizer again") from e


def check_new_special_tokens(tokens: Iterable[str]) -> list[str]:
    """Validate special tokens given by a user: non-empty strings, duplicates dropped, order kept."""
    out: list[str] = []
    for t in tokens:
        if not isinstance(t, str) or not t:
            raise TokenizerError(f"special tokens must be non-empty strings, got {t!r}")
        if t not in out:
            out.append(t)
    return out
