"""A pipeline of named, cached stages: what `byollm capstone` runs (data -> ... -> serve), in one readable loop.

Each stage is a function that writes its outputs into its own folder and returns its figures (a JSON dict). A
stage is *done* when its folder holds `stage.json`, written atomically last, with the stage's **key**:

    key = sha256(stage name, the stage's config, the source code of the modules it names,
                 the keys of the stages it reads from, the content hashes of the files it reads)

so a stage reruns exactly when something it depends on changed: its settings, its code, an earlier stage's
result or an input file. Re-running a finished pipeline skips every stage (a few hash computations).

Interrupted runs resume: a stage killed mid-way has no `stage.json`, so the next run starts it again *in the same
folder*, where its recipe finds what it had written (a training recipe resumes from its last checkpoint, as
`byollm pretrain` does in an existing run folder). A folder left by a stage whose key has since changed is moved
aside (renamed `NAME.stale-N`, never deleted: it may hold hours of work) before the stage starts afresh.

`from_stage` reruns that stage and every later one even if their keys match (`byollm capstone --from sft`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from byollm.atomic import atomic_write_text
from byollm.errors import ByollmError

DONE = "stage.json"


@dataclass
class StageContext:
    """What a stage's function gets: its folder, the folders and figures of the stages it reads, its config."""

    name: str
    dir: Path
    config: dict[str, Any]
    inputs: dict[str, Path]  # stage name -> that stage's folder
    results: dict[str, dict[str, Any]]  # stage name -> that stage's figures (its stage.json "figures")
    log: Callable[[str], None] = print


@dataclass
class Stage:
    """One named step. `run(ctx)` writes into ctx.dir and returns its figures (JSON-serialisable)."""

    name: str
    run: Callable[[StageContext], dict[str, Any]]
    reads: Sequence[str] = ()  # earlier stages whose outputs this one uses
    config: dict[str, Any] = field(default_factory=dict)
    code: Sequence[ModuleType | Callable[..., Any]] = ()  # whose source counts as this stage's code version
    files: Sequence[Path] = ()  # input files outside the pipeline (datasets, documents)
    describe: str = ""  # one line: what it does (shown in the plan and the report)


@dataclass
class StageResult:
    name: str
    key: str
    status: str  # "ran" or "cached"
    seconds: float  # this run's wall time (cached: the time it took when it ran)
    figures: dict[str, Any]


def sized(sizes: Any, *fields: str) -> dict[str, Any]:
    """A stage's config from a size dial (a dataclass): only the `fields` the stage reads, so a change to one field
    reruns the stages that read it and those after them, not the whole pipeline."""
    return {"sizes": {f: getattr(sizes, f) for f in fields}}


def sizes_of(ctx: StageContext) -> SimpleNamespace:
    """The stage's size fields as attributes (reading a field the stage did not list is an AttributeError)."""
    return SimpleNamespace(**ctx.config["sizes"])


def _source_hash(objects: Iterable[ModuleType | Callable[..., Any]]) -> str:
    h = hashlib.sha256()
    for obj in objects:
        try:
            h.update(inspect.getsource(obj).encode())
        except (OSError, TypeError):  # no source (a builtin, a frozen module): its qualified name stands in
            h.update(getattr(obj, "__qualname__", repr(obj)).encode())
    return h.hexdigest()


def file_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    h = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in paths:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def stage_key(stage: Stage, input_keys: dict[str, str]) -> str:
    missing = [p for p in stage.files if not Path(p).exists()]
    if missing:
        raise ByollmError(f"stage {stage.name}: input {missing[0]} does not exist")
    parts = {
        "stage": stage.name,
        "config": stage.config,
        "code": _source_hash([stage.run, *stage.code]),
        "reads": {name: input_keys[name] for name in stage.reads},
        "files": {str(p): file_hash(Path(p)) for p in stage.files},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_stages(stages: Sequence[Stage], from_stage: str | None = None) -> None:
    names = [s.name for s in stages]
    seen: set[str] = set()
    for s in stages:
        if s.name in seen:
            raise ByollmError(f"stage {s.name} is defined twice")
        for r in s.reads:
            if r not in seen:
                raise ByollmError(f"stage {s.name} reads {r}, which is not an earlier stage ({', '.join(names)})")
        seen.add(s.name)
    if from_stage is not None and from_stage not in seen:
        raise ByollmError(f"--from {from_stage}: no such stage; the stages are {', '.join(names)}")


def _read_done(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None


def _move_aside(folder: Path) -> None:
    n = 1
    while folder.with_name(f"{folder.name}.stale-{n}").exists():
        n += 1
    folder.rename(folder.with_name(f"{folder.name}.stale-{n}"))


def run_pipeline(stages: Sequence[Stage], out: str | Path, *, from_stage: str | None = None,
                 until: str | None = None, log: Callable[[str], None] = print) -> list[StageResult]:
    """Run `stages` in order under `out/` (one folder each), skipping those already done with the same key."""
    check_stages(stages, from_stage)
    if until is not None:
        check_stages(stages, until)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys: dict[str, str] = {}
    results: list[StageResult] = []
    forced = False
    for stage in stages:
        forced = forced or stage.name == from_stage
        key = stage_key(stage, keys)
        keys[stage.name] = key
        folder = out / stage.name
        done = _read_done(folder) if folder.exists() else None
        if done is not None and done.get("key") == key and not forced:
            log(f"[capstone] {stage.name}: cached ({done['seconds']:.1f} s when it ran)")
            results.append(StageResult(stage.name, key, "cached", done["seconds"], done["figures"]))
        else:
            if folder.exists():
                started = _read_started(folder)
                if done is not None or started != key:  # finished with other inputs, or begun with other inputs
                    _move_aside(folder)
                else:
                    log(f"[capstone] {stage.name}: resuming an interrupted run in {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / "started.json", json.dumps({"key": key}))
            log(f"[capstone] {stage.name}: running{' - ' + stage.describe if stage.describe else ''}")
            t0 = time.perf_counter()
            ctx = StageContext(stage.name, folder, stage.config, {r: out / r for r in stage.reads},
                               {r.name: r.figures for r in results}, log)
            figures = stage.run(ctx) or {}
            seconds = time.perf_counter() - t0
            record = {"key": key, "stage": stage.name, "seconds": seconds, "figures": figures,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_text(folder / DONE, json.dumps(record, indent=2, default=str))
            log(f"[capstone] {stage.name}: done in {seconds:.1f} s")
            results.append(StageResult(stage.name, key, "ran", seconds, figures))
        if stage.name == until:
            break
    return results


def _read_started(folder: Path) -> str | None:
    try:
        return json.loads((folder / "started.json").read_text()).get("key")
    except (OSError, ValueError):
        return None
