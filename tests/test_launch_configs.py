"""The launch files in configs/: the SLURM template and the Hugging Face Accelerate configs.

- configs/slurm/pretrain.sbatch is run (bash, with stand-ins for `scontrol` and `srun` on PATH): the torchrun line
  it hands srun is checked against torchrun's own option strings (`torchrun --help`) and parsed by torchrun's
  parser, and what follows `-m byollm.cli` is parsed by byollm's CLI into the pretrain config it would train;
- every configs/accelerate/*.yaml is loaded by accelerate 1.16 (an unknown top-level key is an error there), each
  nested fsdp/deepspeed key must be one `accelerate launch` knows (it copies them over silently, so a typo would be
  lost), and the launch environment accelerate builds from the file carries the settings the file promises; the
  FSDP one also builds accelerate's FSDP plugin and resolves its wrap class on a real byollm model; the CPU one
  really runs two processes on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_sagemaker import torchrun_args

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "configs" / "slurm" / "pretrain.sbatch"
ACCELERATE = ROOT / "configs" / "accelerate"
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------------------------------
# SLURM
# --------------------------------------------------------------------------------------------------


def test_sbatch_is_valid_bash_with_its_directives_in_the_header() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, capture_output=True, text=True)
    lines = SBATCH.read_text().splitlines()
    assert lines[0] == "#!/bin/bash"
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    # sbatch stops reading #SBATCH lines at the first command: every directive must come before it
    assert directives and max(directives) < first_command
    assert {"--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue"} <= {
        lines[i].split()[1] for i in directives}


def run_sbatch(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run the template as SLURM would on the first node; returns the argv srun got, and the script's output."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    got = tmp_path / "srun.json"
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(got)!r}, "
                                  "'w'))\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n"
                                      "[ \"$3\" = 'gpu-[7-8]' ] && printf 'gpu-7\\ngpu-8\\n'\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
            "SLURM_JOB_NODELIST": "gpu-[7-8]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242"}
    r = subprocess.run(["bash", str(SBATCH), *args], env={**base, **(env or {})}, capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(got.read_text()), r.stdout


@pytest.fixture(scope="module")
def torchrun_help() -> str:
    return subprocess.run([str(VENV_BIN / "torchrun"), "--help"], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def test_sbatch_runs_torchrun_with_c10d_rendezvous_on_the_first_node(tmp_path: Path, torchrun_help: str) -> None:
    srun, out = run_sbatch(tmp_path, "--batch_size", "16")
    assert srun[0] == "--kill-on-bad-exit=1" and srun[1] == "torchrun"
    cmd = srun[1:]
    launcher = cmd[1:cmd.index("-m")]
    for flag in (w for w in launcher if w.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", torchrun_help), f"{flag}: not in torchrun --help"
    args = torchrun_args(cmd)
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == \
        ("2", "8", "c10d", "gpu-7:29500", "4242")
    assert args.module and args.training_script == "byollm.cli"
    assert "2 nodes x 8 GPUs, rendezvous at gpu-7:29500" in out

    from byollm.cli import build_parser
    from byollm.commands import recipe_config
    from byollm.config import instantiate

    parser = build_parser()
    cfg = recipe_config("pretrain", instantiate(parser, parser.parse_args(args.training_script_args))["pretrain"])
    assert (cfg.name, cfg.resume, cfg.batch_size, cfg.max_steps, cfg.model.preset) == \
        ("gpt2-124m-fineweb", True, 16, 19073, "gpt2-124m")


def test_sbatch_takes_its_settings_from_the_environment(tmp_path: Path) -> None:
    srun, _ = run_sbatch(tmp_path, env={"CONFIG": "configs/quickstart.yaml", "NAME": "qs", "GPUS_PER_NODE": "4",
                                        "PORT": "29600"})
    args = torchrun_args(srun[1:])
    assert (args.nproc_per_node, args.rdzv_endpoint) == ("4", "gpu-7:29600")
    assert args.training_script_args == ["pretrain", "--config", "configs/quickstart.yaml", "--name", "qs",
                                         "--resume", "true"]
    assert shlex.join(args.training_script_args)  # plain words, no stray quoting


# --------------------------------------------------------------------------------------------------
# Accelerate
# --------------------------------------------------------------------------------------------------

CONFIGS = sorted(p.name for p in ACCELERATE.glob("*.yaml"))
NESTED_PREFIX = {"fsdp_config": "fsdp_", "deepspeed_config": ""}  # how accelerate launch names their options


def test_the_five_accelerate_configs_are_there() -> None:
    assert CONFIGS == ["cpu.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "fsdp.yaml", "multi_gpu.yaml"]


def launch_environment(path: Path) -> tuple[Any, dict[str, str]]:
    """What `accelerate launch --config_file PATH train.py` makes of the file: its arguments and the
    environment of the processes it starts (accelerate's own functions, up to the point of starting them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return args, prepare_multi_gpu_env(args)
    return args, prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", CONFIGS)
def test_accelerate_loads_the_config_and_knows_every_key(name: str) -> None:
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = ACCELERATE / name
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(ClusterConfig.__dataclass_fields__)
    options = {a.dest for a in launch_command_parser()._actions}
    for section, prefix in NESTED_PREFIX.items():
        for key in raw.get(section, {}):
            option = key if key.startswith(prefix) else prefix + key
            assert option in options, f"{name}: {section}.{key} is not an option of accelerate launch"


def test_a_typo_in_a_config_is_caught(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text((ACCELERATE / "multi_gpu.yaml").read_text().replace("mixed_precision:", "mixed_precison:"))
    with pytest.raises(ValueError, match="unknown keys.*mixed_precison"):
        load_config_from_file(str(bad))


def test_multi_gpu_is_ddp_in_bf16() -> None:
    args, env = launch_environment(ACCELERATE / "multi_gpu.yaml")
    assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and args.nproc_per_node == "8"


def test_fsdp_is_fsdp2_full_shard_wrapping_byollm_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    args, env = launch_environment(ACCELERATE / "fsdp.yaml")
    assert args.use_fsdp
    expected = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block",
                "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_OFFLOAD_PARAMS": "false",
                "FSDP_ACTIVATION_CHECKPOINTING": "false", "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert {k: env.get(k) for k in expected} == expected
    # accelerate's FSDP plugin, built from that environment as in the training processes
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    from byollm.model import build_model
    from byollm.model.config import preset
    from byollm.model.model import Block

    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT and plugin.activation_checkpointing is False
    plugin.set_auto_wrap_policy(build_model(preset("gpt-tiny")))  # "Block" must name a class of our model
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {Block}


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2.yaml", "2"), ("deepspeed_zero3.yaml", "3")])
def test_deepspeed_configs_are_their_zero_stage_without_offload_in_bf16(name: str, stage: str) -> None:
    args, env = launch_environment(ACCELERATE / name)
    assert args.use_deepspeed
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"] == "none"
    assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "none"
    assert env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT") == ("true" if stage == "3" else None)


PROBE = """
import json, sys, torch
from accelerate import Accelerator
a = Accelerator()
total = a.reduce(torch.tensor([float(a.process_index + 1)]), reduction="sum").item()
if a.is_main_process:
    state = [str(a.distributed_type), a.num_processes, str(a.device), a.mixed_precision, total]
    json.dump(state, open(sys.argv[1], "w"))
a.wait_for_everyone()  # then leave the group together: a rank exiting while its peer still talks aborts gloo
torch.distributed.destroy_process_group()
"""


def test_cpu_config_runs_two_processes_on_the_cpu(tmp_path: Path) -> None:
    args, env = launch_environment(ACCELERATE / "cpu.yaml")
    assert env["ACCELERATE_USE_CPU"] == "True" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert args.num_processes == 2 and not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)
    # accelerate launch starts a MULTI_CPU config's processes with mpirun; without an MPI here, torchrun starts the
    # config's processes (its comment says so) with the environment accelerate built from it
    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(PROBE)
    run_env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # torchrun sets them
    run_env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", str(args.num_processes),
                        str(script), str(out)], env=run_env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    kind, n, device, precision, total = json.loads(out.read_text())
    assert (kind, n, device.split(":")[0], precision) == ("DistributedType.MULTI_CPU", 2, "cpu", "no")
    assert total == 3.0  # rank 0's 1 + rank 1's 2, summed over gloo
