"""Cut a registry subset from its source file, byte for byte the file the data mirror holds.

    >>> spec, sub = get_dataset("crows-pairs")                    # the default subset, crows-pairs-200
    >>> cut_subset(spec, sub, Path("crows_pairs_anonymized.csv"), Path("crows_pairs_sample_200.csv"))

Each format is read and written back the way the mirror's files were written, so the cut's sha256 is the
registry's whenever the source's records are the same (a source that escapes non-ASCII characters in JSON,
or ends CSV lines in "\\n", still gives the same file):
  json   a JSON list, written json.dumps(records, indent=1, ensure_ascii=False) (what the Hugging Face path writes)
  jsonl  one record a line, json.dumps(record, ensure_ascii=False) + "\\n"
  csv    the header row and the kept rows, csv.writer's default dialect ("\\r\\n" line ends)
  squad  {"data": the kept articles}, json.dumps with its defaults
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path
from typing import Any

from byollm.data.registry import Cut, DatasetSpec, Subset
from byollm.errors import DataError


def pick(cut: Cut, total: int) -> list[int]:
    """The indices a cut keeps out of `total` records, in the source's order."""
    if cut.n > total:
        raise DataError(f"the source has {total:,} records, fewer than the {cut.n:,} the subset takes; "
                        "it is not the file the subset was cut from")
    if cut.kind == "first":
        return list(range(cut.n))
    return sorted(random.Random(cut.seed).sample(range(total), cut.n))


def _read(fmt: str, text: str, where: Path) -> tuple[Any, list[Any]]:
    """(what the writer needs besides the records, the records) of a source file."""
    try:
        if fmt == "json":
            return None, json.loads(text)
        if fmt == "jsonl":
            return None, [json.loads(line) for line in text.split("\n") if line.strip()]
        if fmt == "squad":
            data = json.loads(text)
            return data, data["data"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{where} is not a {fmt} file ({type(e).__name__}: {e}); download it again") from None
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text, newline="")))
        if not rows:
            raise DataError(f"{where} is empty; download it again")
        return rows[0], rows[1:]
    raise DataError(f"cannot cut a subset of a {fmt} dataset")


def _write(fmt: str, head: Any, records: list[Any]) -> str:
    if fmt == "json":
        return json.dumps(records, indent=1, ensure_ascii=False)
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if fmt == "squad":
        return json.dumps({"data": records})
    out = io.StringIO(newline="")
    csv.writer(out).writerows([head, *records])
    return out.getvalue()


def cut_subset(spec: DatasetSpec, sub: Subset, source: Path, dest: Path) -> None:
    """Write `sub` of `spec`, cut from the source file `source`, to `dest` (the caller checks its sha256)."""
    if sub.cut is None:
        raise DataError(f"subset {sub.name or sub.filename} of {spec.name} has no rule to cut it from its source")
    text = source.read_bytes().decode("utf-8")
    head, records = _read(spec.format, text, source)
    kept = [records[i] for i in pick(sub.cut, len(records))]
    with open(dest, "w", encoding="utf-8", newline="") as fh:
        fh.write(_write(spec.format, head, kept))
