"""Character-level tokenizer: one id per character, as in nanoGPT's shakespeare_char.

The simplest tokenizer there is: the vocabulary is the sorted set of characters in the training text, so
"hello" is five ids. Sequences are long and any character not seen in training cannot be encoded, which is
why real models use BPE (bpe.py); but it is a fine start and trains tiny models on Tiny Shakespeare.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from byollm.errors import TokenizerError
from byollm.tokenizer.base import (
    META_FILE,
    Tokenizer,
    check_new_special_tokens,
    read_json,
    split_on_special,
    write_json,
)
from byollm.tokenizer.hf_files import add_special_tokens_to_hf, write_hf_files

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers


class CharTokenizer(Tokenizer):
    """Characters get ids 0..len(chars)-1 in the given order; special tokens come after them."""

    def __init__(
        self,
        chars: Sequence[str],
        special_tokens: Sequence[str] = (),
        *,
        roles: dict[str, str | None] | None = None,
    ) -> None:
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("a character vocabulary must be distinct single characters")
        self.chars = list(chars)
        self._char_to_id = {c: i for i, c in enumerate(self.chars)}
        self.special_tokens: dict[str, int] = {}
        self.add_special_tokens(special_tokens)
        self._init_roles(roles)

    @classmethod
    def train(cls, text: str | Iterable[str], *, special_tokens: Sequence[str] = ()) -> CharTokenizer:
        """The vocabulary is every character of `text` (special token strings excepted), sorted."""
        special_tokens = check_new_special_tokens(special_tokens)
        chars: set[str] = set()
        for t in [text] if isinstance(text, str) else text:
            for piece, is_special in split_on_special(t, special_tokens):
                if not is_special:
                    chars.update(piece)
        if not chars:
            raise TokenizerError("cannot train a character tokenizer on empty text")
        return cls(sorted(chars), special_tokens)

    def encode(self, text: str, *, allowed_special: bool = True) -> list[int]:
        ids = []
        for piece, is_special in split_on_special(text, self.special_tokens if allowed_special else ()):
            if is_special:
                ids.append(self.special_tokens[piece])
                continue
            try:
                ids.extend(self._char_to_id[c] for c in piece)
            except KeyError as e:
                c = e.args[0]
                raise TokenizerError(
                    f"character {c!r} (U+{ord(c):04X}) is not in this character-level tokenizer's vocabulary of "
                    f"{len(self.chars)} characters; train it on text that contains it, or use a BPE tokenizer, "
                    "which can encode any text"
                ) from None
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        self._check_ids(ids)
        n = len(self.chars)
        special = {i: t for t, i in self.special_tokens.items()}
        return "".join(self.chars[i] if i < n else ("" if skip_special else special[i]) for i in ids)

    @property
    def supports_bytes(self) -> bool:
        return True

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        return self.decode(ids, skip_special=skip_special).encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def id_to_token(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self.decode([token_id])

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token, self._char_to_id.get(token))

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        for t in (new := check_new_special_tokens(tokens)):
            if t in self._char_to_id:
                raise TokenizerError(f"cannot add special token {t!r}: it is already an ordinary character")
            self.special_tokens.setdefault(t, self.vocab_size)
        return [self.special_tokens[t] for t in new]

    def to_hf(self) -> tokenizers.Tokenizer:
        """A WordLevel model whose "words" are single characters (a regex splits text into characters).

        Like our encode, it refuses unknown characters: its unk token "<unk>" is not in the vocabulary,
        so tokenizers raises an error (unless you made "<unk>" a special token; then that id is used).
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        vocab = {**self._char_to_id, **self.special_tokens}
        tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        tok.decoder = decoders.Fuse()  # join the characters back without spaces
        return add_special_tokens_to_hf(tok, self.special_tokens)

    def save(self, directory: str | Path) -> None:
        """Write vocab.json (character -> id), our meta file (special tokens) and the HF files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / "vocab.json", self._char_to_id)
        self._write_meta(directory, "char")
        self.save_hf(directory)

    def save_hf(self, directory: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        write_hf_files(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> CharTokenizer:
        directory = Path(directory)
        meta = read_json(directory / META_FILE)
        char_to_id: dict[str, int] = read_json(directory / "vocab.json")
        chars = sorted(char_to_id, key=char_to_id.__getitem__)
        specials = sorted(meta["special_tokens"], key=meta["special_tokens"].__getitem__)
        tok = cls(chars, specials, roles={r: meta.get(f"{r}_token") for r in ("bos", "eos", "pad")})
        if [char_to_id[c] for c in chars] != list(range(len(chars))) or tok.special_tokens != meta["special_tokens"]:
            raise TokenizerError(f"{directory} has inconsistent character/special token ids; save it again")
        return tok
