"""The fast path: Hugging Face `tokenizers` (Rust) behind our Tokenizer interface.

`train_bpe_fast` trains the same byte-level BPE as BPETokenizer.train (same merges, same ids; the tests
check it) in a fraction of the time on big corpora. `FastTokenizer` also loads any Hugging Face
tokenizer.json, e.g. the tokenizer of an imported checkpoint such as SmolLM or Llama.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from byollm.errors import TokenizerError
from byollm.tokenizer.base import META_FILE, Tokenizer, check_new_special_tokens, read_json, split_on_special
from byollm.tokenizer.bpe import check_bpe_vocab_size, from_byte_level
from byollm.tokenizer.hf_files import write_hf_files

CHAT_TEMPLATE_FILE = "chat_template.jinja"


class FastTokenizer(Tokenizer):
    """Wraps a `tokenizers.Tokenizer`. Its special tokens are its added tokens marked special."""

    def __init__(self, tokenizer: HFTokenizer, *, roles: dict[str, str | None] | None = None) -> None:
        self.hf = tokenizer
        self.special_tokens = {
            t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special
        }
        # Some configs name a bos/eos token that is an ordinary vocabulary entry ("</s>" in older
        # SentencePiece models): it still plays the role, so list it with the special tokens.
        for token in (roles or {}).values():
            if token is not None and token not in self.special_tokens:
                if (i := tokenizer.token_to_id(token)) is not None:
                    self.special_tokens[token] = i
        # Byte-level tokenizers (GPT-2, SmolLM, Llama 3, ours) map every token to fixed bytes.
        self._byte_level = isinstance(tokenizer.decoder, decoders.ByteLevel)
        self._id_to_added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        self._init_roles(roles)

    def encode(self, text: str, *, allowed_special: bool = True) -> list[int]:
        return self.encode_batch([text], allowed_special=allowed_special)[0]

    def encode_batch(self, texts: Iterable[str], *, allowed_special: bool = True) -> list[list[int]]:
        # add_special_tokens=False: no bos/eos added by a post-processor; callers add them explicitly.
        # encode_special_tokens=True makes tokenizers treat special token strings as plain text.
        self.hf.encode_special_tokens = not allowed_special
        try:
            return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        except TypeError as e:
            raise TokenizerError(f"cannot encode: the input must be str without lone surrogates ({e})") from e
        finally:
            self.hf.encode_special_tokens = False

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        self._check_ids(ids)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def supports_bytes(self) -> bool:
        return self._byte_level

    def decode_bytes(self, ids: Sequence[int], *, skip_special: bool = False) -> bytes:
        if not self._byte_level:
            return super().decode_bytes(ids, skip_special=skip_special)
        self._check_ids(ids)
        parts = []
        for i in ids:
            if i in self._id_to_added:  # added tokens are plain text, not byte-level symbols
                if not (skip_special and self._id_to_added[i] in self.special_tokens):
                    parts.append(self._id_to_added[i].encode("utf-8"))
            else:
                token = self.hf.id_to_token(i)
                b = from_byte_level(token)
                parts.append(token.encode("utf-8") if b is None else b)
        return b"".join(parts)

    @property
    def vocab_size(self) -> int:
        largest = max([-1, *self._id_to_added])  # added tokens can sit above the model's own ids
        return max(self.hf.get_vocab_size(with_added_tokens=True), largest + 1)

    def id_to_token(self, token_id: int) -> str:
        token = self.hf.id_to_token(token_id)
        if token is None:
            raise TokenizerError(f"token id {token_id} is not in this tokenizer's vocabulary")
        return token

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        new = check_new_special_tokens(tokens)
        self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
        ids = [self.hf.token_to_id(t) for t in new]
        for t, i in zip(new, ids, strict=True):
            self.special_tokens[t] = i
            self._id_to_added[i] = t
        return ids

    def to_hf(self) -> HFTokenizer:
        return self.hf

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json with the HF config files, plus our meta file."""
        directory = Path(directory)
        self.save_hf(directory)
        self._write_meta(directory, "fast")

    def save_hf(self, directory: str | Path) -> None:
        """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
        write_hf_files(self, directory)

    @classmethod
    def load(cls, directory: str | Path) -> FastTokenizer:
        """Load a directory with tokenizer.json: saved by us, or a Hugging Face model's tokenizer files.

        The bos/eos/pad roles come from our meta file, else tokenizer_config.json / special_tokens_map.json,
        else the conventional names (see base.guess_roles).
        """
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{directory} has no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"cannot read {path}: {e}; is it a Hugging Face tokenizer.json?") from e
        fast = cls(tok, roles=_read_roles(directory, tok))
        if (directory / "tokenizer_config.json").exists():
            fast.hf_config = read_json(directory / "tokenizer_config.json")
        # transformers >= 4.50 saves the chat template as its own file, which wins over the config's entry.
        if (directory / CHAT_TEMPLATE_FILE).is_file():
            template = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
            fast.hf_config = {**fast.hf_config, "chat_template": template}
        return fast


def _read_roles(directory: Path, tok: HFTokenizer) -> dict[str, str | None] | None:
    """bos/eos/pad as saved by us or by transformers; None lets the constructor guess from the names."""
    if (directory / META_FILE).exists():
        meta = read_json(directory / META_FILE)
        return {r: meta.get(f"{r}_token") for r in ("bos", "eos", "pad")}
    found: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
        if (directory / name).exists():
            config = read_json(directory / name)
            found.update({k: config[k] for k in ("bos_token", "eos_token", "pad_token") if k in config})
    if not found:
        return None

    def content(value: Any) -> str | None:  # transformers writes either "<s>" or {"content": "<s>", ...}
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) and tok.token_to_id(value) is not None else None

    return {r: content(found.get(f"{r}_token")) for r in ("bos", "eos", "pad")}


def _pieces(texts: Iterable[str], special_tokens: Sequence[str]) -> Iterator[str]:
    """The training text with special tokens cut out, exactly as BPETokenizer.train sees it."""
    for text in texts:
        for piece, is_special in split_on_special(text, special_tokens):
            if not is_special:
                yield piece


def train_bpe_fast(
    texts: str | Iterable[str],
    vocab_size: int,
    *,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 0,
    show_progress: bool = False,
) -> FastTokenizer:
    """Train byte-level BPE with `tokenizers`; same arguments and same result as BPETokenizer.train."""
    special_tokens = check_bpe_vocab_size(vocab_size, special_tokens)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those not in the text
        show_progress=show_progress,
    )
    texts = [texts] if isinstance(texts, str) else texts
    # tokenizers would learn from special token strings inside the text ("<|", "endoftext"); we cut them out.
    tok.train_from_iterator(_pieces(texts, special_tokens), trainer=trainer)
    return FastTokenizer(tok)
