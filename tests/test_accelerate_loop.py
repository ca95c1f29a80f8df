"""`dist.strategy accelerate`: the same loop with Hugging Face Accelerate doing prepare / accumulate / backward /
clip, against byollm's native loop on the same data (tiny Llama, CPU, fp32).

- one process: the losses are the same floats as the native loop's (Accelerate adds no arithmetic in fp32);
- `accelerate launch` itself (one CPU process: a multi-CPU config starts its processes with mpirun, which this
  machine does not have) runs the loop to the same losses;
- two gloo processes under torchrun (Accelerate's MULTI_CPU: its DDP wrapper, its no_sync accumulation) match
  the native loop in one process with the same global batch, and a resume of its checkpoint continues the
  same loss sequence.
Accelerate's FSDP and DeepSpeed modes exist only on GPUs, so they are not run here (docs/section_3_scaling.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_distributed import ENV, assert_same_weights, common, data_dir, losses, torchrun  # noqa: F401

from byollm.cli import main

pytest.importorskip("accelerate")
ACCELERATE = {"dist.strategy": "accelerate"}
FOUR_STEPS = {"batch_size": 4, "grad_accum": 2, "max_steps": 4}  # one process: 4 x 2 sequences per step


def test_accelerate_in_one_process_gives_the_native_losses(tmp_path: Path, data_dir: Path) -> None:  # noqa: F811
    assert main(["pretrain", *common(data_dir, tmp_path, **FOUR_STEPS, name="native")]) == 0
    assert main(["pretrain", *common(data_dir, tmp_path, **FOUR_STEPS, name="acc", **ACCELERATE)]) == 0
    assert losses(tmp_path / "acc") == losses(tmp_path / "native") and len(losses(tmp_path / "native")) == 4
    assert_same_weights(tmp_path / "native/checkpoints/step-4", tmp_path / "acc/checkpoints/step-4", atol=0)
    meta = json.loads((tmp_path / "acc/meta.json").read_text())
    assert (meta["strategy"], meta["accelerate_mixed_precision"]) == ("accelerate", "no")


def test_accelerate_launch_runs_the_same_loop(tmp_path: Path, data_dir: Path) -> None:  # noqa: F811
    assert main(["pretrain", *common(data_dir, tmp_path, **FOUR_STEPS, name="native")]) == 0
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "1",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run([*launch, "-m", "byollm.cli", "pretrain",
                           *common(data_dir, tmp_path, **FOUR_STEPS, name="launched", **ACCELERATE)],
                          capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    assert losses(tmp_path / "launched") == losses(tmp_path / "native")


def test_accelerate_on_two_cpu_processes_matches_one_native_process_and_resumes(tmp_path: Path,
                                                                                 data_dir: Path) -> None:  # noqa: F811
    # Global batch 8 both ways: 2 ranks x 2 sequences x 2 micro-batches vs 1 x 4 x 2. The first run stops at
    # step 2; the second resumes its checkpoint to step 4 (the schedule is fixed by lr_decay_steps 4).
    torchrun(2, common(data_dir, tmp_path, batch_size=2, grad_accum=2, max_steps=2, name="acc", **ACCELERATE))
    torchrun(2, common(data_dir, tmp_path, batch_size=2, grad_accum=2, max_steps=4, name="acc", resume="true",
                       **ACCELERATE))
    assert main(["pretrain", *common(data_dir, tmp_path, **FOUR_STEPS, name="native")]) == 0
    acc, native = tmp_path / "acc", tmp_path / "native"
    assert losses(acc) == pytest.approx(losses(native), rel=1e-5) and len(losses(acc)) == 4
    assert_same_weights(native / "checkpoints/step-4", acc / "checkpoints/step-4")
    meta = json.loads((acc / "meta.json").read_text())
    assert (meta["world_size"], meta["strategy"]) == (2, "accelerate")
