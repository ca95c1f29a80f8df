"""Tokenise a dataset once into memory-mapped token shards that training reads without loading them.

    >>> out = prepare("tinyshakespeare", "char", "data/shakespeare_char")
    >>> train = load_split(out, "train")          # np.memmap of uint16 token ids

An output directory holds
  train.bin, val.bin   the token ids, one after the other, as raw uint16 (vocab_size <= 65536) or uint32
  meta.json            dataset, source file and sha256, tokenizer, dtype, token/byte counts, split rule, version
  tokenizer/           the tokenizer that made the ids (load it with byollm.tokenizer.load_tokenizer)

The split is fixed and documented in meta.json:
  text          the first 90% of the CHARACTERS train, the last 10% val, cut at int(len(text) * 0.9), exactly
                as nanoGPT does, so Tiny Shakespeare losses compare with nanoGPT's;
  text_splits   the official train.txt / validation.txt (WikiText); test.txt is left out;
  records       a seeded split by record index (readers.split_records), each record one document
                (readers.record_to_text) followed by the eos token.
Tokenizer spec: "char" (character vocabulary of the WHOLE text, as nanoGPT; a vocabulary is only a list of
symbols and val must be encodable; Tiny Shakespeare has 65 characters in either split, so the vocabulary is
the same), "bpe:N" (byte-level BPE with N ids trained on the TRAIN split with the fast path), or the
directory of an existing tokenizer (or a Tokenizer object).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from byollm.atomic import atomic_dir_write
from byollm.data.readers import record_to_text, source_records, source_text, split_records, text_splits
from byollm.data.sources import Source, resolve
from byollm.errors import DataError
from byollm.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

logger = logging.getLogger("byollm.data")

META = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
EOT = "<|endoftext|>"
CHUNK_CHARS = 1 << 20  # encode long texts ~1M characters at a time
_BPE_SPEC = re.compile(r"^bpe:(\d+)$")


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def text_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut `text` into pieces of about `size` characters, only just before a newline that follows a letter
    or digit. Byte-level BPE pre-tokenizers (GPT-2, Llama 3) always split there, so encoding the pieces one
    by one gives exactly the ids of encoding the whole text at once, without holding them all in memory."""
    start, n = 0, len(text)
    while n - start > size:
        cut = text.rfind("\n", start + 1, start + size)
        while cut > start and not text[cut - 1].isalnum():
            cut = text.rfind("\n", start + 1, cut)
        if cut <= start:  # no safe cut in this window: take the next one after it
            m = re.compile(r"(?<=[^\W_])\n").search(text, start + size)
            cut = m.start() if m else n
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _write_ids(fh: BinaryIO, ids: list[int], dtype: np.dtype) -> int:
    np.asarray(ids, dtype=dtype).tofile(fh)
    return len(ids)


def _encode_text(tok: Tokenizer, text: str, fh: BinaryIO, dtype: np.dtype, chunk_chars: int) -> int:
    # allowed_special=False: a literal "<|endoftext|>" in the data is text, not the special token.
    return sum(_write_ids(fh, tok.encode(c, allowed_special=False), dtype) for c in text_chunks(text, chunk_chars))


def _encode_docs(tok: Tokenizer, docs: list[str], sep: list[int], fh: BinaryIO, dtype: np.dtype) -> int:
    n = 0
    for i in range(0, len(docs), 1024):
        ids: list[int] = []
        for doc_ids in tok.encode_batch(docs[i : i + 1024], allowed_special=False):
            ids += doc_ids + sep
        n += _write_ids(fh, ids, dtype)
    return n


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# --------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------


@dataclass
class _Splits:
    """The dataset cut into train and val, as text (one document) or as lists of documents."""

    kind: str  # "text" or "records"
    train: list[str]
    val: list[str]
    rule: dict[str, Any]


def _split(source: Source, val_fraction: float, seed: int) -> _Splits:
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if source.format == "text_splits":
        assert source.path is not None
        parts = text_splits(source.path)
        rule = {"rule": "official", "description": "the published train.txt / validation.txt; test.txt unused"}
        return _Splits("text", [parts["train"]], [parts["val"]], rule)
    if source.text is not None or source.format in ("text", "text_dir"):
        text = source_text(source)
        if len(text) < 2:
            raise DataError(f"{source.name} has {len(text)} characters of text; need more to split it")
        cut = int(len(text) * (1 - val_fraction))
        rule = {
            "rule": "characters",
            "description": f"first {1 - val_fraction:.0%} of the characters train, the rest val "
            f"(cut at int(len(text) * {1 - val_fraction:g}), as nanoGPT)",
            "val_fraction": val_fraction,
            "total_chars": len(text),
            "cut_char": cut,
        }
        return _Splits("text", [text[:cut]], [text[cut:]], rule)
    records = source_records(source)
    docs = [record_to_text(r, f"{source.path} record {i}") for i, r in enumerate(records)]
    train_idx, val_idx = split_records(len(docs), val_fraction, seed)
    rule = {
        "rule": "records",
        "description": f"val = the first round(n * {val_fraction:g}) of numpy.random.default_rng({seed})"
        f".permutation(n) (byollm.data.split_records); each record one document followed by eos",
        "val_fraction": val_fraction,
        "seed": seed,
        "records": len(docs),
    }
    return _Splits("records", [docs[i] for i in train_idx], [docs[i] for i in val_idx], rule)


def _tokenizer_for(spec: str | Path | Tokenizer, splits: _Splits) -> tuple[Tokenizer, str]:
    """Make or load the tokenizer; return it with a note on what it was trained on."""
    specials = (EOT,) if splits.kind == "records" else ()  # documents need a separator; plain text does not
    if isinstance(spec, Tokenizer):
        return spec, "given"
    text_spec = str(spec)
    if text_spec == "char":
        tok = CharTokenizer.train(splits.train + splits.val, special_tokens=specials)
        return tok, "whole text (train + val), as nanoGPT"
    if m := _BPE_SPEC.match(text_spec):
        from byollm.tokenizer import train_bpe_fast

        tok = train_bpe_fast(
            (c for doc in splits.train for c in text_chunks(doc)), int(m.group(1)), special_tokens=(EOT,)
        )
        return tok, "train split"
    if Path(text_spec).expanduser().is_dir():
        return load_tokenizer(Path(text_spec).expanduser()), f"loaded from {text_spec}"
    if is_hub_tokenizer(text_spec):
        return hub_tokenizer(text_spec), f"Hugging Face Hub {HUB_TOKENIZERS.get(text_spec, text_spec)}"
    raise DataError(
        f"unknown tokenizer {text_spec!r}: use 'char', 'bpe:N' (e.g. bpe:4096), 'gpt2', 'hf:REPO' or the directory "
        "of a saved tokenizer"
    )


# Tokenizer specs that name a Hugging Face Hub tokenizer (its tokenizer.json, read with `tokenizers`).
HUB_TOKENIZERS = {"gpt2": "openai-community/gpt2"}


def is_hub_tokenizer(spec: str) -> bool:
    """"gpt2" or "hf:REPO" (and not a folder of that name, which load_tokenizer reads)."""
    return (spec in HUB_TOKENIZERS or spec.startswith("hf:")) and not Path(spec).expanduser().is_dir()


def hub_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer.json of a Hub repository ("gpt2" = openai-community/gpt2, or "hf:REPO"), downloaded once
    into the Hugging Face cache by `tokenizers` (HF_HUB_OFFLINE=1 uses the cache only)."""
    repo = HUB_TOKENIZERS.get(spec) or spec.removeprefix("hf:")
    from tokenizers import Tokenizer as HFTokenizer

    from byollm.tokenizer import FastTokenizer

    try:
        hf = HFTokenizer.from_pretrained(repo)
    except Exception as e:  # no network, unknown repository, no tokenizer.json
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise DataError(
            f"cannot load the tokenizer {spec!r} (tokenizer.json of the Hugging Face repository {repo}): {reason}; "
            f"where there is network, save it once with python -c \"from byollm.data.prepare import hub_tokenizer; "
            f"hub_tokenizer('{spec}').save('tokenizers/{repo.split('/')[-1]}')\" and pass that folder as the tokenizer"
        ) from e
    return FastTokenizer(hf)


def prepare(
    name_or_path: str | Path | Source,
    tokenizer: str | Path | Tokenizer,
    out_dir: str | Path,
    *,
    path: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 1337,
    allow_download: bool = True,
    allow_fallback: bool = False,
    chunk_chars: int = CHUNK_CHARS,
) -> Path:
    """`byollm data prepare NAME --tokenizer SPEC --out DIR`: tokenise a dataset into DIR; return DIR.

    name_or_path: a registry name or a local file/directory (`path` overrides where a named dataset is read),
        or a `Source` already resolved.
    tokenizer: "char", "bpe:N", a tokenizer directory, or a Tokenizer. seed: the record split's seed
    (text datasets are split by position). allow_fallback: see load_text. DIR is replaced atomically.
    """
    from byollm import __version__

    source = name_or_path if isinstance(name_or_path, Source) else resolve(
        name_or_path, path=path, allow_download=allow_download, allow_fallback=allow_fallback)
    splits = _split(source, val_fraction, seed)
    tok, trained_on = _tokenizer_for(tokenizer, splits)
    dtype = token_dtype(tok.vocab_size)
    sep: list[int] = []
    if splits.kind == "records":
        sep = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n\n", allowed_special=False)

    def write(tmp: Path) -> None:
        stats: dict[str, Any] = {}
        for split, docs in (("train", splits.train), ("val", splits.val)):
            t0 = time.perf_counter()
            with open(tmp / f"{split}.bin", "wb") as fh:
                if splits.kind == "text":
                    n_tok = sum(_encode_text(tok, d, fh, dtype, chunk_chars) for d in docs)
                else:
                    n_tok = _encode_docs(tok, docs, sep, fh, dtype)
            if n_tok == 0:
                raise DataError(f"the {split} split of {source.name} has no tokens; use a larger dataset")
            n_bytes = sum(len(d.encode("utf-8")) for d in docs)
            stats[split] = {
                "file": f"{split}.bin",
                "tokens": n_tok,
                "documents": len(docs),
                "chars": sum(len(d) for d in docs),
                "bytes": n_bytes,  # UTF-8 bytes of the split's text, separators not counted
                "bytes_per_token": n_bytes / n_tok,
            }
            logger.info("%s: %s tokens (%.1f s)", split, f"{n_tok:,}", time.perf_counter() - t0)
        tok.save(tmp / TOKENIZER_DIR)
        meta = {
            "format_version": FORMAT_VERSION,
            "byollm_version": __version__,
            "python": ".".join(map(str, sys.version_info[:3])),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "dataset": source.name,
            "source": source.describe(),
            "kind": splits.kind,
            "tokenizer": {
                "spec": str(tokenizer) if not isinstance(tokenizer, Tokenizer) else "given",
                "type": _tokenizer_type(tmp / TOKENIZER_DIR, tok),
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "trained_on": trained_on,
                "dir": TOKENIZER_DIR,
            },
            "dtype": dtype.name,
            "split": splits.rule,
            "document_separator": sep if splits.kind == "records" else None,
            "splits": stats,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    out = _atomic_dir(Path(out_dir), write)
    logger.info("prepared %s with a %s tokenizer (%d ids) -> %s", source.name, tokenizer, tok.vocab_size, out)
    return out


def _tokenizer_type(directory: Path, tok: Tokenizer) -> str:
    from byollm.tokenizer import META_FILE

    try:
        return json.loads((directory / META_FILE).read_text(encoding="utf-8"))["type"]
    except (OSError, ValueError, KeyError):
        return type(tok).__name__


def _atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) then rename tmp to target, so a crash never leaves half a dataset behind.

    An existing target is replaced only if it is a prepared dataset (has meta.json), so a wrong --out
    never deletes your files.
    """
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / META).is_file())):
        raise DataError(f"{target} exists and is not a prepared dataset directory; choose another output directory")
    return atomic_dir_write(target, write)


# --------------------------------------------------------------------------------------------------
# Reading prepared data
# --------------------------------------------------------------------------------------------------


def read_meta(prepared_dir: str | Path) -> dict[str, Any]:
    d = Path(prepared_dir)
    path = d / META
    if not path.is_file():
        raise DataError(
            f"{d} is not a prepared dataset (no {META}); make one with `byollm data prepare NAME --tokenizer char`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION or "splits" not in meta:
        raise DataError(f"{path} is not a byollm prepared-data meta file (format {FORMAT_VERSION}); prepare again")
    return meta


def load_split(prepared_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split ("train" or "val") as a read-only memmap, after checking its size."""
    d = Path(prepared_dir)
    meta = read_meta(d)
    if split not in meta["splits"]:
        raise DataError(f"{d} has no split {split!r}; it has {', '.join(meta['splits'])}")
    info = meta["splits"][split]
    dtype = np.dtype(meta["dtype"])
    path = d / info["file"]
    if not path.is_file():
        raise DataError(f"{path} is missing; prepare the dataset again")
    expected, actual = info["tokens"] * dtype.itemsize, path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{path} has {actual:,} bytes but {META} says {info['tokens']:,} {dtype.name} tokens ({expected:,} bytes): "
            "the file is truncated or from another prepare run; prepare the dataset again"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))


@dataclass
class Prepared:
    """A prepared dataset directory, opened: its meta, both splits (memmaps) and its tokenizer."""

    path: Path
    meta: dict[str, Any]
    train: np.memmap
    val: np.memmap
    tokenizer: Tokenizer

    def bits_per_byte(self, loss: float, split: str = "val") -> float:
        return bits_per_byte(loss, self.meta, split)


def load_prepared(prepared_dir: str | Path) -> Prepared:
    d = Path(prepared_dir)
    meta = read_meta(d)
    tok = load_tokenizer(d / meta["tokenizer"]["dir"])
    if tok.vocab_size != meta["tokenizer"]["vocab_size"]:
        raise DataError(f"{d / TOKENIZER_DIR} has {tok.vocab_size} ids but {META} says "
                        f"{meta['tokenizer']['vocab_size']}; prepare the dataset again")
    return Prepared(d, meta, load_split(d, "train"), load_split(d, "val"), tok)


def bits_per_byte(loss: float, meta: dict[str, Any], split: str = "val") -> float:
    """Mean cross-entropy per token (nats) -> bits per UTF-8 byte of the split's text.

    bpb = loss * tokens / bytes / ln 2: comparable across tokenizers, unlike loss per token. `loss` must be
    the mean over the whole split (e.g. SequentialSampler); a sampled estimate gives an estimate.
    """
    info = meta["splits"][split]
    return loss * info["tokens"] / info["bytes"] / math.log(2)

