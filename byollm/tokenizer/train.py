"""The tokenizer training entry point the CLI calls (`byollm tokenizer train ...`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from byollm.errors import TokenizerError
from byollm.tokenizer.base import Tokenizer
from byollm.tokenizer.bpe import BPETokenizer
from byollm.tokenizer.char import CharTokenizer

_BLOCK_CHARS = 1 << 20  # feed the trainers ~1M characters at a time, cut at line ends


def read_text_blocks(files: Sequence[str | Path]) -> Iterator[str]:
    """Yield the files' text in blocks of whole lines, so huge corpora never sit in memory at once."""
    for f in files:
        # newline="": keep "\r\n" as it is in the file; the tokenizer should see the real text.
        with open(f, encoding="utf-8", newline="") as fh:
            block: list[str] = []
            size = 0
            try:
                for line in fh:
                    block.append(line)
                    size += len(line)
                    if size >= _BLOCK_CHARS:
                        yield "".join(block)
                        block, size = [], 0
            except UnicodeDecodeError as e:
                raise TokenizerError(f"training file {f} is not UTF-8 text ({e}); convert it to UTF-8") from e
            if block:
                yield "".join(block)


def _check_files(files: Sequence[str | Path]) -> list[Path]:
    if not files:
        raise TokenizerError("no training files given; pass one or more UTF-8 text files")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise TokenizerError(f"training file {p} does not exist (or is not a file)")
        if p.stat().st_size == 0:
            raise TokenizerError(f"training file {p} is empty; give a file with text in it")
    return paths


def train_tokenizer(
    files: Sequence[str | Path],
    vocab_size: int | None,
    *,
    kind: Literal["bpe", "char"] = "bpe",
    impl: Literal["scratch", "fast"] = "scratch",
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 0,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a tokenizer on text files, save it to `out_dir` (if given) and return it.

    kind="bpe" learns byte-level BPE up to `vocab_size` ids (special tokens included), with our own Python
    trainer (impl="scratch") or Hugging Face tokenizers (impl="fast"); both give identical results.
    kind="char" takes every character of the text; its size is set by the data, so vocab_size is ignored.
    """
    paths = _check_files(files)
    if kind == "char":
        if impl != "scratch":
            raise TokenizerError("the character tokenizer has only one implementation; use impl='scratch'")
        tok: Tokenizer = CharTokenizer.train(read_text_blocks(paths), special_tokens=special_tokens)
    elif kind == "bpe":
        if vocab_size is None:
            raise TokenizerError("BPE needs a vocab_size (e.g. 8192); pass one")
        if impl == "scratch":
            tok = BPETokenizer.train(
                read_text_blocks(paths),
                vocab_size,
                special_tokens=special_tokens,
                min_frequency=min_frequency,
                show_progress=show_progress,
            )
        elif impl == "fast":
            from byollm.tokenizer.fast import train_bpe_fast

            tok = train_bpe_fast(
                read_text_blocks(paths),
                vocab_size,
                special_tokens=special_tokens,
                min_frequency=min_frequency,
                show_progress=show_progress,
            )
        else:
            raise TokenizerError(f"unknown tokenizer implementation {impl!r}; use 'scratch' or 'fast'")
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'char'")
    if out_dir is not None:
        tok.save(out_dir)
    return tok
