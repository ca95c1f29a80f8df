"""Scaling out on the one loop: FSDP2 and FSDP + tensor parallelism give the losses of one process; DCP
checkpoints reshard to another world size with the data position; activation checkpointing leaves gradients
unchanged; evaluation with unequal shares does not deadlock; a two-"node" run and an elastic restart finish.

Every run here is real torchrun on CPU processes (gloo). The reference is always one plain process with the
same global batch: FSDP and TP change where numbers live and the order of some sums, so the tolerances are
float32 rounding (rel 1e-5 on losses, 1e-5 absolute on weights after a few AdamW steps).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from byollm.cli import main
from byollm.data import RandomWindowSampler, prepare
from byollm.errors import ConfigError
from byollm.model import GPT, preset
from byollm.train import load_config
from byollm.train.distributed import DistInfo
from byollm.train.parallel import ParallelConfig, Parallelism, check_splittable, checkpoint_blocks

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "text.txt").write_text(shakespeare_text[:60_000])
    return prepare(d / "text.txt", "char", d / "prepared")


def common(data_dir: Path, out: Path, **over: object) -> list[str]:
    """A 2-layer Llama (untied, so TP can split it) on 32-token windows, AdamW, fixed decay length."""
    values = {"model.preset": "llama-tiny", "model.dropout": 0.0, "data.dir": data_dir, "block_size": 32,
              "warmup_steps": 1, "lr": 3e-3, "lr_decay_steps": 4, "log_interval": 1, "eval_interval": 2,
              "eval_batches": 3, "device": "cpu", "dtype": "fp32", "checkpoint_interval": 2,
              "optimizer": "adamw", "out_dir": out, **over}
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def torchrun(nproc: int, args: list[str], *launcher: str, timeout: int = 240) -> subprocess.CompletedProcess:
    launch = list(launcher) or ["--standalone"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", str(nproc),
           "-m", "byollm.cli", "pretrain", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def events(run: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in events(run, "train")]


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=atol, msg=k)


# --------------------------------------------------------------------------------------------------
# Strategies against one process
# --------------------------------------------------------------------------------------------------


def test_fsdp_two_processes_match_one_process(tmp_path: Path, data_dir: Path) -> None:
    # Global batch 8 both ways, 4 sequences per micro-batch over all ranks (so the same samples):
    # 2 ranks x 2 sequences x 2 accumulated micro-batches vs 1 x 4 x 2.
    torchrun(2, common(data_dir, tmp_path, batch_size=2, grad_accum=2, max_steps=4, name="fsdp",
                       **{"dist.strategy": "fsdp"}))
    assert main(["pretrain", *common(data_dir, tmp_path, batch_size=4, grad_accum=2, max_steps=4,
                                     name="single")]) == 0
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    assert losses(fsdp) == pytest.approx(losses(single), rel=1e-5) and len(losses(fsdp)) == 4
    norms = [e["grad_norm"] for e in events(fsdp, "train")]  # the norm over all shards, not one rank's
    assert norms == pytest.approx([e["grad_norm"] for e in events(single, "train")], rel=1e-4)
    assert_same_weights(single / "checkpoints/step-4", fsdp / "checkpoints/step-4")
    # The 3 validation batches of 2 sequences split 2 + 1 over the ranks (unequal shares: rank 1 runs a
    # weight-0 forward instead of leaving rank 0 waiting); the mean is that of one process over the same 3.
    assert main(["pretrain", *common(data_dir, tmp_path, batch_size=2, max_steps=1, name="eval")]) == 0
    assert events(fsdp, "eval")[0]["val_loss"] == pytest.approx(events(tmp_path / "eval", "eval")[0]["val_loss"],
                                                                rel=1e-6)
    meta = json.loads((fsdp / "meta.json").read_text())
    assert (meta["world_size"], meta["strategy"]) == (2, "fsdp")
    assert (fsdp / "checkpoints/step-4/dcp/.metadata").is_file()
    assert len(list((fsdp / "checkpoints/step-4/dcp").glob("*.distcp"))) == 2  # one file of shards per rank
    assert "=== step 4 ===" in (fsdp / "samples.txt").read_text()  # every rank took part in the generation


def test_fsdp_with_tensor_parallel_on_four_processes_matches_one_process(tmp_path: Path, data_dir: Path) -> None:
    # A 2 x 2 mesh: TP over pairs of ranks (the pair reads one batch), FSDP over the two pairs.
    torchrun(4, common(data_dir, tmp_path, batch_size=3, max_steps=4, name="tp",
                       **{"dist.strategy": "fsdp+tp", "dist.tp": 2}))
    assert main(["pretrain", *common(data_dir, tmp_path, batch_size=6, max_steps=4, name="single")]) == 0
    tp, single = tmp_path / "tp", tmp_path / "single"
    assert losses(tp) == pytest.approx(losses(single), rel=1e-5)
    assert_same_weights(single / "checkpoints/step-4", tp / "checkpoints/step-4")
    train = events(tp, "train")
    assert train[-1]["tokens_seen"] == 4 * 6 * 32  # TP peers' identical tokens are counted once
    assert json.loads((tp / "meta.json").read_text())["tp"] == 2


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    cfg = preset("llama-tiny", dropout=0.1)  # dropout on: the recomputation must redraw the same masks
    plain, checkpointed = GPT(cfg), GPT(cfg)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_blocks(checkpointed)
    x, y = torch.randint(0, cfg.vocab_size, (2, 2, 16))
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(x, y).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    assert list(plain.state_dict()) == list(checkpointed.state_dict())  # the checkpoint keys do not change


# --------------------------------------------------------------------------------------------------
# Checkpoints that reshard, with the data position
# --------------------------------------------------------------------------------------------------


def test_sampler_position_reshards_to_any_world_size() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)

    def consumed(sources: list[RandomWindowSampler], calls: int) -> list[int]:
        out: list[int] = []
        for _ in range(calls):
            for s in sources:  # ranks in order: their shares, concatenated, are the global batch
                out += s.next_batch()[0][:, 0].tolist()
        return out

    def ranks(world: int, state: dict | None = None) -> list[RandomWindowSampler]:
        out = [RandomWindowSampler(tokens, 6 // world, 16, seed=7, rank=r, world_size=world) for r in range(world)]
        for s in out:
            if state is not None:
                s.load_state_dict(state)
        return out

    uninterrupted = consumed(ranks(1), 5)
    two = ranks(2)
    first = consumed(two, 2)
    state = two[0].state_dict()
    assert state["position"] == 12
    for world in (1, 3):
        assert first + consumed(ranks(world, state), 3) == uninterrupted, world
    # Another global batch (4 per call instead of 6) still continues at sample 12: nothing twice, nothing skipped.
    other = [RandomWindowSampler(tokens, 2, 16, seed=7, rank=r, world_size=2) for r in range(2)]
    for s in other:
        s.load_state_dict(state)
    assert first + consumed(other, 3) == uninterrupted[:24]


def test_sharded_checkpoint_from_two_processes_resumes_on_one_and_on_three(tmp_path: Path, data_dir: Path) -> None:
    # Global batch 6 = 2 x 3 = 1 x 6 = 3 x 2. Saved at step 2 by 2 ranks; continued to step 4 by 1 and by 3.
    assert main(["pretrain", *common(data_dir, tmp_path, batch_size=6, max_steps=4, name="uninterrupted")]) == 0
    torchrun(2, common(data_dir, tmp_path, batch_size=3, max_steps=2, name="two", **{"dist.strategy": "fsdp"}))
    for name in ("one", "three"):
        shutil.copytree(tmp_path / "two", tmp_path / name)
    resume = {"resume": "true", "dist.strategy": "fsdp", "max_steps": 4}
    assert main(["pretrain", *common(data_dir, tmp_path, batch_size=6, name="one", **resume)]) == 0
    torchrun(3, common(data_dir, tmp_path, batch_size=2, name="three", **resume))
    reference = tmp_path / "uninterrupted"
    for name in ("one", "three"):
        run = tmp_path / name
        assert losses(run) == pytest.approx(losses(reference), rel=1e-5), name
        assert_same_weights(reference / "checkpoints/step-4", run / "checkpoints/step-4")
        state = torch.load(run / "checkpoints/step-4/train_state.pt", weights_only=True)
        assert state["data"]["position"] == 4 * 6  # exactly the samples of 4 steps, none twice or skipped
    # The gathered weights beside the shards are an ordinary checkpoint: generate from it.
    assert main(["generate", str(tmp_path / "three"), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0


# --------------------------------------------------------------------------------------------------
# Launching: two "nodes", an elastic restart
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_run_with_c10d_rendezvous_and_meta_init(tmp_path: Path, data_dir: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    args = common(data_dir, tmp_path, batch_size=2, max_steps=3, name="nodes",
                  **{"dist.strategy": "fsdp", "dist.meta_init": "true"})
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                               endpoint, "--rdzv_id", "byollm-test", "-m", "byollm.cli", "pretrain", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    outs = [node.communicate(timeout=240) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    run = tmp_path / "nodes"
    assert json.loads((run / "meta.json").read_text())["world_size"] == 2
    first = losses(run)[0]
    assert abs(first - np.log(59)) < 0.3  # a fresh initialisation made shard by shard: ~ln(vocab) at step 1
    assert (run / "checkpoints/step-3/model.safetensors").is_file()


def test_elastic_restart_resumes_from_the_latest_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    args = common(data_dir, tmp_path, batch_size=2, max_steps=150, name="elastic", resume="true",
                  checkpoint_interval=10, eval_interval=0, lr_decay_steps=150, keep_last=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "byollm.cli", "pretrain", *args]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    latest = tmp_path / "elastic/checkpoints/latest"
    deadline = time.monotonic() + 120
    while not latest.is_file() and time.monotonic() < deadline and agent.poll() is None:
        time.sleep(0.05)
    assert latest.is_file(), "no checkpoint was written"
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-run; the agent restarts both
    _, err = agent.communicate(timeout=240)
    assert agent.returncode == 0, err[-4000:]
    run = tmp_path / "elastic"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["resumed_from"] is not None and "step-" in meta["resumed_from"]
    steps = [e["step"] for e in events(run, "train")]
    assert steps == list(range(1, 151))  # one uninterrupted history: the killed attempt's later steps rewound


# --------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------


def test_strategies_refuse_what_they_cannot_do() -> None:
    cfg = preset("llama-tiny")  # 4 heads, 2 kv heads, MLP 160
    check_splittable(cfg, 2)
    with pytest.raises(ConfigError, match="n_kv_head=2"):
        check_splittable(cfg, 4)
    with pytest.raises(ConfigError, match="untied embeddings"):
        check_splittable(preset("gpt-tiny"), 2)
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        Parallelism(ParallelConfig(strategy="fsdp+tp", tp=2), DistInfo())
    with pytest.raises(ConfigError, match="cpu_offload"):
        Parallelism(ParallelConfig(strategy="fsdp", cpu_offload=True), DistInfo())
    with pytest.raises(ConfigError, match="meta_init needs byollm.s sharding"):
        ParallelConfig(meta_init=True)
    with pytest.raises(ConfigError, match="optimizer muon"):
        load_config(None, {"optimizer": "muon", "dist.strategy": "fsdp"})
    with pytest.raises(ConfigError, match="strategy"):
        load_config(None, {"dist.strategy": "zero4"})
