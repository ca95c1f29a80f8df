"""Tokenizers: character-level, byte-level BPE from scratch, and the Hugging Face `tokenizers` fast path.

Example:

    from byollm.tokenizer import BPETokenizer, load_tokenizer
    tok = BPETokenizer.train(open("input.txt", encoding="utf-8").read(), vocab_size=1024)
    ids = tok.encode("To be, or not to be")
    assert tok.decode(ids) == "To be, or not to be"
    tok.save("out/tok")
    tok = load_tokenizer("out/tok")
"""

from byollm.tokenizer.base import META_FILE, StreamDecoder, Tokenizer, guess_roles, split_on_special, stream_decode
from byollm.tokenizer.bpe import GPT2_SPLIT_PATTERN, BPETokenizer, bytes_to_unicode
from byollm.tokenizer.char import CharTokenizer
from byollm.tokenizer.chat_format import ChatFormat, chat_format, has_chat_format
from byollm.tokenizer.chat_template import add_chat_tokens, encode_chat, encode_prompt, has_chat_tokens, render
from byollm.tokenizer.loading import load_tokenizer
from byollm.tokenizer.train import train_tokenizer


def __getattr__(name: str):
    # The fast path imports `tokenizers` (Rust); load it only when asked for.
    if name in ("FastTokenizer", "train_bpe_fast"):
        from byollm.tokenizer import fast

        return getattr(fast, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "GPT2_SPLIT_PATTERN",
    "META_FILE",
    "BPETokenizer",
    "CharTokenizer",
    "ChatFormat",
    "FastTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "add_chat_tokens",
    "bytes_to_unicode",
    "chat_format",
    "encode_chat",
    "encode_prompt",
    "guess_roles",
    "has_chat_format",
    "has_chat_tokens",
    "load_tokenizer",
    "render",
    "split_on_special",
    "stream_decode",
    "train_bpe_fast",
    "train_tokenizer",
]
