"""Stream a dataset's documents, tokenise them on the fly and pack them into training batches.

For corpora too big to prepare into shards first (FineWeb-Edu's 10B-token sample): Hugging Face `datasets`
reads the documents with `load_dataset(..., streaming=True)`, from a local file when there is one, else
from the Hub, and nothing but the checkpoints is written to disk.

    >>> stream = open_stream("fineweb-edu")                      # a local copy if any, else the Hub
    >>> tok = stream_tokenizer("gpt2")                           # GPT-2's tokenizer (Hub) or a folder
    >>> val = held_out(stream, tok, val_docs=10_000)             # the first 10,000 documents, tokenised
    >>> train = StreamingTokenSource(stream, tok, batch_size=64, block_size=1024, skip_docs=10_000)
    >>> x, y = train.next_batch()                                # two (64, 1024) int64 tensors

Where the documents come from (open_stream), first hit wins, as for every other dataset (sources.py):
an explicit path; in $BYOLLM_DATA_MIRROR, then in the cache, a file named after the dataset
(`fineweb-edu.jsonl`, `.jsonl.gz`, `.json`, `.parquet` or `.txt`) or a folder of such files; else the
registry's Hugging Face dataset, streamed (never with BYOLLM_OFFLINE set). Local files go through the
same `datasets` code (the json / parquet / text builders with streaming=True), so tests and offline users
run the code the GPU recipe runs. JSON records keep their documents in "text"; a .txt holds one document
per blank-line-separated paragraph.

The documents, numbered 0, 1, 2, ... in the stream's order (no shuffling):
  validation   documents 0 .. val_docs-1 (held_out), never trained on;
  training     documents val_docs, val_docs+1, ...; with W ranks, rank r takes every W-th of them
               (document i goes to rank (i - val_docs) % W), so ranks never see the same text and
               together see exactly what one process sees. At the end of the stream a new epoch starts
               over at document val_docs.
Each document is tokenised and followed by the eos token (GPT-2's <|endoftext|>), and the rank's token
stream is cut into batches as nanoGPT/build-nanogpt do: B*T + 1 consecutive tokens, x = the first B*T
as B rows of T, y = the same shifted by one; the next batch starts at the last token of this one, so
every token is a target exactly once.

Resume: state_dict() records, for every rank, the epoch, the next document to read, the tokens read but
not yet batched, and `datasets`' own stream position, with which load_state_dict() jumps straight back to
that document (without it, it reads and skips the documents before it). The batches after a resume are
exactly those of a run that never stopped. With another number of ranks, every rank restarts at the
furthest document any rank had read (deterministic, not identical: the unbatched tokens are dropped).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from byollm.data.prepare import hub_tokenizer, is_hub_tokenizer, token_dtype
from byollm.data.registry import DatasetSpec, find_spec, get_spec
from byollm.data.sources import MIRROR_ENV, OFFLINE_ENV, DataUnavailable, cache_dir, mirror_dir, offline
from byollm.errors import DataError, require
from byollm.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("byollm.data")

# A local file of a streamed dataset: its suffix -> the `datasets` builder that reads it.
LOCAL_SUFFIXES = {".jsonl": "json", ".jsonl.gz": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
READ_DOCS = 64  # documents tokenised together (encode_batch); also how often the stream position is taken


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


# --------------------------------------------------------------------------------------------------
# Where the documents come from
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocStream:
    """A streamed dataset: what `datasets.load_dataset(builder, config, data_files=..., split=..., streaming=True)`
    is called with, and how it was found. kind "hub" reads the Hugging Face Hub; the others local files."""

    name: str
    kind: Literal["path", "mirror", "cache", "hub"]
    builder: str  # "json", "parquet", "text", or the Hub dataset's path
    config: str | None = None
    data_files: tuple[str, ...] = ()
    split: str = "train"
    text_field: str = "text"
    notice: str = ""
    spec: DatasetSpec | None = field(default=None, compare=False)

    def load(self) -> Any:
        """A fresh `datasets.IterableDataset` of this stream (iterating it yields {text_field: str} rows)."""
        return load_stream(self)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "builder": self.builder, "config": self.config,
                "data_files": list(self.data_files), "split": self.split, "text_field": self.text_field,
                "streaming": True, "notice": self.notice}


def load_stream(stream: DocStream) -> Any:
    """The one place that calls `datasets.load_dataset(..., streaming=True)` (tests replace it for the Hub)."""
    datasets = require("datasets", "data")
    kwargs: dict[str, Any] = {"split": stream.split, "streaming": True}
    if stream.kind != "hub":
        kwargs["data_files"] = list(stream.data_files)
        if stream.builder == "text":
            kwargs["sample_by"] = "paragraph"
    try:
        ds = datasets.load_dataset(stream.builder, stream.config, **kwargs)
    except Exception as e:  # datasets raises many kinds of errors (connection, missing files, bad JSON)
        if stream.kind == "hub" and stream.spec is not None:
            raise DataUnavailable(_unavailable(stream.spec, f"streaming it failed: {_one_line(e)}")) from e
        raise DataError(f"cannot read {stream.name} ({', '.join(stream.data_files) or stream.builder}) with "
                        f"datasets: {_one_line(e)}") from e
    if ds.column_names is not None and stream.text_field in ds.column_names and len(ds.column_names) > 1:
        ds = ds.select_columns([stream.text_field])  # FineWeb rows also carry url, id, scores: skip decoding them
    return ds


def _local_files(p: Path) -> tuple[str, tuple[str, ...]] | None:
    """(builder, files) of a local file or folder of a streamed dataset; None when it is none of them."""
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _builder(f) is not None)
        builders = {_builder(f) for f in files}
        if len(builders) == 1:
            return builders.pop(), tuple(str(f) for f in files)  # type: ignore[return-value]
        return None
    b = _builder(p)
    return (b, (str(p),)) if p.is_file() and b is not None else None


def _builder(p: Path) -> str | None:
    name = p.name.lower()
    return next((b for s, b in LOCAL_SUFFIXES.items() if name.endswith(s)), None)


def _local_names(spec: DatasetSpec) -> list[str]:
    stems = dict.fromkeys([spec.name, *spec.aliases])
    return [spec.filename, *(s + suffix for s in stems for suffix in LOCAL_SUFFIXES), *stems]


def open_stream(name_or_path: str | Path, *, path: str | Path | None = None, allow_download: bool = True,
                text_field: str | None = None) -> DocStream:
    """Find a streamed dataset: explicit path, mirror, cache, then the Hub (see the module docstring)."""
    spec = find_spec(str(name_or_path)) if not isinstance(name_or_path, Path) else None
    if path is None and spec is None:
        p = Path(name_or_path).expanduser()
        if not p.exists() and not (isinstance(name_or_path, Path) or "/" in str(name_or_path) or p.suffix):
            spec = get_spec(str(name_or_path))  # raises with 'did you mean'
        else:
            path = p
    field_name = text_field or (spec.fields[0] if spec is not None and spec.fields else "text")
    name = spec.name if spec is not None else Path(str(path)).name
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"{p} does not exist; give an existing JSONL/parquet/text file or folder")
        found = _local_files(p)
        if found is None:
            raise DataError(f"{p} is not a file (or folder of files) to stream: use "
                            f"{', '.join(LOCAL_SUFFIXES)} files, one kind per folder")
        notice = f"streaming {name} from {p} (given explicitly)"
        return _found(DocStream(name, "path", found[0], None, found[1], "train", field_name, notice, spec))
    assert spec is not None
    if not spec.streaming:
        raise DataError(f"dataset {spec.name!r} is not a streamed dataset; prepare it into token shards "
                        "(leave data.streaming unset)")
    for kind, directory in (("mirror", mirror_dir()), ("cache", cache_dir())):
        if directory is None or not directory.is_dir():
            continue
        for candidate in _local_names(spec):
            found = _local_files(directory / candidate)
            if found is not None:
                where = {"mirror": "local mirror copy", "cache": "cached copy"}[kind]
                notice = (f"streaming {spec.name} from its {where} {directory / candidate} "
                          f"({len(found[1])} file(s), used as is: a local copy has no checksum to verify)")
                return _found(DocStream(spec.name, kind, found[0], None, found[1], "train", field_name,  # type: ignore[arg-type]
                                        notice, spec))
    if not allow_download:
        raise DataUnavailable(_unavailable(spec, "downloads are turned off"))
    if offline():
        raise DataUnavailable(_unavailable(spec, f"{OFFLINE_ENV} is set"))
    if spec.hf is None:
        raise DataUnavailable(_unavailable(spec, "it has no Hugging Face source"))
    notice = f"streaming {spec.name} from {spec.where()}"
    return _found(DocStream(spec.name, "hub", spec.hf.path, spec.hf.config, (), spec.hf.splits[0], field_name,
                            notice, spec))


def _found(stream: DocStream) -> DocStream:
    logger.info(stream.notice)
    return stream


def _unavailable(spec: DatasetSpec, reason: str) -> str:
    mirror = mirror_dir()
    state = f"now {mirror}" if mirror is not None else "now unset"
    return (
        f"dataset {spec.name!r} is streamed from {spec.where()}, which is not possible here ({reason}): "
        f"for a local copy put {spec.filename} (one JSON object with a \"text\" field a line; or "
        f"{spec.name}.parquet, {spec.name}.txt, or a folder {spec.name}/ of such files) in the local mirror "
        f"directory (set {MIRROR_ENV}=DIR; {state}) or in {cache_dir()}, or pass data.name PATH"
    )


# --------------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------------


def stream_tokenizer(spec: str | Path | Tokenizer) -> Tokenizer:
    """A ready tokenizer for streamed text: a Tokenizer, a saved tokenizer's folder, "gpt2" or "hf:REPO"
    (a Hugging Face Hub tokenizer.json, e.g. hf:HuggingFaceTB/SmolLM2-135M). A stream has no fixed text to
    train "char" or "bpe:N" on: train one with `byollm tokenizer train` and pass its folder."""
    if isinstance(spec, Tokenizer):
        return spec
    text = str(spec)
    if Path(text).expanduser().is_dir():
        return load_tokenizer(Path(text).expanduser())
    if is_hub_tokenizer(text):
        return hub_tokenizer(text)
    raise DataError(f"tokenizer {text!r} cannot be used with a streamed dataset: use gpt2, hf:REPO or the folder "
                    "of a saved tokenizer (make one with `byollm tokenizer train`)")


def _separator(tok: Tokenizer) -> list[int]:
    return [tok.eos_id] if tok.eos_id is not None else tok.encode("\n\n", allowed_special=False)


def _doc_text(row: Any, text_field: str, index: int) -> str:
    text = row.get(text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        shown = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"document {index} of the stream has no string field {text_field!r} (it has {shown})")
    return text


def _rows(ds: Any, stream_name: str) -> Iterator[Any]:
    """Iterate a `datasets` stream, turning its errors (network, corrupt files) into one-line DataErrors."""
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"reading the stream of {stream_name} failed: {_one_line(e)}") from e
        yield row


# --------------------------------------------------------------------------------------------------
# Validation: the first val_docs documents
# --------------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """The validation documents, tokenised: `tokens` (a 1-D array, documents each followed by the separator)
    and `meta`, shaped like a prepared folder's meta.json so that bits_per_byte(loss, meta) works."""

    tokens: np.ndarray
    meta: dict[str, Any]


def held_out(stream: DocStream, tokenizer: Tokenizer, val_docs: int) -> HeldOut:
    """Documents 0 .. val_docs-1 of the stream: the fixed validation set, excluded from training."""
    if val_docs < 1:
        raise DataError(f"val_docs must be at least 1, got {val_docs}")
    sep = _separator(tokenizer)
    docs = []
    for i, row in enumerate(_rows(stream.load(), stream.name)):
        if i == val_docs:
            break
        docs.append(_doc_text(row, stream.text_field, i))
    if len(docs) < val_docs:
        raise DataError(f"{stream.name} has only {len(docs)} documents, not more than the {val_docs} held out for "
                        "validation; lower data.val_docs or use more data")
    ids: list[int] = []
    for doc_ids in tokenizer.encode_batch(docs, allowed_special=False):
        ids += doc_ids + sep
    tokens = np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    split = {"tokens": len(tokens), "documents": len(docs), "chars": sum(len(d) for d in docs), "bytes": n_bytes,
             "bytes_per_token": n_bytes / max(1, len(tokens))}
    meta = {"dataset": stream.name, "source": stream.describe(), "kind": "stream",
            "split": {"rule": "first_documents", "val_docs": val_docs,
                      "description": f"val = documents 0..{val_docs - 1} of the stream; training starts at "
                                     f"document {val_docs}; each document followed by the separator"},
            "document_separator": sep, "splits": {"val": split}}
    return HeldOut(tokens, meta)


# --------------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------------


def _empty() -> dict[str, Any]:
    return {"epoch": 0, "next_doc": 0, "buffer": torch.zeros(0, dtype=torch.int32), "hf": None, "batches": 0}


class StreamingTokenSource:
    """A BatchSource (byollm.train.loop) over a streamed dataset: see the module docstring.

    stream: a DocStream (or anything with .load() and .name/.text_field). skip_docs: the held-out documents
    at the start of the stream. rank/world_size: this process's share of the documents. prefetch: batches
    made ahead by a background thread while the model trains (0: made in next_batch). gather: under DDP,
    `obj -> [obj of every rank]` (every rank calls state_dict, and each rank's position goes into it).
    """

    def __init__(self, stream: DocStream, tokenizer: Tokenizer, batch_size: int, block_size: int, *,
                 skip_docs: int = 0, rank: int = 0, world_size: int = 1, prefetch: int = 0,
                 read_docs: int = READ_DOCS, gather: Callable[[Any], list[Any]] | None = None) -> None:
        if batch_size < 1 or block_size < 1:
            raise DataError(f"batch_size and block_size must be at least 1, got {batch_size} and {block_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
        if skip_docs < 0 or prefetch < 0 or read_docs < 1:
            raise DataError("skip_docs and prefetch must be >= 0 and read_docs >= 1")
        self.stream, self.tokenizer = stream, tokenizer
        self.batch_size, self.block_size = batch_size, block_size
        self.skip_docs, self.rank, self.world_size = skip_docs, rank, world_size
        self.prefetch, self.read_docs, self.gather = prefetch, read_docs, gather
        self.sep = _separator(tokenizer)
        self._state = _empty()  # the position after the last batch handed out
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # ---- the protocol -----------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch == 0:
            if self._batches is None:
                self._batches = self._produce(self._state)
            x, y, state = next(self._batches)
        else:
            if self._thread is None:
                self._start_thread()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            x, y, state = item
        self._state = state
        return x, y

    def state_dict(self) -> dict[str, Any]:
        mine = dict(self._state)
        ranks = self.gather(mine) if self.gather is not None else [mine]
        return {"kind": "stream", "world_size": self.world_size, "skip_docs": self.skip_docs,
                "batch_size": self.batch_size, "block_size": self.block_size, "ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stream":
            raise DataError("this checkpoint's data position is not a streamed dataset's; resume with the run's "
                            "own config.yaml")
        if state["skip_docs"] != self.skip_docs:
            raise DataError(f"the checkpoint held out {state['skip_docs']} validation documents, this config "
                            f"{self.skip_docs}; resume with the same data.val_docs")
        self.close()
        ranks = state["ranks"]
        same = (state["world_size"] == self.world_size and state["batch_size"] == self.batch_size
                and state["block_size"] == self.block_size and len(ranks) == self.world_size)
        if same:
            self._state = dict(ranks[self.rank])
            return
        # Another layout: restart every rank at the furthest document any rank had read (the rank that read
        # it has the stream position to jump there); its unbatched tokens are dropped.
        furthest = max(ranks, key=lambda s: (s["epoch"], s["next_doc"]))
        logger.warning("resuming a stream saved with %d rank(s) x %d x %d on %d rank(s) x %d x %d: every rank "
                       "continues from document %d of epoch %d (deterministic, not identical to an uninterrupted "
                       "run)", state["world_size"], state["batch_size"], state["block_size"], self.world_size,
                       self.batch_size, self.block_size, furthest["next_doc"], furthest["epoch"])
        self._state = {**furthest, "buffer": torch.zeros(0, dtype=torch.int32), "batches": 0}

    # ---- making batches ---------------------------------------------------------------------------
    def _owns(self, i: int) -> bool:
        return i >= self.skip_docs and (i - self.skip_docs) % self.world_size == self.rank

    def _open(self, epoch_state: dict[str, Any] | None, next_doc: int) -> tuple[Any, Iterator[Any]]:
        """A fresh stream positioned at document next_doc: by `datasets`' saved position when there is one,
        else by reading and skipping the documents before it."""
        ds = self.stream.load()
        if epoch_state is not None and hasattr(ds, "load_state_dict"):
            ds.load_state_dict(epoch_state)
            return ds, _rows(ds, self.stream.name)
        rows = _rows(ds, self.stream.name)
        for _ in range(next_doc):
            if next(rows, None) is None:
                break
        return ds, rows

    def _produce(self, start: dict[str, Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        B, T = self.batch_size, self.block_size
        need = B * T + 1
        epoch, doc, n_batches = start["epoch"], start["next_doc"], start["batches"]
        buf = start["buffer"].numpy().astype(np.int64)
        ds, rows = self._open(start["hf"], doc)
        whole_pass, owned = doc <= self.skip_docs, 0  # (a pass from the start that finds no document: error)
        while True:
            texts: list[str] = []
            while len(texts) < self.read_docs:
                row = next(rows, None)
                if row is None:  # the end of the stream: a new epoch from the first training document
                    if whole_pass and owned == 0:
                        raise DataError(f"{self.stream.name} has no training documents for rank {self.rank} of "
                                        f"{self.world_size} after the {self.skip_docs} held out for validation; "
                                        "use more data or lower data.val_docs")
                    epoch, doc, whole_pass, owned = epoch + 1, self.skip_docs, True, 0
                    ds, rows = self._open(None, self.skip_docs)
                    continue
                i, doc = doc, doc + 1
                if self._owns(i):
                    owned += 1
                    texts.append(_doc_text(row, self.stream.text_field, i))
            hf_state = ds.state_dict() if hasattr(ds, "state_dict") else None
            ids = [t for doc_ids in self.tokenizer.encode_batch(texts, allowed_special=False)
                   for t in (*doc_ids, *self.sep)]
            buf = np.concatenate([buf, np.asarray(ids, dtype=np.int64)])
            while len(buf) >= need:
                window = torch.from_numpy(buf[:need].copy())
                buf = buf[need - 1:]  # the last target is the next batch's first input
                n_batches += 1
                state = {"epoch": epoch, "next_doc": doc, "buffer": torch.from_numpy(buf.astype(np.int32)),
                         "hf": hf_state, "batches": n_batches}
                yield window[:-1].view(B, T), window[1:].view(B, T), state

    # ---- the background thread --------------------------------------------------------------------
    def _start_thread(self) -> None:
        self._stop = threading.Event()
        self._queue = q = queue.Queue(maxsize=self.prefetch)
        stop, start = self._stop, self._state

        def work() -> None:
            try:
                for item in self._produce(start):
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # handed to next_batch, which raises it in the training thread
                if not stop.is_set():
                    q.put(e)

        self._thread = threading.Thread(target=work, name="byollm-stream", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background thread (if any); the next next_batch continues from state_dict()'s position."""
        self._batches = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread, self._queue = None, None


__all__ = ["DocStream", "HeldOut", "StreamingTokenSource", "held_out", "load_stream", "open_stream",
           "stream_tokenizer"]
