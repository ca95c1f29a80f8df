"""The entry point of a `byollm cloud sagemaker` job: SageMaker runs `python sagemaker_entry.py` once on every
instance, and this starts `torchrun` there, one process per GPU, all nodes in one job.

It reads what SageMaker's training toolkit (in the PyTorch Deep Learning Container) puts in the environment:

    SM_HOSTS         ["algo-1", "algo-2"]: the instances of the job; the first one hosts the rendezvous
    SM_CURRENT_HOST  "algo-2": this instance (its index in SM_HOSTS is the node rank)
    SM_NUM_GPUS      8: GPUs of this instance (0 on CPU instances: one process)
    SM_HPS           {"recipe": "pretrain", "config": "configs/x.yaml", "name": "x", "overrides": [...]}: the
                     job's hyperparameters, JSON-decoded (set by `byollm.scale.sagemaker`)
    SM_CHANNEL_DATA  /opt/ml/input/data/data: where the `--data` S3 channel was put; it becomes the run's
                     BYOLLM_DATA_MIRROR, the folder byollm looks in first for a dataset (e.g. fineweb-edu/)

and runs, on node R of N:

    torchrun --nnodes N --nproc_per_node G --node_rank R --master_addr algo-1 --master_port 29500 \\
        -m byollm.cli pretrain --config configs/x.yaml --out_dir /opt/ml/checkpoints --name x --resume true ...

`/opt/ml/checkpoints` is the job's checkpoint folder: SageMaker copies it to the job's checkpoint S3 URI while
the job runs and copies it back onto a restarted (spot) instance, so `--resume true` with the fixed run name
continues from the newest complete checkpoint (and starts at step 0 when there is none yet).

This file runs before (and outside) the byollm package's own imports, on the training image: standard library
only. `torchrun_command` is a pure function of the environment, so it is tested without SageMaker or torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping

CHECKPOINT_DIR = "/opt/ml/checkpoints"  # SageMaker's default CheckpointConfig.LocalPath
MASTER_PORT = 29500
DATA_CHANNEL = "data"


class EntryError(Exception):
    """The environment is not one SageMaker sets up (or the job's hyperparameters are incomplete)."""


def _hyperparameters(env: Mapping[str, str]) -> dict:
    try:
        hps = json.loads(env.get("SM_HPS", "{}"))
    except json.JSONDecodeError as e:
        raise EntryError(f"SM_HPS is not JSON ({e}); run this through `byollm cloud sagemaker`") from None
    missing = [k for k in ("recipe", "config", "name") if k not in hps]
    if missing:
        raise EntryError(f"the job's hyperparameters lack {', '.join(missing)}; launch it with `byollm cloud "
                         "sagemaker`, which sets them")
    overrides = hps.get("overrides", [])
    if isinstance(overrides, str):  # a toolkit that did not JSON-decode the value
        overrides = json.loads(overrides)
    hps["overrides"] = [str(x) for x in overrides]
    return hps


def torchrun_command(env: Mapping[str, str]) -> list[str]:
    """The torchrun command line this node runs, from SageMaker's environment variables."""
    try:
        hosts = sorted(json.loads(env["SM_HOSTS"]))  # every node sorts the same list: the same ranks everywhere
        current = env["SM_CURRENT_HOST"]
    except (KeyError, json.JSONDecodeError) as e:
        raise EntryError(f"not a SageMaker training environment ({e!r} in SM_HOSTS / SM_CURRENT_HOST)") from None
    if current not in hosts:
        raise EntryError(f"SM_CURRENT_HOST {current!r} is not in SM_HOSTS {hosts}")
    gpus = int(env.get("SM_NUM_GPUS", "0") or 0)
    hps = _hyperparameters(env)
    return ["torchrun", "--nnodes", str(len(hosts)), "--nproc_per_node", str(max(gpus, 1)),
            "--node_rank", str(hosts.index(current)), "--master_addr", hosts[0], "--master_port", str(MASTER_PORT),
            "-m", "byollm.cli", str(hps["recipe"]), "--config", str(hps["config"]), "--out_dir", CHECKPOINT_DIR,
            "--name", str(hps["name"]), "--resume", "true", *hps["overrides"]]


def run_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment of the training processes: SageMaker's, plus the data channel as byollm's data mirror."""
    out = dict(env)
    channel = env.get(f"SM_CHANNEL_{DATA_CHANNEL.upper()}")
    if channel:
        out["BYOLLM_DATA_MIRROR"] = channel
    return out


def main() -> int:
    try:
        cmd = torchrun_command(os.environ)
    except EntryError as e:
        print(f"sagemaker_entry: error: {e}", file=sys.stderr)
        return 2
    print("sagemaker_entry: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=run_environment(os.environ))


if __name__ == "__main__":
    sys.exit(main())
