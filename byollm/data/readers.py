"""Read a dataset's text or records, with clear errors for files that are truncated or not what they claim.

    >>> text = load_text("tinyshakespeare", allow_fallback=True)   # str
    >>> recs = load_records("alpaca")                               # [{"instruction", "input", "output"}, ...]
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from byollm.data.registry import DatasetSpec
from byollm.data.sources import VAL_FILES, Source, resolve
from byollm.errors import DataError

_TEXT_SPLIT_ORDER = ("train.txt", *VAL_FILES, "test.txt")
_RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson")

# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def read_text_file(path: str | Path) -> str:
    """The exact content of a UTF-8 text file (no newline translation, so characters match bytes on disk)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
            f"cannot be decoded ({e.reason}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _text_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{directory} holds no files; put text files in it")
    return files


def read_text_dir(directory: str | Path) -> str:
    """Every file under `directory` (sorted by path), each ending in a newline, concatenated."""
    parts = []
    for f in _text_files(Path(directory)):
        text = read_text_file(f)
        parts.append(text if text.endswith("\n") or not text else text + "\n")
    return "".join(parts)


def text_splits(directory: str | Path) -> dict[str, str]:
    """A text_splits directory's official splits: {"train": ..., "val": ..., "test": ...} (test if present)."""
    directory = Path(directory)
    val = next((directory / f for f in VAL_FILES if (directory / f).is_file()), None)
    if not (directory / "train.txt").is_file() or val is None:
        raise DataError(f"{directory} should hold train.txt and validation.txt (official splits); it does not")
    out = {"train": read_text_file(directory / "train.txt"), "val": read_text_file(val)}
    if (directory / "test.txt").is_file():
        out["test"] = read_text_file(directory / "test.txt")
    return out


def source_text(source: Source) -> str:
    """The whole text of a resolved text source (a text_splits directory: train, validation, test in order)."""
    if source.text is not None:
        return source.text
    assert source.path is not None
    if source.format == "text":
        return read_text_file(source.path)
    if source.format == "text_splits":
        return "".join(text_splits(source.path).values())
    if source.format == "text_dir":
        return read_text_dir(source.path)
    raise DataError(
        f"{source.name} ({source.path}) is a record dataset ({source.format}), not text; "
        "read it with load_records, or prepare it (its records are turned into documents)"
    )


def load_text(
    name_or_path: str | Path,
    *,
    path: str | Path | None = None,
    allow_download: bool = True,
    allow_fallback: bool = False,
) -> str:
    """The text of a dataset (registry name or local file/directory). Which source was used is logged.

    allow_fallback=True: when the dataset is nowhere to be found (no path, mirror, cache or network), return
    CPython's pydoc topics text instead, with a warning naming that corpus (see sources.fallback_corpus).
    """
    src = resolve(name_or_path, path=path, allow_download=allow_download, allow_fallback=allow_fallback)
    return source_text(src)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def read_json_file(path: str | Path) -> Any:
    path = Path(path)
    text = read_text_file(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path} is not valid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
            "the file may be truncated or corrupt: download or copy it again"
        ) from None


def read_jsonl_file(path: str | Path) -> list[Any]:
    """One JSON value a line; blank lines are skipped. Errors name the 1-based line number."""
    path = Path(path)
    out = []
    # split on "\n" only: str.splitlines would also cut at U+2028 etc., which JSON strings may hold raw
    for n, line in enumerate(read_text_file(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                "the file may be truncated or corrupt: fix or remove that line, or download the file again"
            ) from None
    return out


def read_csv_file(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path} has no CSV header row")
    rows = []
    for n, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise DataError(f"{path} line {n}: expected {len(reader.fieldnames)} columns; the row is malformed")
        rows.append(row)
    return rows


def flatten_squad(data: Any, path: Path) -> list[dict[str, Any]]:
    """SQuAD JSON (data > articles > paragraphs > qas) -> one record per question:
    {"id", "title", "context", "question", "answers": [{"text", "answer_start"}, ...]}."""
    try:
        return [
            {
                "id": qa["id"],
                "title": article["title"],
                "context": para["context"],
                "question": qa["question"],
                "answers": [{"text": a["text"], "answer_start": a["answer_start"]} for a in qa["answers"]],
            }
            for article in data["data"]
            for para in article["paragraphs"]
            for qa in para["qas"]
        ]
    except (KeyError, TypeError) as e:
        raise DataError(f"{path} is not in the SQuAD format (missing {e}); expected data > paragraphs > qas") from None


def _is_squad(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("data"), list) and "version" in data


def read_records_file(path: str | Path, fmt: str | None = None) -> list[Any]:
    """Records of one file: a JSON list, JSONL, CSV or SQuAD JSON (fmt from the registry, else the suffix)."""
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}.get(path.suffix.lower(), "json")
    if fmt == "jsonl":
        return read_jsonl_file(path)
    if fmt == "csv":
        return read_csv_file(path)
    data = read_json_file(path)
    if fmt == "squad" or _is_squad(data):
        return flatten_squad(data, path)
    if not isinstance(data, list):
        raise DataError(
            f"{path} holds a JSON {type(data).__name__}, not a list of records; expected [{{...}}, {{...}}]"
        )
    return data


def validate_records(records: Sequence[Any], fields: Sequence[str], where: str) -> None:
    """Every record must be an object with each of `fields` a string (an empty string is fine)."""
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{where}: record {i} is a {type(r).__name__}, expected an object with {list(fields)}")
        for f in fields:
            if f not in r:
                raise DataError(f"{where}: record {i} has no field {f!r} (every record needs {', '.join(fields)})")
            if not isinstance(r[f], str):
                raise DataError(f"{where}: field {f!r} of record {i} is a {type(r[f]).__name__}, expected a string")


def source_records(source: Source) -> list[Any]:
    """The records of a resolved source, validated against the registry's fields."""
    assert source.path is not None
    if source.format in ("text", "text_splits", "text_dir"):
        raise DataError(f"{source.name} ({source.path}) is a text dataset, not records; read it with load_text")
    if source.format == "records_dir":
        files = [p for p in _text_files(source.path) if p.suffix.lower() in _RECORD_SUFFIXES]
        records = [r for f in files for r in read_records_file(f)]
    else:
        records = read_records_file(source.path, source.format)
    if not records:
        raise DataError(f"{source.path} holds no records")
    spec: DatasetSpec | None = source.spec
    if spec is not None and spec.fields:
        validate_records(records, spec.fields, str(source.path))
    return records


def load_records(
    name_or_path: str | Path,
    *,
    path: str | Path | None = None,
    allow_download: bool = True,
) -> list[Any]:
    """The records of a dataset, as a list of dicts: alpaca -> instruction/input/output, hh-rlhf ->
    chosen/rejected, crows-pairs -> sent_more/sent_less/..., squad -> one record per question."""
    return source_records(resolve(name_or_path, path=path, allow_download=allow_download))


# --------------------------------------------------------------------------------------------------
# Records as documents, and the record split
# --------------------------------------------------------------------------------------------------

# Stanford Alpaca's own prompt templates (tatsu-lab/stanford_alpaca, train.py), used to turn a record into
# one training document when a record dataset is prepared for plain language modelling.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def record_to_text(record: Any, where: str = "record") -> str:
    """One document for language modelling: a string as it is; {"text"}; Alpaca records in Alpaca's prompt
    template followed by the output; preference pairs ({"chosen", "rejected"}) as the chosen dialogue."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        if isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str):
            template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
            return template.format(instruction=record["instruction"], input=record.get("input")) + record["output"]
        if isinstance(record.get("chosen"), str):
            return record["chosen"]
    shown = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(
        f"{where} ({shown}) cannot be turned into a document: expected a string or an object with 'text', "
        "'instruction'+'output' (Alpaca) or 'chosen' (preference pairs)"
    )


def split_records(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented record split: (train indices, val indices), both sorted.

    val = the first round(n * val_fraction) entries (at least 1) of
    numpy.random.default_rng(seed).permutation(n); train = the rest. Same (n, val_fraction, seed), same split.
    """
    if n < 2:
        raise DataError(f"need at least 2 records to make a train and a val split, got {n}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
