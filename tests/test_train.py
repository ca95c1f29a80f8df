"""The training loop and the pretraining recipe: schedules, decay groups, accumulation, bit-identical resume,
crash recovery, DDP equivalence, the run folder, and the CLI verbs (pretrain, quickstart, eval)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import data_mirror
from safetensors.torch import load_file

from byollm.cli import main
from byollm.data import prepare
from byollm.errors import CheckpointError, ConfigError
from byollm.model import GPT, preset
from byollm.train import CausalLM, Run, TrainConfig, Trainer, load_config, lr_at, param_groups, pretrain
from byollm.train.optim import build_optimizer, build_scheduler
from byollm.train.pretrain import QUICKSTART

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> Path:
    """60k characters of Shakespeare, prepared once with a char tokenizer."""
    d = tmp_path_factory.mktemp("data")
    (d / "text.txt").write_text(shakespeare_text[:60_000])
    return prepare(d / "text.txt", "char", d / "prepared")


def tiny(tmp: Path, data_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, 64-wide GPT on 8 x 32-token batches: a step takes milliseconds."""
    base = {"model.preset": "gpt-tiny", "model.dropout": 0.1, "data.dir": str(data_dir), "batch_size": 8,
            "block_size": 32, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "log_interval": 1,
            "eval_interval": 3, "eval_batches": 2, "sample_interval": 0, "sample_tokens": 8,
            "checkpoint_interval": 3, "device": "cpu", "dtype": "fp32", "out_dir": str(tmp), "name": "run"}
    return load_config(None, {**base, **overrides})


def train_losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


# --------------------------------------------------------------------------------------------------
# Optimiser pieces
# --------------------------------------------------------------------------------------------------


def test_lr_schedule_matches_hand_computed_values() -> None:
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000)
    assert lr_at(0, **kw) == pytest.approx(1e-3 * 1 / 101)  # warmup starts above zero (nanoGPT)
    assert lr_at(49, **kw) == pytest.approx(1e-3 * 50 / 101)
    assert lr_at(99, **kw) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, **kw) == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr_at(1050, **kw) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cosine midpoint: halfway
    assert lr_at(2000, **kw) == pytest.approx(1e-4)  # end of decay: min_lr
    assert lr_at(5000, **kw) == pytest.approx(1e-4)  # and it stays there
    assert lr_at(1050, **kw, schedule="linear") == pytest.approx(5.5e-4)
    assert lr_at(1500, **kw, schedule="constant") == 1e-3
    # The scheduler applies exactly these values to the optimizer, step after step.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)  # no gradients: step() is free
    sched = build_scheduler(opt, lambda s: lr_at(s, **kw), 1e-3)
    seen = []
    for _ in range(2001):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3 / 101) and seen[1050] == pytest.approx(5.5e-4)
    assert seen[2000] == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_weight_decay_only_on_matrices(name: str) -> None:
    model = GPT(preset(name))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any("norm" in n for n in not_decayed) and not any("norm" in n for n in decayed)
    if name == "gpt-tiny":
        assert any(n.endswith(".bias") for n in not_decayed)
    assert "tok_emb.weight" in decayed and "blocks.0.attn.q_proj.weight" in decayed
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))  # every tensor once (tied: once)
    # Embeddings can be left out; frozen parameters are never in a group (LoRA trains adapters only).
    decay, _ = param_groups(model, 0.1, decay_embeddings=False)
    assert "tok_emb.weight" not in {names[id(p)] for p in decay["params"]}
    model.blocks[0].requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert not any(names[id(p)].startswith("blocks.0.") for p in decay["params"] + no_decay["params"])


class ListSource:
    """A BatchSource over a fixed list of batches."""

    def __init__(self, batches: list) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def test_grad_accumulation_equals_one_big_batch() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 128, (8, 16))
    y = torch.randint(0, 128, (8, 16))
    grads = []
    for k in (1, 4):
        torch.manual_seed(1)
        model = GPT(preset("llama-tiny"))
        cfg = TrainConfig(grad_accum=k, batch_size=8 // k)
        source = ListSource([(x[i:i + 8 // k], y[i:i + 8 // k]) for i in range(0, 8, 8 // k)])
        opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        trainer = Trainer(model, CausalLM(), source, opt, None, cfg, device=torch.device("cpu"), progress=False)
        loss, _, tokens = trainer.forward_backward()
        assert tokens == 8 * 16
        grads.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss1, g1), (loss4, g4) = grads
    torch.testing.assert_close(loss4, loss1, rtol=1e-6, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------------------------------------
# Runs, checkpoints, resume
# --------------------------------------------------------------------------------------------------


def test_run_writes_its_folder_and_keeps_last_checkpoints(tmp_path: Path, data_dir: Path) -> None:
    has_tb = importlib.util.find_spec("tensorboard") is not None  # optional: TensorBoard files when installed
    result = pretrain(tiny(tmp_path, data_dir, max_steps=5, checkpoint_interval=1, keep_last=2,
                           sample_interval=5, tensorboard=has_tb), progress=False)
    run = tmp_path / "run"
    assert result.run_dir == run and result.steps == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-4", "step-5"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-5"
    for f in ("config.yaml", "meta.json", "metrics.jsonl", "plots/loss.png", "samples.txt",
              "checkpoints/step-5/train_state.pt", "checkpoints/step-5/tokenizer", "checkpoints/step-5/config.json"):
        assert (run / f).exists(), f
    meta = json.loads((run / "meta.json").read_text())
    assert meta["seed"] == 1337 and meta["versions"]["torch"] == torch.__version__ and meta["hardware"]["cpu_cores"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 3, 5]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(events[1])
    assert "=== step 5 ===" in (run / "samples.txt").read_text()
    assert not has_tb or any((run / "tb").iterdir())
    assert result.val["bpb"] == pytest.approx(result.val["loss"] / math.log(2), rel=1e-6)  # char data: 1 byte/token
    # config.yaml is the full resolved config: it loads back and pins the model (vocab from the tokenizer).
    again = load_config(run / "config.yaml")
    vocab = json.loads((data_dir / "meta.json").read_text())["tokenizer"]["vocab_size"]
    assert again.model.vocab_size == vocab and again.model.n_layer == 2 and again.block_size == 32
    # A second run into the same folder without --resume is refused rather than overwriting it.
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(tiny(tmp_path, data_dir), progress=False)


def test_rewind_forgets_what_a_stopped_run_wrote_after_its_checkpoint(tmp_path: Path) -> None:
    run = Run(tmp_path)
    for step in (2, 4, 6):
        run.log({"event": "train", "step": step, "loss": 1.0, "lr": 0.1})
        run.add_sample(step, f"sample {step}\n")
    run.rewind(4)
    assert [e["step"] for e in map(json.loads, run.metrics_file.read_text().splitlines())] == [2, 4]
    assert [e["step"] for e in run.history] == [2, 4]
    text = run.samples_file.read_text()
    assert "=== step 4 ===" in text and "step 6" not in text


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical(tmp_path: Path, data_dir: Path, optimizer: str) -> None:
    # One run of 8 steps, against 4 steps + resume for 4 more. The schedule is pinned to 8 steps in both
    # (lr_decay_steps), and dropout is on, so the RNG state must be restored too. Muon's momentum lives in
    # the optimizer state like Adam's moments.
    common = dict(lr_decay_steps=8, checkpoint_interval=4, eval_interval=4, optimizer=optimizer)
    full = pretrain(tiny(tmp_path, data_dir, name="full", max_steps=8, **common), progress=False)
    pretrain(tiny(tmp_path, data_dir, name="split", max_steps=4, **common), progress=False)
    resumed = pretrain(tiny(tmp_path, data_dir, name="split", max_steps=8, resume=True, **common), progress=False)
    assert train_losses(full.run_dir) == train_losses(resumed.run_dir)  # the same 8 floats, exactly
    w_full, w_resumed = weights(full.checkpoint), weights(resumed.checkpoint)
    assert w_full.keys() == w_resumed.keys()
    assert all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)
    assert full.val["loss"] == resumed.val["loss"]


CRASH_SCRIPT = """
import sys, time, pathlib, torch
from byollm.train import load_config, pretrain
marker, overrides = pathlib.Path(sys.argv[1]), eval(sys.argv[2])
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):  # hangs inside the SECOND checkpoint write, after the weights
    if isinstance(obj, dict) and obj.get("step") == 4:
        marker.write_text("writing step 4")
        time.sleep(300)
    return real_save(obj, f, *args, **kwargs)

torch.save = slow_save
pretrain(load_config(None, overrides), progress=False)
"""


def test_sigkill_during_checkpoint_write_resumes_from_previous_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    overrides = {"model.preset": "gpt-tiny", "model.dropout": 0.1, "data.dir": str(data_dir), "batch_size": 8,
                 "block_size": 32, "max_steps": 6, "checkpoint_interval": 2, "keep_last": 3, "eval_interval": 0,
                 "log_interval": 1, "device": "cpu", "dtype": "fp32", "out_dir": str(tmp_path), "name": "run"}
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(marker), repr(overrides)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "the training process ended before the second checkpoint"
            assert time.monotonic() < deadline, "the second checkpoint write never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # killed half-way through writing checkpoints/step-4
    finally:
        proc.wait()
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-2"
    assert not (ckpts / "step-4").exists()
    assert [p for p in ckpts.iterdir() if p.name.startswith(".step-4.tmp")]  # the interrupted write

    result = pretrain(load_config(None, {**overrides, "resume": True}), progress=False)
    meta = json.loads((result.run_dir / "meta.json").read_text())
    assert meta["resumed_from"].endswith("step-2")
    assert result.steps == 6 and result.checkpoint == ckpts / "step-6"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-2", "step-4", "step-6"]  # tmp removed
    # metrics.jsonl reads as one run: the crashed run's steps 3-4 were replaced by the resumed ones.
    assert [e["step"] for e in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
            if e["event"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resume_with_another_architecture_is_a_clear_error(tmp_path: Path, data_dir: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    pretrain(tiny(tmp_path, data_dir, max_steps=2, eval_interval=0), progress=False)
    with pytest.raises(CheckpointError, match=r"different model .*n_layer 2 vs 3"):
        pretrain(tiny(tmp_path, data_dir, max_steps=4, resume=True, **{"model.n_layer": 3}), progress=False)
    code = main(["pretrain", "--model.preset", "gpt-tiny", "--model.n_layer", "3", "--data.dir", str(data_dir),
                 "--block_size", "32", "--device", "cpu", "--out_dir", str(tmp_path), "--name", "run",
                 "--resume", "true", "--max_steps", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("byollm: error: cannot resume") and "n_layer 2 vs 3" in err[-1]


# --------------------------------------------------------------------------------------------------
# Distributed data parallel
# --------------------------------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process(tmp_path: Path, data_dir: Path) -> None:
    # Same global batch: 2 ranks x 4 sequences vs 1 process x 8 (the sampler gives rank r its r-th share).
    args = ["--model.preset", "gpt-tiny", "--model.dropout", "0.0", "--data.dir", str(data_dir), "--block_size", "32",
            "--max_steps", "4", "--warmup_steps", "1", "--lr", "3e-3", "--log_interval", "1", "--eval_interval", "0",
            "--device", "cpu", "--dtype", "fp32", "--out_dir", str(tmp_path)]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "byollm.cli", "pretrain", *args, "--batch_size", "4", "--name", "ddp"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert main(["pretrain", *args, "--batch_size", "8", "--name", "single"]) == 0
    single_losses, ddp_losses = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(ddp_losses) == 4
    assert ddp_losses == pytest.approx(single_losses, rel=1e-5)
    assert json.loads((tmp_path / "ddp" / "meta.json").read_text())["world_size"] == 2
    w1, w2 = weights(tmp_path / "single/checkpoints/step-4"), weights(tmp_path / "ddp/checkpoints/step-4")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------------------------------
# Configs and the CLI
# --------------------------------------------------------------------------------------------------


def test_config_files_parse_and_match_their_sources() -> None:
    from byollm.cli import build_parser
    from byollm.config import config_from_args, instantiate

    assert load_config(REPO / "configs/quickstart.yaml") == load_config(None, QUICKSTART)
    alignment = ("sft-", "reward-", "dpo-", "orpo-", "ppo-", "finetune-")  # their own verbs (test_align, test_finetune)
    pretraining = [f for f in sorted((REPO / "configs").glob("*.yaml")) if not f.name.startswith(alignment)]
    assert len(pretraining) >= 3
    for f in pretraining:  # the CLI's parser reads each file the same way
        parser = build_parser()
        ns = instantiate(parser, parser.parse_args(["pretrain", "--config", str(f)]))
        assert config_from_args(TrainConfig, ns.pretrain) == load_config(f), f.name
    nano = load_config(REPO / "configs/nanogpt-shakespeare-char-cpu.yaml")
    assert (nano.model.n_layer, nano.model.n_head, nano.model.n_embd, nano.block_size, nano.batch_size) == (
        4, 4, 128, 64, 12)
    assert (nano.max_steps, nano.lr, nano.min_lr, nano.lr_decay_steps, nano.warmup_steps) == (
        2000, 1e-3, 1e-4, 2000, 100)
    assert (nano.betas, nano.weight_decay, nano.grad_clip, nano.eval_batches, nano.model.dropout) == (
        (0.9, 0.99), 0.1, 1.0, 20, 0.0)
    gpt2 = load_config(REPO / "configs/gpt2-124m-fineweb.yaml")
    assert gpt2.model.preset == "gpt2-124m" and gpt2.dtype == "bf16"


def test_bad_config_keys_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lrr' \(did you mean 'lr'\?\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"'model.n_layr' \(did you mean 'model.n_layer'\?\)"):
        load_config(None, {"model.n_layr": 3})
    with pytest.raises(ConfigError, match="dtype"):
        load_config(None, {"dtype": "fp8"})
    assert main(["pretrain", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lrr" in err and "'lr'" in err


def test_quickstart_and_eval_via_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch, shakespeare_text: str) -> None:
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))
    if (data_mirror() / "tinyshakespeare.txt").is_file():
        monkeypatch.setenv("BYOLLM_DATA_MIRROR", str(data_mirror()))
    else:
        monkeypatch.setenv("BYOLLM_OFFLINE", "1")  # no download attempt: the quickstart falls back to pydoc text
    code = main(["quickstart", "--max-steps", "25", "--preset", "gpt-tiny", "--block-size", "32", "--batch-size",
                 "16", "--out-dir", str(tmp_path / "runs"), "--name", "qs"])
    out = capsys.readouterr().out
    assert code == 0
    run = tmp_path / "runs" / "qs"
    assert f"run directory  {run}" in out and f"byollm generate {run}" in out and "val loss" in out
    for f in ("metrics.jsonl", "plots/loss.png", "samples.txt", "checkpoints/step-25/model.safetensors"):
        assert (run / f).is_file(), f
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [e["val_loss"] for e in events if e["event"] == "eval"]
    assert val[0] == pytest.approx(math.log(65), abs=0.3) and val[-1] < val[0] - 0.5  # it learned something
    assert train_losses(run)[-1] < train_losses(run)[0]

    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(run)
    assert loaded.path == run / "checkpoints" / "step-25" and loaded.tokenizer.vocab_size == 65

    assert main(["eval", str(run), "--data", "tinyshakespeare", "--max-batches", "5"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    val_loss = float(line.split()[2])
    assert line.startswith("val loss") and "perplexity" in line and "bits/byte" in line
    assert 1.0 < val_loss < 4.0


# --------------------------------------------------------------------------------------------------
# Muon and early stopping
# --------------------------------------------------------------------------------------------------


def test_newton_schulz_approximates_the_polar_factor() -> None:
    # Reference: U V^T from torch's SVD. Muon's iteration is deliberately inexact (singular values land in
    # roughly [0.7, 1.2]) but must point the same way as U V^T and keep the shape (tall and wide, batched).
    from byollm.train.optim import newton_schulz

    g = torch.Generator().manual_seed(0)
    for shape in [(2, 96, 32), (32, 96), (48, 48)]:
        m = torch.randn(*shape, generator=g)
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        polar = u @ vh
        x = newton_schulz(m)
        assert x.shape == m.shape
        sv = torch.linalg.svdvals(x)
        assert sv.min() > 0.6 and sv.max() < 1.25
        cos = (x * polar).sum(dim=(-2, -1)) / (x.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.95).all()


def test_muon_adamw_groups_match_torch_adamw_and_matrices_get_orthogonal_steps() -> None:
    from byollm.train.optim import build_muon, is_hidden_matrix

    torch.manual_seed(0)
    model = GPT(preset("llama-tiny"))
    reference = GPT(preset("llama-tiny"))
    reference.load_state_dict(model.state_dict())
    opt = build_muon(model, lr=1e-2, muon_lr=0.05, weight_decay=0.1, betas=(0.9, 0.95), momentum=0.0)
    hidden = {n for n, p in model.named_parameters() if is_hidden_matrix(n, p, model)}
    assert hidden and all(n.startswith("blocks.") and n.endswith(".weight") for n in hidden)
    assert "tok_emb.weight" not in hidden and "lm_head.weight" not in hidden
    others = [p for n, p in reference.named_parameters() if n not in hidden]
    ref_opt = torch.optim.AdamW([{"params": [p for p in others if p.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95))
    x = torch.randint(0, 128, (8, 48))  # 384 tokens: every gradient matrix has full rank
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m, o in ((model, opt), (reference, ref_opt)):
        m(x, x).loss.backward()
        o.step()
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if n in hidden:  # momentum 0: the step is -lr * scale * polar(grad), after decay
            step = (before[n] * (1 - 0.05 * 0.1) - p.detach()) / 0.05
            scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
            u, _, vh = torch.linalg.svd(p.grad, full_matrices=False)
            polar = u @ vh  # what Newton-Schulz approximates (its small singular values grow less exactly)
            def cos(a: torch.Tensor, b: torch.Tensor) -> float:
                return float((a * b).sum() / (a.norm() * b.norm()))
            # much closer to the polar factor than the raw gradient is, and no direction over ~1
            assert cos(step, polar) > 0.8 and cos(step, polar) > cos(p.grad, polar) + 0.1
            assert torch.linalg.svdvals(step).max() < 1.25 * scale
        else:
            torch.testing.assert_close(p, ref[n], rtol=1e-5, atol=1e-6)


def test_muon_trains_faster_than_adamw_on_a_tiny_run(tmp_path: Path, data_dir: Path) -> None:
    # The property the quickstart relies on, at toy scale: same steps, same data, lower loss.
    common = dict(max_steps=40, eval_interval=40, checkpoint_interval=0, lr=3e-3, min_lr=0.0,
                  **{"model.dropout": 0.0})
    adam = pretrain(tiny(tmp_path, data_dir, name="adam", **common), progress=False)
    muon = pretrain(tiny(tmp_path, data_dir, name="muon", optimizer="muon", muon_lr=0.02, **common),
                    progress=False)
    assert muon.val["loss"] < adam.val["loss"] - 0.05


def test_stop_at_val_loss_ends_the_run_at_that_evaluation(tmp_path: Path, data_dir: Path) -> None:
    first = pretrain(tiny(tmp_path, data_dir, name="probe", max_steps=9, eval_interval=3), progress=False)
    events = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    val_at = {e["step"]: e["val_loss"] for e in events if e["event"] == "eval"}
    # stop at the evaluation after step 6: a threshold between its loss and step 3's
    threshold = (val_at[3] + val_at[6]) / 2
    assert val_at[6] <= threshold < val_at[3]
    stopped = pretrain(tiny(tmp_path, data_dir, name="stop", max_steps=9, eval_interval=3,
                            stop_at_val_loss=threshold), progress=False)
    assert stopped.steps == 6 and stopped.checkpoint is not None and stopped.checkpoint.name.endswith("6")
    assert all(e["train_seconds"] > 0 for e in map(json.loads, (stopped.run_dir / "metrics.jsonl")
                                                     .read_text().splitlines()) if e["event"] == "train")
