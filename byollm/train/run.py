"""The run directory: everything a training run leaves behind, in one folder.

    runs/<name>/
      config.yaml             the full resolved config: `byollm pretrain --config runs/<name>/config.yaml` reruns it
      meta.json               git commit, library versions, seed, hardware
      metrics.jsonl           one JSON object per event: {"event": "train" | "eval", "step": ..., ...}
      plots/loss.png          train and val loss, and the learning rate
      samples.txt             text generated during training
      tb/                     TensorBoard event files (with tensorboard: true)
      checkpoints/step-<N>/   model.safetensors, config.json, tokenizer/, meta.json, train_state.pt
      checkpoints/latest      the name of the newest complete checkpoint

Only rank 0 writes: on other ranks a Run is created with enabled=False and every method does nothing.
Checkpoints are written atomically (a temporary folder renamed into place, then `latest` replaced), so a
crash at any moment leaves the previous checkpoint intact and `latest` pointing at a complete one.

Every recipe starts the same way, through this module's `RunConfig` section:

    with launch(cfg) as where:                      # torchrun's process group, the device, the autocast dtype
        ...                                         # load the model, read the data
        cfg, run, resume_from = start_run(cfg, where, default_name="sft")   # the folder, new or resumed
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from byollm.atomic import atomic_write_text
from byollm.checkpoint import LATEST, WEIGHTS, latest_checkpoint, library_versions, save_checkpoint
from byollm.config import Section
from byollm.errors import ByollmError, ConfigError
from byollm.tokenizer import Tokenizer
from byollm.train import distributed
from byollm.train.parallel import ParallelConfig, Parallelism

TRAIN_STATE = "train_state.pt"
DTYPES = ("auto", "fp32", "bf16")


# --------------------------------------------------------------------------------------------------
# The run section of every recipe's config, and the start-up every recipe shares
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig(Section):
    """Where a run lives and what it runs on: read by `launch` and `start_run`."""

    seed: int = 1337
    """seed of everything random: initialisation, data order, dropout, sampling"""
    out_dir: str = "runs"
    """the run folder is out_dir/name"""
    name: str | None = None
    """the run folder's name; default: the recipe (or preset) and the date and time"""
    resume: bool = False
    """continue out_dir/name from its latest complete checkpoint (needs --name)"""
    device: str = "auto"
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 or mps; under torchrun each rank takes its own GPU"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16: autocast (weights stay fp32); auto: bf16 on GPUs that have it, fp32 elsewhere"""
    compile: bool = False
    """torch.compile the model for training"""
    tensorboard: bool = False
    """also write TensorBoard event files to the run's tb/ (needs `pip install tensorboard`)"""

    def check(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"name {self.name!r} must be a plain folder name (runs/<name>/)")


@dataclass
class Where:
    """What `launch` found: this process's rank among the others, its device and the autocast dtype."""

    dist: distributed.DistInfo
    autocast_dtype: torch.dtype | None
    parallel: Parallelism

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def printer(self, progress: bool = True) -> Callable[[str], None]:
        """A print to stderr on rank 0 (when `progress`), silent elsewhere."""
        return printer(self.dist.is_main and progress)


@contextlib.contextmanager
def launch(cfg: RunConfig) -> Iterator[Where]:
    """Join torchrun's process group when there is one (and leave it at the end), pick the device, resolve the
    autocast dtype, and allow TF32 for the fp32 matmuls left on a GPU."""
    dist = distributed.setup(cfg.device)
    try:
        if dist.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        parallel_cfg = getattr(cfg, "dist", None) or ParallelConfig()  # (the recipes with a dist.* section)
        autocast_dtype = resolve_dtype(cfg.dtype, dist.device)
        if parallel_cfg.strategy == "accelerate":  # Accelerate takes the processes, the device and the precision
            from byollm.train.hf_accelerate import accelerate_parallelism

            parallel: Parallelism = accelerate_parallelism(parallel_cfg, dist, autocast_dtype,
                                                           getattr(cfg, "grad_accum", 1))
            dist, autocast_dtype = parallel.dist, None
        else:
            parallel = Parallelism(parallel_cfg, dist)
        yield Where(dist, autocast_dtype, parallel)
    finally:
        if dist.enabled:
            distributed.teardown()


C = TypeVar("C", bound=RunConfig)


def start_run(cfg: C, where: Where, default_name: str, *, run_class: type[Run] | None = None,
              check_resume: Callable[[Path], None] | None = None) -> tuple[C, Run, Path | None]:
    """The run folder, new or the one to resume: returns the config with its name filled in, the Run, and
    the checkpoint to resume from (None: start at step 0). All ranks agree on the name (rank 0's clock);
    a folder with checkpoints is never overwritten without resume; what an interrupted checkpoint write
    left behind is removed; config.yaml is the full resolved config (rerun it with --config); last, every
    random generator is seeded with cfg.seed. `check_resume(checkpoint)` may refuse a checkpoint before
    anything is written (for example one of a different model)."""
    if cfg.resume and cfg.name is None:
        raise ConfigError("resume needs the run's --name (the folder under out_dir to continue)")
    name = distributed.broadcast_object(cfg.name or f"{default_name}-{time.strftime('%Y%m%d-%H%M%S')}", where.dist)
    cfg = dataclasses.replace(cfg, name=name)
    run = (run_class or Run)(Path(cfg.out_dir) / name, enabled=where.dist.is_main, tensorboard=cfg.tensorboard)
    resume_from = find_resume_checkpoint(run, cfg.resume)
    if resume_from is not None and check_resume is not None:
        check_resume(resume_from)
    run.remove_partial_checkpoints()
    run.write_config(cfg.to_yaml())
    seed_everything(cfg.seed)
    return cfg, run, resume_from


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def find_resume_checkpoint(run: Run, resume: bool) -> Path | None:
    """The checkpoint to resume from; an error when a run folder would be overwritten by accident."""
    ckpts = run.list_checkpoints() if run.checkpoints.is_dir() else []
    if ckpts and not resume:
        raise ConfigError(f"{run.path} already has checkpoints (newest {ckpts[-1].name}); pass --resume true to "
                          "continue that run, or choose another --name")
    if resume and not ckpts:
        print(f"[byollm] resume: {run.path} has no complete checkpoint yet; starting from step 0", file=sys.stderr)
    if not ckpts:
        return None
    return latest_checkpoint(run.checkpoints)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for "auto" | "fp32" | "bf16" (None: plain fp32).

    auto is bf16 on GPUs that support it and fp32 elsewhere: on CPUs without native bf16 matmuls
    (AVX-512-BF16 / AMX) bf16 autocast is several times SLOWER than fp32 (measured ~9x on AVX2 cores; see
    configs/quickstart.yaml). On CPUs with AMX, try dtype bf16 and compare tokens/s."""
    if name == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "auto":
        return torch.bfloat16 if cuda_bf16 else None
    if device.type == "cuda" and not cuda_bf16:
        raise ConfigError(f"dtype bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bf16; use fp32")
    return torch.bfloat16


def printer(enabled: bool) -> Callable[[str], None]:
    """`say(message)`: one line to stderr, flushed, when enabled (rank 0 with progress on)."""
    def say(message: str) -> None:
        if enabled:
            print(message, file=sys.stderr, flush=True)

    return say


def format_duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class Run:
    """The run folder (see the module docstring); every method is a no-op when not enabled (ranks > 0)."""

    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []  # every event logged, for the plot
        self.provenance: dict[str, Any] | None = None  # from meta.json, copied into every checkpoint's meta
        self._tb = None
        if not enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ByollmError(f"tensorboard: true needs the tensorboard package ({e}); "
                                  "pip install tensorboard, or set tensorboard: false") from None
            self._tb = SummaryWriter(str(self.path / "tb"))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def plot_file(self) -> Path:
        return self.path / "plots" / "loss.png"

    @property
    def samples_file(self) -> Path:
        return self.path / "samples.txt"

    # ---- files written once -----------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        if self.enabled:
            atomic_write_text(self.path / "config.yaml", yaml_text)

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.provenance = meta.get("provenance")  # a checkpoint copied out of the run keeps where it came from
        if self.enabled:
            atomic_write_text(self.path / "meta.json", json.dumps(meta, indent=2, default=str) + "\n")

    # ---- events -----------------------------------------------------------------------------------
    def log(self, event: dict[str, Any]) -> None:
        """Append one event to metrics.jsonl (and TensorBoard)."""
        if not self.enabled:
            return
        self.history.append(event)
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(event) + "\n")
        if self._tb is not None:
            for key, value in event.items():
                if key not in ("event", "step") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{event['event']}/{key}", value, event["step"])
            self._tb.flush()

    def add_sample(self, step: int, text: str) -> None:
        if self.enabled:
            with open(self.samples_file, "a") as f:
                f.write(f"=== step {step} ===\n{text}\n\n")

    def rewind(self, step: int) -> None:
        """Resuming from checkpoint `step`: forget the events and samples that the run which stopped wrote
        after it, so both files read as one uninterrupted run."""
        if not self.enabled:
            return
        if self.metrics_file.is_file():
            kept = [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]
            self.history = [e for e in kept if e.get("step", 0) <= step]
            atomic_write_text(self.metrics_file, "".join(json.dumps(e) + "\n" for e in self.history))
        if self.samples_file.is_file():
            blocks = re.split(r"(?m)^(?==== step \d+ ===$)", self.samples_file.read_text())
            kept_text = [b for b in blocks if b and int(b.split()[2]) <= step]
            atomic_write_text(self.samples_file, "".join(kept_text))

    def plot(self) -> Path | None:
        """plots/loss.png: train loss and val loss against step, the learning rate below."""
        if not self.enabled:
            return None
        from matplotlib.figure import Figure  # the object API: no global backend, no display needed

        train = [e for e in self.history if e["event"] == "train"]
        val = [e for e in self.history if e["event"] == "eval"]
        fig = Figure(figsize=(8, 6), tight_layout=True)
        ax, ax_lr = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        ax.plot([e["step"] for e in train], [e["loss"] for e in train], label="train", alpha=0.8)
        if val:
            ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "o-", label="val")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        ax_lr.plot([e["step"] for e in train], [e["lr"] for e in train], color="tab:green")
        ax_lr.set_ylabel("learning rate")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
        self.plot_file.parent.mkdir(exist_ok=True)
        tmp = self.plot_file.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, self.plot_file)
        return self.plot_file

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, step: int, model: torch.nn.Module, tokenizer: Tokenizer | None,
                        train_state: dict[str, Any], meta: dict[str, Any], keep_last: int,
                        extra: Callable[[Path], None] | None = None) -> Path | None:
        """checkpoints/step-<step>/ with the weights and train_state.pt in ONE atomic write, then `latest`,
        then delete all but the newest `keep_last`. `extra(tmp)` writes train_state.pt (and more, such as
        a sharded run's DCP folder) into the checkpoint's temporary folder instead."""
        if not self.enabled:
            return None
        path = self.checkpoints / f"step-{step}"
        if self.provenance is not None:
            meta = {**meta, "provenance": self.provenance}
        save_checkpoint(model, path, tokenizer, meta={"step": step, **meta},
                        extra=extra or (lambda tmp: torch.save(train_state, tmp / TRAIN_STATE)))
        atomic_write_text(self.checkpoints / LATEST, path.name + "\n")
        for old in self.list_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        done = [p for p in self.checkpoints.glob("step-*") if (p / WEIGHTS).is_file() and (p / TRAIN_STATE).is_file()]
        return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))

    def remove_partial_checkpoints(self) -> list[Path]:
        """Delete the temporary folders of checkpoint writes that a crash interrupted."""
        if not self.enabled or not self.checkpoints.is_dir():
            return []
        partial = [p for p in self.checkpoints.iterdir() if p.name.startswith(".step-")]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        return partial

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def load_train_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAIN_STATE
    if not path.is_file():
        raise ByollmError(f"{checkpoint} has no {TRAIN_STATE}: it is a model checkpoint, not a training "
                          "checkpoint, so the run cannot resume from it")
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------
# meta.json: what produced this run
# --------------------------------------------------------------------------------------------------


def git_info(where: Path | None = None) -> dict[str, Any] | None:
    """The commit (and whether the tree had changes) of the git checkout byollm runs from, if any."""
    cwd = where or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(seed: int, device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """meta.json of a run: when, from which commit, with which libraries and hardware, plus the recipe's `extra`;
    `provenance` (the data read, with licences, and the model it started from) is derived from `extra`."""
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_info(), "versions": library_versions(),
            "seed": seed, "hardware": hardware(device), **(extra or {})}
    return {**meta, "provenance": provenance(meta)}


# --------------------------------------------------------------------------------------------------
# Provenance: what a model was made from, recorded when it is made (the model card reads it)
# --------------------------------------------------------------------------------------------------
# A licence follows a model through every step (the card's rule is in byollm/interop/model_card.py), so a run
# records, while the facts are at hand, each dataset it read with its registry licence, and the provenance of the
# model it started from, copied in (the base folder may be gone by the time anyone writes the card):
#
#     {"recipe": "sft", "datasets": [{"name": "alpaca", "license": "CC BY-NC 4.0", "hf": "tatsu-lab/alpaca", ...}],
#      "base": {"recipe": "converted", "name": "smollm2-135m-instruct", "license": "Apache-2.0", "base": null, ...}}

MAX_LINEAGE = 16  # models a provenance follows back (a loop of base paths must not recurse forever)


def dataset_record(name: str, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """One dataset a run read: its registry name, licence and homepage (`byollm.data.registry`); a local file the
    registry does not know has licence None (unknown). `source`: the Source.describe() the run recorded."""
    from byollm.data.registry import find_spec

    if source is not None and source.get("kind") == "fallback":  # the stand-in corpus, not the dataset named
        return {"name": "CPython pydoc topics (fallback corpus)", "license": "PSF-2.0", "fallback_for": name}
    spec = find_spec(name)
    if spec is None:
        return {"name": Path(name).name, "path": (source or {}).get("path") or name, "license": None}
    return {"name": spec.name, "license": spec.license or None, "homepage": spec.homepage or None,
            "hf": spec.hf.path if spec.hf is not None else None,
            "subset": (source or {}).get("subset")}


def provenance(meta: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """The provenance of a model from the meta.json entries that made it: a run's (recipe, dataset or data, base,
    policy, adapter) or a conversion's (converted_from, license, packaged_model, hf_repo)."""
    data = meta.get("data")
    if isinstance(data, dict):  # pretrain's run meta: {"dataset": ..., "source": {...}}
        datasets = [dataset_record(data["dataset"], data.get("source"))] if data.get("dataset") else []
    else:  # a checkpoint's meta ("data": name) or an align run's ("dataset": name or path)
        name = data or meta.get("dataset")
        datasets = [dataset_record(str(name))] if name else []
    recipe = meta.get("recipe") or meta.get("created_by") or (
        "converted" if meta.get("converted_from") else "pretrain" if datasets else None)
    record: dict[str, Any] = {"recipe": recipe, "datasets": datasets}
    for key in ("converted_from", "packaged_model", "hf_repo", "base_model", "source", "language"):
        if meta.get(key) is not None:
            record[key] = meta[key]
    gguf = meta.get("gguf") if isinstance(meta.get("gguf"), dict) else {}
    license = meta.get("license") or gguf.get("license")  # an imported model's own licence
    if license:
        record["license"] = license
    if gguf.get("name"):
        record["name"] = gguf["name"]
    parent = meta.get("base") or meta.get("policy")
    if meta.get("adapter"):  # byollm merge: the adapter's run folder knows the fine-tune's data and base
        record["adapter"] = checkpoint_provenance(Path(meta["adapter"]).parent, depth + 1)
    if parent:
        record["base"] = checkpoint_provenance(parent, depth + 1)
    return record


def checkpoint_provenance(path: str | Path, depth: int = 0) -> dict[str, Any]:
    """The provenance of the model at `path` (a checkpoint, run or Hugging Face directory, or a fine-tune's run
    folder): what its meta.json (or its run's) recorded, else derived from their entries; a path that is gone is
    {"path": ..., "missing": true}."""
    from byollm.checkpoint import META, resolve_checkpoint

    path = Path(path)
    if depth > MAX_LINEAGE:
        return {"path": str(path), "missing": True, "note": f"lineage longer than {MAX_LINEAGE} models"}
    try:
        kind, ckpt = resolve_checkpoint(path)
        if kind == "hf":
            return {"path": str(ckpt), **hf_dir_provenance(ckpt)}
        folders = [ckpt] + ([ckpt.parent.parent] if ckpt.parent.name == "checkpoints" else [])
    except ByollmError:
        if not (path / META).is_file():
            return {"path": str(path), "missing": True}
        folders = [path]  # a run folder without checkpoints (a LoRA run keeps its adapter instead)
    metas = []
    for folder in folders:
        try:
            metas.append(json.loads((folder / META).read_text()) if (folder / META).is_file() else {})
        except (OSError, json.JSONDecodeError):
            metas.append({})
    for meta in metas:
        if isinstance(meta.get("provenance"), dict):
            return {"path": str(folders[0]), **meta["provenance"]}
    merged = {k: v for meta in reversed(metas) for k, v in meta.items()}  # the checkpoint's entries win
    return {"path": str(folders[0]), **provenance(merged, depth)}


def hf_dir_provenance(hf_dir: Path) -> dict[str, Any]:
    """What a Hugging Face model directory says about itself: its model card's YAML (license, base_model,
    datasets, language)."""
    import yaml

    readme, record = hf_dir / "README.md", {"recipe": "huggingface", "datasets": []}
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    if text.startswith("---"):
        try:
            front = yaml.safe_load(text.split("---", 2)[1]) or {}
        except yaml.YAMLError:
            front = {}
        if isinstance(front, dict):
            if front.get("license"):
                record["license"] = str(front["license"])
            from byollm.data.registry import REGISTRY

            names = front.get("datasets") or []
            by_hub_id = {spec.hf.path: name for name, spec in REGISTRY.items() if spec.hf is not None}
            record["datasets"] = [dataset_record(by_hub_id[str(n)]) if str(n) in by_hub_id else
                                  {"name": str(n), "license": None, "hf": str(n)}
                                  for n in (names if isinstance(names, list) else [names])]
            for key in ("base_model", "language"):
                if front.get(key):
                    record[key] = front[key]
    return record


__all__ = ["Run", "RunConfig", "TRAIN_STATE", "Where", "checkpoint_provenance", "dataset_record",
           "find_resume_checkpoint", "format_duration", "git_info", "hardware", "hf_dir_provenance", "launch",
           "load_train_state", "printer", "provenance", "resolve_dtype", "run_meta", "seed_everything", "start_run"]
