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
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from byollm.atomic import atomic_write_text
from byollm.checkpoint import LATEST, WEIGHTS, library_versions, save_checkpoint
from byollm.errors import ByollmError

TRAIN_STATE = "train_state.pt"


class Run:
    def __init__(self, path: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.history: list[dict[str, Any]] = []  # every event logged, for the plot
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
    def save_checkpoint(self, step: int, model: torch.nn.Module, tokenizer: Any, train_state: dict[str, Any],
                        meta: dict[str, Any], keep_last: int) -> Path | None:
        """checkpoints/step-<step>/ with the weights and train_state.pt in ONE atomic write, then `latest`,
        then delete all but the newest `keep_last`."""
        if not self.enabled:
            return None
        path = self.checkpoints / f"step-{step}"
        save_checkpoint(model, path, tokenizer, meta={"step": step, **meta},
                        extra=lambda tmp: torch.save(train_state, tmp / TRAIN_STATE))
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
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": git_info(), "versions": library_versions(),
            "seed": seed, "hardware": hardware(device), **(extra or {})}


__all__ = ["Run", "TRAIN_STATE", "git_info", "hardware", "load_train_state", "run_meta"]
