"""Write files and directories so that a crash leaves either the old version or the new one, never half.

Used by checkpoints, prepared datasets and exports; depends on nothing else in byollm.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def atomic_dir_write(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_dir), then move tmp_dir to `target` in one rename.

    A crash before the rename leaves only a `.tmp-*` folder beside the old `target`, which stays
    intact. An existing `target` is moved aside first and deleted after the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        olds = []
        for attempt in range(5):
            if target.exists():
                olds.append(target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                os.replace(target, olds[-1])
            try:
                os.replace(tmp, target)
                break
            except OSError:  # another process published `target` between our two renames: move it aside too
                if attempt == 4 or not target.exists():
                    raise
        _fsync_entry(target.parent)  # make the rename itself durable
        for old in olds:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the folders) to disk before the rename publishes them."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            _fsync_entry(f)
    _fsync_entry(path)


def _fsync_entry(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_file_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write one file atomically: `write(tmp)` fills a temporary file beside `path`, which is synced and then
    renamed over `path`. A crash or an exception leaves the previous file (if any) intact and no temporary."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        _fsync_entry(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_file_write(path, lambda tmp: tmp.write_text(text))
