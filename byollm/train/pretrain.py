"""The pretraining recipe: a TrainConfig in, a trained model in runs/<name>/ out. Reads top to bottom.

    byollm pretrain --config configs/nanogpt-shakespeare-char-cpu.yaml
    torchrun --standalone --nproc_per_node 8 -m byollm.cli pretrain --config configs/gpt2-124m-fineweb.yaml
    byollm quickstart                        # a small Llama-style model on Tiny Shakespeare, on the CPU

    >>> from byollm.train import load_config, pretrain
    >>> result = pretrain(load_config("configs/quickstart.yaml", {"max_steps": 100}))
    >>> result.checkpoint                    # runs/<name>/checkpoints/step-100
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byollm.checkpoint import load_checkpoint
from byollm.data import (
    RandomWindowSampler,
    SequentialSampler,
    bits_per_byte,
    cache_dir,
    eval_batches,
    load_prepared,
    prepare,
    read_meta,
    resolve,
)
from byollm.data.registry import find_spec
from byollm.data.streaming import StreamingTokenSource, held_out, open_stream, stream_tokenizer
from byollm.errors import CheckpointError, ConfigError, DataError
from byollm.generate import generate_text
from byollm.model import GPT, ModelConfig
from byollm.model.config import model_choice_of, model_config_from
from byollm.sampling import SamplingParams
from byollm.tokenizer import Tokenizer
from byollm.train import distributed
from byollm.train.config import DataConfig, TrainConfig, load_config
from byollm.train.loop import CausalLM, Trainer, evaluate
from byollm.train.optim import build_training_optimizer
from byollm.train.perf import peak_flops
from byollm.train.run import (
    Where,
    format_duration,
    launch,
    resolve_dtype,
    run_meta,
    seed_everything,
    start_run,
)


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path | None  # the last checkpoint written
    steps: int
    val: dict[str, float]  # the last evaluation: loss, ppl, bpb
    train_seconds: float  # wall time of fit(), evaluations and checkpoints included
    tokens_per_s: float  # mean training throughput (evaluation excluded)
    sample: str | None  # the last text generated during training


def pretrain(cfg: TrainConfig, *, progress: bool = True) -> PretrainResult:
    with launch(cfg) as where:
        return _pretrain(cfg, where, progress)


def _pretrain(cfg: TrainConfig, where: Where, progress: bool) -> PretrainResult:
    dist, device, autocast_dtype = where.dist, where.device, where.autocast_dtype
    say = where.printer(progress)

    # 1. Data: tokenise once into train.bin / val.bin (cached), then sample random windows from it; or, for a
    #    corpus too big for that (FineWeb-Edu), stream its documents and tokenise them while training.
    streaming = is_streaming(cfg.data)
    data_dir: Path | None = None
    if streaming:
        stream = open_stream(cfg.data.name, allow_download=True)
        tokenizer = stream_tokenizer(cfg.data.tokenizer)
        val = held_out(stream, tokenizer, cfg.data.val_docs)
        val.meta["tokenizer"] = {"spec": cfg.data.tokenizer, "type": type(tokenizer).__name__,
                                 "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
        data: Any = _StreamData(val.meta, val.tokens, tokenizer)
    else:
        data_dir = prepare_data(cfg.data, dist)
        data = load_prepared(data_dir)
        tokenizer = data.tokenizer

    # 2. The model's shape: the preset with overrides; the vocabulary follows the tokenizer.
    model_cfg = model_config_from(cfg.model, vocab_size=tokenizer.vocab_size, block_size=cfg.block_size)
    block_size = cfg.block_size or model_cfg.block_size
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} ids; leave model.vocab_size unset to follow the tokenizer")
    if block_size > model_cfg.block_size:
        raise ConfigError(f"block_size={block_size} is longer than model.block_size={model_cfg.block_size}")
    cfg = dataclasses.replace(cfg, block_size=block_size, model=model_choice_of(model_cfg, cfg.model.preset))

    # 3. The run folder: new, or the one to resume (of the same model).
    cfg, run, resume_from = start_run(cfg, where, cfg.model.preset,
                                      check_resume=lambda checkpoint: check_same_model(checkpoint, model_cfg))
    name = cfg.name

    # 4. The model: random initialisation (seeded by start_run), or the weights of the checkpoint we resume from
    #    (a sharded run reads them from the checkpoint's DCP shards instead, at whatever world size it has now).
    #    Then spread it over the ranks (dist.strategy): sharded (FSDP, TP) before the optimizer sees it.
    parallel = where.parallel
    if parallel.tp > 1 and block_size % parallel.tp:
        raise ConfigError(f"block_size={block_size} must be a multiple of dist.tp={parallel.tp}: sequence "
                          "parallelism splits every sequence into equal slices")
    if cfg.dist.meta_init and parallel.sharded:
        with torch.device("meta"):
            model = GPT(model_cfg)
    elif resume_from is None or cfg.dist.sharded:
        model = GPT(model_cfg).to(device)
    else:
        model = load_checkpoint(resume_from, device=device).model
    fsdp_dtype = autocast_dtype if parallel.sharded else None  # FSDP's mixed precision replaces autocast
    parallel.shard(model, compile=cfg.compile, autocast_dtype=fsdp_dtype)
    if fsdp_dtype is not None:
        autocast_dtype = None
    seed_everything(cfg.seed + parallel.data_rank)  # each replica draws its own dropout masks

    # 5. Optimiser and schedule.
    optimizer, scheduler = build_training_optimizer(model, cfg, cfg.max_steps, device.type)

    # 6. Batches: each rank its own share of every step's windows; fixed windows for validation.
    sampler: Any
    if streaming:  # each rank reads every world_size-th document after the held-out ones
        if parallel.tp > 1:
            raise ConfigError("streaming data with dist.strategy fsdp+tp is not supported yet: use a prepared "
                              "dataset (data.streaming false) or dist.strategy fsdp")
        sampler = StreamingTokenSource(stream, tokenizer, cfg.batch_size, block_size, skip_docs=cfg.data.val_docs,
                                       rank=dist.rank, world_size=dist.world_size, prefetch=cfg.data.prefetch,
                                       gather=lambda obj: distributed.gather_objects(obj, dist))
    else:
        sampler = RandomWindowSampler(data.train, cfg.batch_size, block_size, cfg.seed, parallel.data_rank,
                                      parallel.data_world)

    def val_batches():
        return eval_batches(data.val, cfg.batch_size, block_size, cfg.eval_batches, seed=cfg.seed,
                            rank=parallel.data_rank, world_size=parallel.data_world)

    def val_extras(loss: float) -> dict[str, float]:
        return {"ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(loss, data.meta, "val")}

    def sample(m: torch.nn.Module) -> str:
        params = SamplingParams(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed)
        return cfg.sample_prompt + generate_text(m, tokenizer, cfg.sample_prompt, params, sliding_window=True)[0]

    flops_per_token = model.flops_per_token(block_size)
    peak, peak_source = peak_flops(device, autocast_dtype or torch.float32, cfg.peak_flops)
    trainer = Trainer(model, CausalLM(), sampler, optimizer, scheduler, cfg, device=device, dist=dist,
                      autocast_dtype=autocast_dtype, run=run, tokenizer=tokenizer, eval_data=val_batches,
                      eval_extras=val_extras, sample=sample, sample_interval=cfg.sample_interval,
                      stop_at_val_loss=cfg.stop_at_val_loss, compile=cfg.compile, seed=cfg.seed,
                      flops_per_token=flops_per_token, peak_flops=peak,
                      checkpoint_meta={"run": name, "data": data.meta.get("dataset")}, progress=progress,
                      parallel=parallel)
    if resume_from is not None:
        trainer.resume(resume_from)
        run.rewind(trainer.step)

    tokens_per_step = cfg.batch_size * block_size * cfg.grad_accum * parallel.data_world
    run.write_meta(run_meta(cfg.seed, device, {
        "run": name, "world_size": dist.world_size, "strategy": cfg.dist.strategy, "tp": parallel.tp,
        "autocast_dtype": str(fsdp_dtype or autocast_dtype or torch.float32),
        **({"accelerate_mixed_precision": parallel.mixed_precision} if parallel.mixed_precision is not None else {}),
        "compile": cfg.compile, "num_params": model.num_params(), "tokens_per_step": tokens_per_step,
        "flops_per_token": flops_per_token, "peak_flops": peak, "peak_flops_source": peak_source,
        "data": {"dir": str(data_dir) if data_dir else None, "dataset": data.meta.get("dataset"),
                 "source": data.meta.get("source"), "tokenizer": data.meta.get("tokenizer"),
                 "split": data.meta.get("split")},
        "resumed_from": str(resume_from) if resume_from else None}))
    say(f"[byollm] run {run.path}: {model.num_params() / 1e6:.2f}M parameters, {_describe(model_cfg)}")
    if streaming:
        say(f"[byollm] data {stream.notice}; {tokenizer.vocab_size}-id tokenizer {cfg.data.tokenizer}; val: the "
            f"first {cfg.data.val_docs:,} documents ({len(data.val):,} tokens)")
    else:
        say(f"[byollm] data {data.meta.get('dataset')} ({data.meta['tokenizer']['type']} tokenizer, "
            f"{tokenizer.vocab_size} ids): {len(data.train):,} train / {len(data.val):,} val tokens  [{data_dir}]")
    strategy = f", {cfg.dist.strategy}" + (f" (tp {parallel.tp})" if parallel.tp > 1 else "") if dist.enabled else ""
    if parallel.mixed_precision is not None:
        strategy = f", accelerate (mixed precision {parallel.mixed_precision})"
    say(f"[byollm] {device} {str(fsdp_dtype or autocast_dtype or torch.float32).removeprefix('torch.')}"
        f"{' compiled' if cfg.compile else ''}, {dist.world_size} process(es){strategy}; {tokens_per_step:,} "
        f"tokens/step ({cfg.batch_size} x {block_size} x {cfg.grad_accum} accum x {parallel.data_world}), "
        f"{cfg.max_steps} steps" + (f" at most, or what fits in {cfg.time_budget_s:g} s" if cfg.time_budget_s else ""))
    if resume_from is not None:
        say(f"[byollm] resumed from {resume_from} (step {trainer.step})")

    # 7. Train.
    t0 = time.perf_counter()
    try:
        trainer.fit()  # (it evaluates at the last step, which also draws the final plot)
    finally:
        if streaming:
            sampler.close()  # stop its background thread
    seconds = time.perf_counter() - t0
    run.close()

    tok_s = trainer.throughput()
    checkpoint = trainer.last_checkpoint or resume_from  # (resume_from: the run had already finished)
    result = PretrainResult(run.path, checkpoint, trainer.step, dict(trainer.last_eval), seconds, tok_s,
                            trainer.last_sample)
    v = result.val
    val_text = (f"; val loss {v['loss']:.4f} (ppl {v['ppl']:.2f}, {v['bpb']:.3f} bits/byte)" if v else "")
    say(f"[byollm] trained to step {result.steps} in {format_duration(seconds)} ({tok_s:,.0f} tokens/s){val_text}")
    files = ["config.yaml", "meta.json", "metrics.jsonl", "plots/loss.png", "samples.txt"]
    say(f"[byollm] wrote {run.path}/: {', '.join(f for f in files if (run.path / f).exists())}")
    if checkpoint is not None:
        say(f"[byollm] checkpoint: {checkpoint}")
    return result


# --------------------------------------------------------------------------------------------------
# The pieces the recipe uses
# --------------------------------------------------------------------------------------------------


@dataclass
class _StreamData:
    """What the recipe uses of a prepared folder, for a streamed dataset: meta (for bits per byte), val tokens."""

    meta: dict[str, Any]
    val: Any
    tokenizer: Tokenizer


def is_streaming(data: DataConfig) -> bool:
    """data.streaming when set; otherwise whether the registry streams the dataset (and no prepared dir is given)."""
    if data.streaming is not None:
        return data.streaming
    spec = find_spec(data.name)
    return spec is not None and spec.streaming and data.dir is None


def prepare_data(data: DataConfig, dist: distributed.DistInfo | None = None) -> Path:
    """A prepared data folder for `data`: data.dir when given, else a cache folder keyed by the dataset's
    checksum and the tokenizer spec, prepared on first use (by rank 0 only; the others wait)."""
    dist = dist or distributed.DistInfo()
    if data.dir is not None and (Path(data.dir) / "meta.json").is_file():
        return Path(data.dir)
    out = Path(data.dir) if data.dir is not None else None
    if dist.is_main:
        source = resolve(data.name, allow_fallback=data.allow_fallback)  # resolved once: one notice, one try
        if out is None:
            slug = f"{source.name}-{_tokenizer_slug(data.tokenizer)}-{source.sha256[:12]}"
            out = cache_dir().parent / "prepared" / slug
        if not (out / "meta.json").is_file():
            print(f"[byollm] preparing {source.name} (tokenizer: {data.tokenizer}) -> {out}", file=sys.stderr)
            prepare(source, data.tokenizer, out)
    return Path(distributed.broadcast_object(str(out), dist))


def _tokenizer_slug(spec: str) -> str:
    if Path(spec).expanduser().is_dir():  # a tokenizer folder: name it by its content (not by model weights)
        h = hashlib.sha256()
        for f in sorted(Path(spec).expanduser().rglob("*")):
            if f.is_file() and f.suffix in (".json", ".txt", ".model"):
                h.update(f.name.encode() + f.read_bytes())
        return f"tok{h.hexdigest()[:10]}"
    return spec.replace(":", "")


def check_same_model(checkpoint: Path, model_cfg: ModelConfig) -> None:
    saved = ModelConfig.load(checkpoint / "config.json")
    diffs = [f"{k} {v} vs {getattr(model_cfg, k)}" for k, v in saved.to_dict().items() if getattr(model_cfg, k) != v]
    if diffs:
        raise CheckpointError(f"cannot resume from {checkpoint}: it is a different model (checkpoint vs config: "
                              f"{', '.join(diffs)}); resume with the run's own config.yaml or use another --name")


def evaluate_checkpoint(ckpt: str | Path, data: str, *, split: str = "val", batch_size: int = 16,
                        block_size: int | None = None, max_batches: int | None = None, device: str = "auto",
                        dtype: str = "fp32", progress: bool = True) -> dict[str, Any]:
    """`byollm eval`: the checkpoint's mean loss over a whole split (every token once), perplexity and bits per
    byte. `data` is a dataset name/path (tokenised with the checkpoint's own tokenizer) or a prepared folder."""
    dev = distributed.pick_device(device)
    loaded = load_checkpoint(ckpt, device=dev)
    model = loaded.model
    if Path(data).is_dir() and (Path(data) / "meta.json").is_file():
        data_dir = Path(data)
    else:
        if loaded.tokenizer is None:
            raise CheckpointError(f"{loaded.path} has no tokenizer/ to tokenise {data} with; pass a prepared "
                                  "data folder made with the model's tokenizer instead")
        tokenizer_dir = loaded.path / "tokenizer" if (loaded.path / "tokenizer").is_dir() else loaded.path  # HF: top
        data_dir = prepare_data(DataConfig(name=data, tokenizer=str(tokenizer_dir)))
    meta = read_meta(data_dir)
    if meta["tokenizer"]["vocab_size"] > model.config.vocab_size:
        raise DataError(f"{data_dir} was tokenised with {meta['tokenizer']['vocab_size']} ids but the model has "
                        f"{model.config.vocab_size}: it was prepared with another tokenizer")
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    tokens = getattr(load_prepared(data_dir), split)
    t = block_size or model.config.block_size
    batches: Any = SequentialSampler(tokens, batch_size, t)
    n = len(batches)
    if max_batches is not None:
        batches = [b for _, b in zip(range(max_batches), batches, strict=False)]
        n = len(batches)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=n, desc=f"eval {split}", unit="batch")
    t0 = time.perf_counter()
    result = evaluate(model, CausalLM(), batches, device=dev, autocast_dtype=resolve_dtype(dtype, dev))
    loss = result["loss"]
    return {"checkpoint": str(loaded.path), "data": str(data_dir), "split": split, "loss": loss,
            "ppl": math.exp(min(loss, 700.0)), "bpb": bits_per_byte(loss, meta, split), "tokens": int(result["tokens"]),
            "exact": max_batches is None, "seconds": time.perf_counter() - t0}


def quickstart_config(overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The `byollm quickstart` run (the same as configs/quickstart.yaml, which explains the choices), with
    dotted overrides such as {"max_steps": 20, "model.preset": "gpt-tiny"}. A shorter run (max_steps below
    the default) is the same run compressed: warmup, evaluations and checkpoints scale with it. A max_steps
    given is the run's length: the time budget is off then, unless time_budget_s is given too."""
    values = {**QUICKSTART, **(overrides or {})}
    if "max_steps" in (overrides or {}) and "time_budget_s" not in (overrides or {}):
        values["time_budget_s"] = None
    scale = values["max_steps"] / QUICKSTART["max_steps"]
    if scale < 1:
        for key in ("warmup_steps", "eval_interval", "checkpoint_interval"):
            if key not in (overrides or {}):
                values[key] = max(1, round(QUICKSTART[key] * scale))
    return load_config(None, values)


# Kept equal to configs/quickstart.yaml by a test (the configs/ folder is not part of the installed package).
QUICKSTART: dict[str, Any] = {
    "model.preset": "llama-nano",
    "model.tie_embeddings": False,
    "data.name": "tinyshakespeare",
    "data.tokenizer": "char",
    "data.allow_fallback": True,
    "batch_size": 16,
    "block_size": 128,
    "max_steps": 1000,
    "time_budget_s": 270,
    "optimizer": "muon",
    "muon_lr": 0.03,
    "lr": 3e-3,
    "min_lr": 0.0,
    "schedule": "linear",
    "warmup_steps": 20,
    "betas": [0.9, 0.99],
    "weight_decay": 0.1,
    "eval_interval": 250,
    "eval_batches": 20,
    "log_interval": 10,
    "checkpoint_interval": 500,
    "sample_tokens": 300,
    "device": "cpu",
    "dtype": "fp32",
}


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _describe(c: ModelConfig) -> str:
    arch = "Llama-style (RoPE, RMSNorm, SwiGLU)" if c.pos_embedding == "rope" else "GPT-2-style"
    return f"{arch}, {c.n_layer} layers x {c.n_embd} wide, {c.n_head} heads ({c.n_kv_head} kv)"


__all__ = ["QUICKSTART", "PretrainResult", "check_same_model", "evaluate_checkpoint", "is_streaming", "prepare_data",
           "pretrain", "quickstart_config"]
