"""Find a dataset's file: explicit path -> local mirror -> cache -> download, verifying checksums.

    >>> src = resolve("tinyshakespeare")      # a Source: where the file is and how it was found
    >>> src.notice
    'using local mirror copy /data/mirror/tinyshakespeare.txt (sha256 86c4e6aa9db7... verified)'

Order, first hit wins:
  1. an explicit path (`path=` or a name_or_path that exists on disk): the user's file, used as given;
  2. the local mirror, the directory named by $BYOLLM_DATA_MIRROR: the registry's file name, an accepted
     subset's file name, or the dataset's name (e.g. `tinyshakespeare.txt` or `tinyshakespeare`);
  3. the cache, $BYOLLM_CACHE/data (default ~/.cache/byollm/data), looked up the same way;
  4. a download into the cache: the registry's URLs, then its Hugging Face dataset (optional `datasets`).
A registry *subset* (a plain name with a default subset, e.g. "alpaca", or a subset's own name) is looked
up the same way under its own file name; else it is cut from a full copy in the mirror or cache, else from a
download, into the cache, and checked against the subset's sha256 (subsets.py). Every load logs one line
naming the dataset, the subset and where it came from. A mirror or cache file whose sha256 differs from the
registry's is an error, never silently used. With nothing local and no network you get one DataError
that says what to download from where; with
allow_fallback=True a text dataset falls back to CPython's own documentation (see fallback_corpus).
Set BYOLLM_OFFLINE=1 to skip download attempts altogether.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from byollm.data.registry import FULL_SUFFIX, DatasetSpec, Format, Subset, find_dataset, get_dataset
from byollm.data.subsets import cut_subset
from byollm.errors import DataError

logger = logging.getLogger("byollm.data")

MIRROR_ENV = "BYOLLM_DATA_MIRROR"
CACHE_ENV = "BYOLLM_CACHE"
OFFLINE_ENV = "BYOLLM_OFFLINE"
DOWNLOAD_TIMEOUT_S = 60
FALLBACK_NAME = "pydoc-topics"

SourceKind = Literal["path", "mirror", "cache", "download", "fallback"]


class DataUnavailable(DataError):
    """Nothing local and the download failed: the one case where a fallback corpus may step in."""

    reason: str = ""  # why it was not downloaded, in words


@dataclass(frozen=True)
class Source:
    """Where a dataset was found. `path` is None only for the fallback corpus, whose text is in `text`."""

    name: str  # the registry name, or the file/directory name of an explicit path
    kind: SourceKind
    path: Path | None
    sha256: str
    format: Format
    spec: DatasetSpec | None
    subset: Subset | None
    notice: str
    text: str | None = None

    def describe(self) -> dict:
        """A JSON-able summary for meta files."""
        return {
            "name": self.name,
            "kind": self.kind,
            "path": None if self.path is None else str(self.path),
            "sha256": self.sha256,
            "format": self.format,
            "subset": None if self.subset is None else self.subset.filename,
            "subset_name": None if self.subset is None else self.subset.name or None,
            "notice": self.notice,
        }


# --------------------------------------------------------------------------------------------------
# Places
# --------------------------------------------------------------------------------------------------


def mirror_dir() -> Path | None:
    """The local mirror directory ($BYOLLM_DATA_MIRROR), or None when the variable is unset or empty."""
    value = os.environ.get(MIRROR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Where downloads go: $BYOLLM_CACHE/data, else $XDG_CACHE_HOME/byollm/data, else ~/.cache/byollm/data."""
    if root := os.environ.get(CACHE_ENV, "").strip():
        return Path(root).expanduser() / "data"
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "byollm" / "data"


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file; for a directory, of the sorted lines 'relative/path <sha256 of the file>'."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _sidecar(path: Path) -> Path:
    """For datasets without a published checksum, the sha256 of the first download, kept beside the file."""
    return path.with_name(path.name + ".sha256")


def _verify(spec: DatasetSpec, path: Path) -> tuple[str, Subset | None, str]:
    """Check a mirror/cache file against the registry; return (sha256, the subset it is or None, how verified).

    A file named like a subset must match that subset's checksum; any other file must match the full
    dataset's checksum (or, failing that, one of the subsets', e.g. a subset copied under the dataset's name).
    """
    actual = sha256_path(path)
    by_name = {s.filename: s for s in spec.subsets}
    if path.name in by_name:
        expected = by_name[path.name].sha256
        if actual == expected:
            return actual, by_name[path.name], "verified"
        raise _mismatch(spec, path, expected, actual)
    if spec.sha256 is not None and actual == spec.sha256:
        return actual, None, "verified"
    for sub in spec.subsets:
        if actual == sub.sha256:
            return actual, sub, "verified"
    if spec.sha256 is not None:
        raise _mismatch(spec, path, spec.sha256, actual)
    side = _sidecar(path)
    if side.is_file():
        recorded = side.read_text().split()[0] if side.read_text().strip() else ""
        if recorded != actual:
            raise _mismatch(spec, path, recorded, actual, what=f"the checksum recorded at download ({side})")
        return actual, None, "matches its download checksum"
    return actual, None, "no published checksum to verify against"


def _mismatch(spec: DatasetSpec, path: Path, expected: str, actual: str, what: str = "the registry's") -> DataError:
    return DataError(
        f"checksum mismatch for {path} (dataset {spec.name!r}): expected sha256 {expected} ({what}), got {actual}; "
        f"the file is truncated, corrupt or a different version, so it was not used: delete or replace it "
        f"(source: {spec.where()})"
    )


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def _candidates(spec: DatasetSpec) -> list[str]:
    """File names a dataset may have in the mirror or cache: full file, subsets, then the bare name.

    For an entry whose plain name means a subset, the full dataset is its full file only."""
    if spec.default_subset:
        return [spec.filename]
    names = [spec.filename, *(s.filename for s in spec.subsets), spec.name, spec.name + Path(spec.filename).suffix]
    return list(dict.fromkeys(names))


def _find_in(directory: Path | None, spec: DatasetSpec, names: list[str] | None = None) -> Path | None:
    if directory is None or not directory.is_dir():
        return None
    for name in names or _candidates(spec):
        p = directory / name
        if p.exists() and not p.name.endswith(".sha256"):
            return p
    return None


def infer_format(path: Path) -> Format:
    """How to read a local file or directory the registry does not know, from its name (and a directory's files)."""
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
        if (path / "train.txt").is_file() and any((path / f).is_file() for f in VAL_FILES):
            return "text_splits"
        if files and all(p.suffix.lower() in (".json", ".jsonl", ".ndjson") for p in files):
            return "records_dir"
        return "text_dir"
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "text"


VAL_FILES = ("validation.txt", "valid.txt", "val.txt")


def _local_notice(kind: str, spec: DatasetSpec, path: Path, sha: str, sub: Subset | None, how: str) -> str:
    where = {"mirror": "local mirror copy", "cache": "cached copy", "download": "downloaded copy", "path": "given file"}
    text = f"using {where[kind]} {path} (sha256 {sha[:12]}... {how})"
    if sub is not None and sub.name:
        of = f" ({sub.n_records:,} of {spec.n_records:,} {spec.unit})" if spec.n_records else ""
        return f"{spec.name}: subset {sub.name}{of}, {sub.description}; " + text
    if sub is not None:
        of = f" ({sub.n_records:,} of {spec.n_records:,} {spec.unit})" if spec.n_records else ""
        text += f"; this is a LOCAL SUBSET of {spec.name}{of}: {sub.description}, so results differ from the full set"
    return text


def resolve(
    name_or_path: str | Path,
    *,
    path: str | Path | None = None,
    allow_download: bool = True,
    allow_fallback: bool = False,
) -> Source:
    """Find a dataset by registry name or local path (see the module docstring for the order) and log how.

    `path` overrides every other place for a named dataset (e.g. your own copy of tinyshakespeare).
    A registry name wins over a file of the same name in the working directory; write ./name to mean the file.
    allow_fallback=True: a text dataset that is nowhere to be found is replaced by fallback_corpus().
    """
    found = find_dataset(str(name_or_path)) if not isinstance(name_or_path, Path) else None
    if path is None and found is None:
        p = Path(name_or_path).expanduser()
        if p.exists():
            path = p
        elif isinstance(name_or_path, Path) or "/" in str(name_or_path) or p.suffix:
            raise DataError(f"{p} does not exist; give an existing file or directory, or a dataset name")
        else:
            found = get_dataset(str(name_or_path))  # raises with 'did you mean'
    spec, subset = found if found is not None else (None, None)
    if path is not None:
        return _explicit(Path(path).expanduser(), spec)
    assert spec is not None
    try:
        if subset is not None and subset.cut is not None:
            return _registered_subset(spec, subset, allow_download)
        return _registered(spec, allow_download)
    except DataUnavailable as e:
        if not allow_fallback or not spec.is_text:
            raise
        return fallback_source(spec.name, reason=str(e))


def _explicit(path: Path, spec: DatasetSpec | None) -> Source:
    if not path.exists():
        raise DataError(f"{path} does not exist; give an existing file or directory")
    sha = sha256_path(path)
    sub = next((s for s in spec.subsets if s.sha256 == sha), None) if spec else None
    fmt = spec.format if spec is not None else infer_format(path)
    notice = f"using {path} (given explicitly; sha256 {sha[:12]}...)"
    if spec is not None and sub is not None:
        notice = _local_notice("path", spec, path, sha, sub, "verified")
    _log(notice, sub is not None)
    return Source(spec.name if spec else path.name, "path", path, sha, fmt, spec, sub, notice)


def _registered(spec: DatasetSpec, allow_download: bool) -> Source:
    for kind, directory in (("mirror", mirror_dir()), ("cache", cache_dir())):
        found = _find_in(directory, spec)
        if found is not None:
            sha, sub, how = _verify(spec, found)
            notice = _local_notice(kind, spec, found, sha, sub, how)
            _log(notice, sub is not None)
            return Source(spec.name, kind, found, sha, spec.format, spec, sub, notice)  # type: ignore[arg-type]
    if not allow_download:
        raise DataUnavailable(_unavailable(spec, "downloads are turned off"))
    if offline():
        raise DataUnavailable(_unavailable(spec, f"{OFFLINE_ENV} is set"))
    if spec.streaming:
        raise DataUnavailable(_unavailable(spec, "it is streamed while training, never downloaded whole: use it in "
                                           "pretrain with data.name"))
    found = _download(spec)
    sha, sub, how = _verify(spec, found)
    notice = _local_notice("download", spec, found, sha, sub, how)
    _log(notice, False)
    return Source(spec.name, "download", found, sha, spec.format, spec, sub, notice)


def _unavailable(spec: DatasetSpec, reason: str, sub: Subset | None = None) -> str:
    """The one line for a dataset that is nowhere local and could not be downloaded: what, from where, or which file."""
    mirror = mirror_dir()
    state = f"now {mirror}" if mirror is not None else "now unset"
    if sub is not None:
        what = f"{spec.name} (subset {sub.name}: {sub.description})"
        origin = sub.cut.source if sub.cut is not None and sub.cut.source else spec.where()
        files, full = sub.filename, f" or the full {spec.filename}" if not (sub.cut and sub.cut.source) else ""
    else:
        what = f"{spec.name}{FULL_SUFFIX}" if spec.default_subset else spec.name
        origin, files = spec.where(), spec.filename
        full = "".join(f" (or its subset {s.filename})" for s in spec.subsets if not spec.default_subset)
    return (
        f"{what} is not available offline ({reason}): download it from {origin} (or set {MIRROR_ENV} to a folder "
        f"holding {files}{full}; {state}; or put it in the cache at {cache_dir() / files}, or give your copy's path)"
    )


def _registered_subset(spec: DatasetSpec, sub: Subset, allow_download: bool) -> Source:
    """A subset with a cut rule: its file in the mirror or cache, else cut from a local full copy, else downloaded."""
    assert sub.cut is not None
    for kind, directory in (("mirror", mirror_dir()), ("cache", cache_dir())):
        found = _find_in(directory, spec, [sub.filename])
        if found is not None:
            sha = sha256_path(found)
            if sha != sub.sha256:
                raise _mismatch(spec, found, sub.sha256, sha, what=f"the registry's, subset {sub.name}")
            return _subset_source(kind, spec, sub, found, sha, "verified")
    full_spec = _source_spec(spec, sub)
    for kind, directory in (("mirror", mirror_dir()), ("cache", cache_dir())):
        full = _find_in(directory, full_spec, [full_spec.filename])
        if full is not None:
            _verify(full_spec, full)
            return _cut_into_cache(kind, spec, sub, full)
    if not allow_download:
        raise DataUnavailable(_unavailable(spec, "downloads are turned off", sub))
    if offline():
        raise DataUnavailable(_unavailable(spec, f"{OFFLINE_ENV} is set", sub))
    try:
        full = _download(full_spec)
    except DataUnavailable as e:
        raise DataUnavailable(_unavailable(spec, e.reason, sub)) from e
    return _cut_into_cache("download", spec, sub, full)


def _source_spec(spec: DatasetSpec, sub: Subset) -> DatasetSpec:
    """The entry of the file a subset is cut from: the dataset's own, or its cut's own source URL."""
    if sub.cut is None or sub.cut.source is None:
        return dataclasses.replace(spec, default_subset=None, subsets=())
    url = sub.cut.source
    return dataclasses.replace(spec, filename=url.rsplit("/", 1)[-1], sha256=None, urls=(url,), hf=None,
                               default_subset=None, subsets=())


def _cut_into_cache(kind: str, spec: DatasetSpec, sub: Subset, full: Path) -> Source:
    """Cut `sub` from the full file into the cache, atomically, and keep it only if its sha256 is the registry's."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / sub.filename
    tmp = cache / f".{sub.filename}.part-{os.getpid()}-{time.monotonic_ns()}"
    try:
        cut_subset(spec, sub, full, tmp)
        sha = sha256_path(tmp)
        if sha != sub.sha256:
            raise DataError(
                f"the subset {sub.name} cut from {full} has sha256 {sha}, not the registry's {sub.sha256}: the source "
                f"is not the release the subset was defined on, so it was not used; put {sub.filename} from a "
                f"verified copy in the mirror ({MIRROR_ENV}) or the cache ({dest})"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    how = {"mirror": "cut from the mirror's full copy", "cache": "cut from the cached full copy",
           "download": f"cut from the download of {_source_spec(spec, sub).where()}"}[kind]
    return _subset_source(kind, spec, sub, dest, sha, f"verified, {how}")


def _subset_source(kind: str, spec: DatasetSpec, sub: Subset, path: Path, sha: str, how: str) -> Source:
    notice = _local_notice(kind, spec, path, sha, sub, how)
    _log(notice, True)
    return Source(spec.name, kind, path, sha, spec.format, spec, sub, notice)  # type: ignore[arg-type]


def _log(notice: str, important: bool) -> None:
    # Subsets and fallbacks change the numbers you get, so they are warnings (shown without logging set up).
    (logger.warning if important else logger.info)(notice)


# --------------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------------


def download(name: str, *, force: bool = False) -> Path:
    """`byollm data download NAME`: make sure a registry dataset is on disk and return its path.

    A mirror or cache copy is used when there is one (force=True downloads into the cache anyway).
    """
    spec, sub = get_dataset(name)
    if sub is not None and sub.cut is not None:
        if force:
            if offline():
                raise DataUnavailable(_unavailable(spec, f"{OFFLINE_ENV} is set", sub))
            source = _cut_into_cache("download", spec, sub, _download(_source_spec(spec, sub)))
        else:
            source = _registered_subset(spec, sub, allow_download=True)
        assert source.path is not None
        return source.path
    if spec.streaming:
        raise DataError(f"{spec.name} is streamed while training (byollm pretrain with data.name {spec.name}), "
                        f"never downloaded whole; for a local copy put {spec.filename} in the mirror ({MIRROR_ENV})")
    if force:
        if offline():
            raise DataUnavailable(_unavailable(spec, f"{OFFLINE_ENV} is set"))
        found = _download(spec)
        sha, sub, how = _verify(spec, found)
        _log(_local_notice("download", spec, found, sha, sub, how), False)
        return found
    source = _registered(spec, allow_download=True)
    assert source.path is not None
    return source.path


def _download(spec: DatasetSpec) -> Path:
    """Fetch into a temporary name in the cache, check the checksum, then rename into place."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / spec.filename
    tmp = cache / f".{spec.filename}.part-{os.getpid()}-{time.monotonic_ns()}"
    try:
        try:
            fetch(spec, tmp)
        except (OSError, DataError, ImportError, ValueError) as e:
            failed = DataUnavailable(_unavailable(spec, f"download failed: {type(e).__name__}: {e}"))
            failed.reason = f"download failed: {type(e).__name__}: {e}"
            raise failed from e
        actual = sha256_path(tmp)
        if spec.sha256 is not None and actual != spec.sha256:
            raise DataError(
                f"checksum mismatch for the download of {spec.name!r} ({spec.where()}): expected sha256 "
                f"{spec.sha256}, got {actual}; the download was discarded. Try again, or put a verified copy "
                f"in the mirror ({MIRROR_ENV}) or at {dest}"
            )
        if dest.exists():
            shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
        os.replace(tmp, dest)
        if spec.sha256 is None:  # no published checksum: remember this one, so later corruption is caught
            _sidecar(dest).write_text(f"{actual}  {spec.filename}\n")
        return dest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def fetch(spec: DatasetSpec, dest: Path) -> None:
    """The network: write `spec`'s data to `dest` (a file, or a directory for text_splits).

    Tries each URL, then the Hugging Face dataset. Raises OSError (with every attempt's reason) on failure.
    Tests replace this function so that no test touches the network.
    """
    errors = []
    for url in spec.urls:
        try:
            _download_url(url, dest)
            return
        except Exception as e:  # URLError, HTTP errors, a truncated gzip (EOFError), ...: try the next source
            errors.append(f"{url}: {type(e).__name__}: {e}")
    if spec.hf is not None:
        try:
            _download_hf(spec, dest)
            return
        except Exception as e:  # datasets raises many kinds of errors when offline
            errors.append(f"Hugging Face {spec.hf.path}: {type(e).__name__}: {e}")
    raise OSError("; ".join(errors) or f"{spec.name} has no download source")


def _download_url(url: str, dest: Path) -> None:
    logger.info("downloading %s -> %s", url, dest)
    request = urllib.request.Request(url, headers={"User-Agent": "byollm (https://github.com/byollm)"})
    with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
        stream = gzip.GzipFile(fileobj=response) if url.endswith(".gz") else response
        with open(dest, "wb") as fh:
            shutil.copyfileobj(stream, fh, length=1 << 20)


def _download_hf(spec: DatasetSpec, dest: Path) -> None:
    """Read the dataset with Hugging Face `datasets` and write it in the registry's format."""
    assert spec.hf is not None
    try:
        import datasets  # optional: only this download path needs it
    except ImportError as e:
        raise ImportError(f"the optional package 'datasets' is needed for {spec.hf.path}: pip install datasets") from e
    hf = spec.hf
    logger.info("downloading Hugging Face dataset %s (%s) -> %s", hf.path, hf.config or "default", dest)
    splits = {
        split: datasets.load_dataset(hf.path, hf.config, data_dir=hf.data_dir, split=split) for split in hf.splits
    }
    write_rows(spec, splits, dest)


def write_rows(spec: DatasetSpec, splits: dict[str, object], dest: Path) -> None:
    """Write rows (split name -> iterable of dicts, e.g. a `datasets.Dataset`) in the registry's file format.

    text_splits: a directory with one <split>.txt per split, the rows' "text" joined as they are (WikiText's
    rows are its lines with their newlines). json/jsonl: the records of all splits in order, `columns` only.
    """
    if spec.format == "text_splits":
        dest.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(dest / f"{split}.txt", "w", encoding="utf-8", newline="") as fh:
                for row in rows:  # type: ignore[attr-defined]
                    fh.write(row["text"])
        return
    assert spec.hf is not None
    records = [{c: row[c] for c in spec.hf.columns} for rows in splits.values() for row in rows]  # type: ignore
    with open(dest, "w", encoding="utf-8") as fh:
        if spec.format == "jsonl":
            fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        elif spec.format == "json":
            json.dump(records, fh, ensure_ascii=False, indent=1)
        else:
            raise DataError(f"cannot write Hugging Face rows as {spec.format}")


# --------------------------------------------------------------------------------------------------
# The fallback corpus
# --------------------------------------------------------------------------------------------------


def fallback_corpus() -> str:
    """CPython's help-topic texts (`pydoc_data.topics.topics`), all topics joined by newlines, sorted by name.

    It ships with every Python (about 0.5 MB of English prose and code; 465,048 characters in 3.11.7), so
    the offline quickstart can train on real text with no network and no mirror. Its content depends on the
    Python version, which prepare records in meta.json.
    """
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def fallback_source(requested: str, reason: str = "") -> Source:
    text = fallback_corpus()
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:3]))
    notice = (
        f"{requested} is not available here, so the FALLBACK CORPUS is used instead: CPython {version}'s "
        f"pydoc_data.topics ({len(topics)} help topics, {len(text):,} characters, sha256 {sha[:12]}...); "
        f"numbers are not comparable with {requested}'s. " + (f"To use {requested}: {reason}" if reason else "")
    ).strip()
    _log(notice, True)
    return Source(FALLBACK_NAME, "fallback", None, sha, "text", None, None, notice, text=text)
