"""load_tokenizer: open any saved tokenizer directory, whichever class wrote it."""

from __future__ import annotations

from pathlib import Path

from byollm.errors import TokenizerError
from byollm.tokenizer.base import META_FILE, Tokenizer, read_json
from byollm.tokenizer.bpe import BPETokenizer
from byollm.tokenizer.char import CharTokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer from `directory`, deciding the class from the files in it.

    1. byollm_tokenizer.json (written by our save()) names the type: "char", "bpe" or "fast".
    2. Otherwise tokenizer.json (Hugging Face) loads as a FastTokenizer.
    3. Otherwise vocab.json + merges.txt (the original GPT-2 layout) loads as a BPETokenizer.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist; train or save a tokenizer there first")
    if (directory / META_FILE).exists():
        kind = read_json(directory / META_FILE).get("type")
        if kind == "char":
            return CharTokenizer.load(directory)
        if kind == "bpe":
            return BPETokenizer.load(directory)
        if kind == "fast":
            from byollm.tokenizer.fast import FastTokenizer

            return FastTokenizer.load(directory)
        raise TokenizerError(f"{directory / META_FILE} names an unknown tokenizer type {kind!r}")
    if (directory / "tokenizer.json").exists():
        from byollm.tokenizer.fast import FastTokenizer

        return FastTokenizer.load(directory)
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        return BPETokenizer.load(directory)
    raise TokenizerError(
        f"{directory} holds no tokenizer: expected {META_FILE} (byollm), tokenizer.json (Hugging Face) "
        "or vocab.json + merges.txt (GPT-2)"
    )
