"""What each `byollm` verb does: parse nothing, call one library function, print. The parser is in `byollm.cli`.

Each `cmd_*` takes the verb's parsed (and instantiated) jsonargparse Namespace. Recipe verbs turn it into their
config dataclass with `byollm.config.config_from_args`, the same path `parse_config` uses for YAML files.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from byollm.config import config_from_args
from byollm.errors import ByollmError
from byollm.model.config import list_presets, model_config_from, preset


def _torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ByollmError(f"unknown dtype '{name}'; use one of {', '.join(table)}")
    return table[name]


def cmd_generate(a: Any) -> None:
    from byollm.checkpoint import load_checkpoint
    from byollm.generate import stream_text
    from byollm.sampling import SamplingParams

    loaded = load_checkpoint(a.ckpt, device=a.device, dtype=_torch_dtype(a.dtype))
    print(f"[byollm] loaded {loaded.describe()} ({loaded.model.num_params() / 1e6:.1f}M parameters)", file=sys.stderr)
    if loaded.tokenizer is None:
        raise ByollmError(f"{loaded.path} has no tokenizer; train one with `byollm tokenizer train` and pass "
                          "--tokenizer DIR, or convert a checkpoint that carries one")
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed,
                            stop_strings=list(a.stop or []))
    model = loaded.model
    n_prompt = len(loaded.tokenizer.encode(a.prompt))
    # A learned-position model cannot see past block_size; keep the last block_size tokens as context
    # (nanoGPT's behaviour) rather than refuse, and say so.
    sliding = model.config.pos_embedding == "learned" and n_prompt + a.max_new_tokens > model.config.block_size
    if sliding:
        print(f"[byollm] prompt + {a.max_new_tokens} new tokens exceed block_size={model.config.block_size}: "
              "using a sliding context window (no KV cache)", file=sys.stderr)
    for i in range(a.num_samples):
        if a.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        sys.stdout.write(a.prompt)
        params.seed = a.seed + i
        for piece in stream_text(model, loaded.tokenizer, a.prompt, params, sliding_window=sliding):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def cmd_chat(a: Any) -> None:
    from byollm.chat import ChatSession, run_chat
    from byollm.checkpoint import load_checkpoint
    from byollm.sampling import SamplingParams
    from byollm.tokenizer.chat_format import chat_format

    loaded = load_checkpoint(a.ckpt, device=a.device, dtype=_torch_dtype(a.dtype))
    print(f"[byollm] loaded {loaded.describe()} ({loaded.model.num_params() / 1e6:.1f}M parameters)", file=sys.stderr)
    chat_format(loaded.tokenizer)  # "this model has no chat template: ... run byollm sft first or give ..."
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed)
    run_chat(ChatSession(loaded.model, loaded.tokenizer, params, system=a.system))


def cmd_export_hf(a: Any) -> None:
    from byollm.interop.convert import export_checkpoint_to_hf

    out = export_checkpoint_to_hf(a.ckpt, a.out_dir, dtype=_torch_dtype(a.dtype))
    print(f"[byollm] wrote a Hugging Face model directory: {out}")
    print(f"  load it with: AutoModelForCausalLM.from_pretrained('{out}')" + (
        f"; model card: {out / 'README.md'}" if (out / "README.md").is_file() else ""))


def cmd_card(a: Any) -> None:
    from byollm.interop.model_card import write_model_card

    given = [item for item in a.data_license.split(",") if item.strip()]
    out = write_model_card(a.ckpt, a.out, eval_path=a.eval, data_licenses=given)
    print(f"[byollm] wrote the model card: {out}")


def cmd_export_gguf(a: Any) -> None:
    from byollm.interop.gguf import export_checkpoint_to_gguf

    out = export_checkpoint_to_gguf(a.ckpt, a.out, dtype=a.dtype)
    print(f"[byollm] wrote a GGUF file for llama.cpp: {out}")
    print(f"  run it with: llama-cli -m {out}   (or Python: llama_cpp.Llama(model_path='{out}'))")


def cmd_serve(a: Any) -> None:
    ckpt = a.ckpt
    settings = recipe_config("serve", a)  # checked before the model loads
    settings.load_api_keys()
    from byollm.serve.server import serve

    serve(ckpt, settings, dtype=_torch_dtype(settings.dtype))


def cmd_convert_from_hf(a: Any) -> None:
    from byollm.interop.convert import convert_from_hf

    out = convert_from_hf(a.src, a.ckpt)
    print(f"[byollm] converted {a.src} to a byollm checkpoint: {out}")
    print(f"  try: byollm generate {out} --prompt 'Hello'")


def cmd_convert_from_gguf(a: Any) -> None:
    from byollm.interop.gguf_read import convert_from_gguf

    out = convert_from_gguf(a.src, a.ckpt)
    print(f"[byollm] converted {a.src} to a byollm checkpoint: {out}")
    print(f"  try: byollm generate {out} --prompt 'Hello'")


def cmd_cloud_sagemaker(a: Any) -> None:
    from byollm.scale.sagemaker import cost_estimate, describe, launch, plan_job, spec_from_args

    job = plan_job(spec_from_args(a), dry_run=a.dry_run)
    if a.dry_run:
        print(describe(job))
        return
    print(cost_estimate(job.spec))
    arn = launch(job)
    print(f"[byollm] created SageMaker training job {job.request['TrainingJobName']} ({arn})")
    print(f"  follow it: aws sagemaker describe-training-job --training-job-name {job.request['TrainingJobName']} "
          f"--region {job.region}; logs in CloudWatch, /aws/sagemaker/TrainingJobs")
    print(f"  checkpoints: {job.request['CheckpointConfig']['S3Uri']}/{job.run_name}")


def cmd_download(a: Any) -> None:
    import importlib.metadata

    from byollm.interop.pretrained import packaged_checkpoint, packaged_model

    model = packaged_model(a.name)
    out = packaged_checkpoint(a.name, a.out)
    version = importlib.metadata.version(model.distribution)
    print(f"[byollm] {a.name} ({model.license}) from the installed package {model.distribution} {version}, "
          f"no network used: {out}", file=sys.stderr)
    print(out)


def _file_or_dataset(value: str) -> Path:
    """A local file, or else a registry dataset's file (mirror -> cache -> download, `byollm.data.resolve`)."""
    if Path(value).exists():
        return Path(value)
    from byollm.data import resolve

    source = resolve(value)
    if source.path is None:
        raise ByollmError(f"{value} is neither a file nor a dataset with a local file; see `byollm data list`")
    return source.path


def cmd_tokenizer_train(a: Any) -> None:
    from byollm.tokenizer import train_tokenizer

    tok = train_tokenizer([_file_or_dataset(f) for f in a.files], vocab_size=a.vocab_size, kind=a.kind, impl=a.impl,
                          out_dir=Path(a.out), show_progress=sys.stderr.isatty())
    print(f"[byollm] trained a {a.kind} tokenizer ({a.impl}) with {tok.vocab_size} tokens -> {a.out}")


def cmd_model_presets(a: Any) -> None:
    import torch

    from byollm.model import GPT

    print(f"{'preset':<14} {'params':>10} {'layers':>6} {'width':>6} {'heads':>7} arch")
    for name in list_presets():
        cfg = preset(name)
        with torch.device("meta"):
            n = GPT(cfg).num_params()
        arch = "llama" if cfg.pos_embedding == "rope" else "gpt2"
        heads = f"{cfg.n_head}/{cfg.n_kv_head}"
        print(f"{name:<14} {n / 1e6:>9.1f}M {cfg.n_layer:>6} {cfg.n_embd:>6} {heads:>7} {arch}")
    print("depth dial: d<N> (Llama-style) or gpt2-d<N>: width 64*N, N heads of 64")


def cmd_model_info(a: Any) -> None:
    import json

    import torch

    from byollm.model import GPT

    if a.ckpt:
        from byollm.checkpoint import load_checkpoint

        loaded = load_checkpoint(a.ckpt)
        model, cfg = loaded.model, loaded.model.config
        print(f"[byollm] {loaded.describe()}")
    else:
        cfg = model_config_from(a.model)
        with torch.device("meta"):
            model = GPT(cfg)
    print(json.dumps(cfg.to_dict(), indent=2))
    print(f"parameters: {model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)")
    seq = a.seq_len or cfg.block_size
    print(f"training FLOPs per token at T={seq}: {model.flops_per_token(seq) / 1e6:,.1f} MFLOP")


def cmd_init(a: Any) -> None:
    import torch

    from byollm.checkpoint import save_checkpoint
    from byollm.model import GPT

    tokenizer = None
    overrides = {}
    if a.tokenizer:
        from byollm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(Path(a.tokenizer))
        overrides["vocab_size"] = tokenizer.vocab_size
    cfg = model_config_from(a.model)
    if overrides and cfg.vocab_size != overrides["vocab_size"]:
        cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(a.seed)
    model = GPT(cfg)
    out = save_checkpoint(model, a.out, tokenizer, meta={"seed": a.seed, "created_by": "byollm init"})
    print(f"[byollm] wrote a randomly initialised {model.num_params() / 1e6:.2f}M-parameter model to {out}")


def recipe_config(verb: str, a: Any) -> Any:
    """The config a recipe verb (pretrain, sft, reward, dpo, orpo, finetune, ppo, serve) runs with, from its
    parsed and instantiated arguments: exactly what `cmd_<verb>` hands the recipe."""
    if verb == "pretrain":
        from byollm.train import TrainConfig

        return config_from_args(TrainConfig, a)
    if verb in ("sft", "reward", "dpo", "orpo"):
        from byollm.train.align import CONFIGS

        return config_from_args(CONFIGS[verb], a)
    if verb == "finetune":  # the positionals CKPT and --data fill align.base and align.dataset
        from byollm.finetune.recipe import FinetuneTrainConfig

        cfg = config_from_args(FinetuneTrainConfig, a)
        changes = {k: v for k, v in (("base", a.ckpt), ("dataset", a.data)) if v is not None}
        return dataclasses.replace(cfg, align=dataclasses.replace(cfg.align, **changes)) if changes else cfg
    if verb == "ppo":
        from byollm.train.ppo import PPOConfig

        return config_from_args(PPOConfig, a)
    if verb == "serve":
        from byollm.serve.settings import ServeConfig

        return config_from_args(ServeConfig, a)
    raise ByollmError(f"{verb} is not a recipe verb")


def cmd_pretrain(a: Any) -> None:
    from byollm.train import pretrain

    pretrain(recipe_config("pretrain", a))


def align_verb(recipe: str) -> Any:
    """`byollm sft|reward|dpo|orpo`: the recipe's own config (byollm.train.align.CONFIGS) into `align`."""
    def cmd(a: Any) -> None:
        from byollm.train.align import align

        align(recipe_config(recipe, a), recipe)

    cmd.__name__ = f"cmd_{recipe}"
    return cmd


def cmd_finetune(a: Any) -> None:
    from byollm.finetune.recipe import finetune

    finetune(recipe_config("finetune", a))


def cmd_merge(a: Any) -> None:
    from byollm.finetune.recipe import merge

    out = merge(a.ckpt, a.adapter, a.out)
    print(f"[byollm] merged {a.adapter} into {a.ckpt}: {out}")
    print(f"  export it with: byollm export hf {out} OUT_DIR")


def cmd_ppo(a: Any) -> None:
    from byollm.train.ppo import ppo_chat

    ppo_chat(recipe_config("ppo", a))


def cmd_quickstart(a: Any) -> None:
    import time

    from byollm.train import pretrain, quickstart_config

    overrides = {"max_steps": a.max_steps, "model.preset": a.preset, "batch_size": a.batch_size,
                 "block_size": a.block_size, "device": a.device, "dtype": a.dtype, "compile": a.compile,
                 "out_dir": a.out_dir, "name": a.name or f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"}
    result = pretrain(quickstart_config({k: v for k, v in overrides.items() if v is not None}))
    run = result.run_dir
    if result.sample:
        print(f"--- a sample from the model at step {result.steps} ---\n{result.sample.strip()}\n---")
    if result.val:
        print(f"val loss {result.val['loss']:.4f} (perplexity {result.val['ppl']:.2f}, "
              f"{result.val['bpb']:.3f} bits per byte) after {result.steps} steps")
    print(f"run directory  {run}")
    print(f"checkpoint     {result.checkpoint}")
    print(f"loss curve     {run / 'plots' / 'loss.png'}")
    print(f"samples        {run / 'samples.txt'}")
    print("next:")
    print(f"  byollm generate {run} --prompt 'ROMEO:' --max-new-tokens 300")
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").is_file() else {}
    data = meta.get("data", {})
    # the fallback corpus has no registry name: evaluate on the prepared folder the run trained on
    eval_data = data.get("dataset") if data.get("dataset") == "tinyshakespeare" else data.get("dir")
    if (data.get("source") or {}).get("kind") == "fallback":
        print(f"note: trained on the FALLBACK corpus ({data.get('dataset')}), not Tiny Shakespeare, which was not "
              "found (set BYOLLM_DATA_MIRROR to a folder holding tinyshakespeare.txt, or go online)")
    print(f"  byollm eval {run} --data {eval_data}")
    print(f"  byollm export hf {run} out/hf")
    out_dir = "" if run.parent == Path("runs") else f" --out_dir {run.parent}"
    print(f"  byollm pretrain --config configs/quickstart.yaml{out_dir} --name {run.name} --resume true "
          "--max_steps 2000 --time_budget_s null   # train it longer (no time budget)")
    print("  byollm pretrain --config configs/quickstart.yaml --model.preset llama-13m --block_size 256"
          "   # a bigger model")
    print("  byollm pretrain --config configs/quickstart.yaml --device cuda --dtype bf16 --compile true"
          "   # on a GPU")


def cmd_capstone(a: Any) -> None:
    from byollm.capstone.run import capstone

    results, report = capstone(a.track, a.size, a.out, a.docs, from_stage=a.from_stage)
    ran = [r.name for r in results if r.status == "ran"]
    print(f"[byollm] capstone {a.track} ({a.size}): {len(ran)} stage(s) ran ({', '.join(ran) or 'none'}), "
          f"{len(results) - len(ran)} cached; report: {report} (and report.html)")
    served = next((r.figures for r in results if r.name == "served"), None)
    if served:
        print(f"[byollm] served check: {served['question']!r} -> {served['answer'][:200]!r} "
              f"(sources {served['sources']}, cited {served['citations']})")
    if a.serve:
        from byollm.serve.server import serve
        from byollm.serve.settings import ServeConfig

        track_dir = Path(a.out) / a.track
        serve(str(track_dir / "dpo" / "run"), ServeConfig(port=a.port, rag_index=str(track_dir / "rag" / "index"),
                                                          model_name=f"byollm-capstone-{a.track}"))


def cmd_eval(a: Any) -> None:
    from byollm.train import evaluate_checkpoint

    r = evaluate_checkpoint(a.ckpt, a.data, split=a.split, batch_size=a.batch_size, block_size=a.block_size,
                            max_batches=a.max_batches, device=a.device, dtype=a.dtype)
    how = "every token once" if r["exact"] else f"first {a.max_batches} batches"
    print(f"[byollm] {r['checkpoint']} on {r['data']} ({r['split']}, {r['tokens']:,.0f} tokens, {how}, "
          f"{r['seconds']:.1f}s)", file=sys.stderr)
    print(f"{r['split']} loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  bits/byte {r['bpb']:.4f}")


def cmd_plan(a: Any) -> None:
    from byollm.scale.plan import format_plan, plan

    result = plan(a.model, params=a.params, layers=a.layers, hidden=a.hidden, vocab=a.vocab, gpus=a.gpus,
                  nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu=a.gpu, memory_gb=a.memory,
                  peak_flops=a.peak_flops, device=a.device, strategy=a.strategy, tp=a.tp, micro_batch=a.micro_batch,
                  seq_len=a.seq_len, checkpointing=a.activation_checkpointing, precision=a.precision, mfu=a.mfu,
                  target_tokens=a.tokens, price_per_gpu_hour=a.price)
    print(json.dumps(result.to_dict(), indent=2) if a.json else format_plan(result))


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def cmd_rag_index(a: Any) -> None:
    from byollm.rag.index import index_paths

    report = index_paths(a.paths, a.index, model=a.model, chunk_size=a.chunk_size, chunk_overlap=a.chunk_overlap,
                         tags=_csv(a.tags), groups=_csv(a.groups), text_field=a.text_field, rebuild=a.rebuild)
    print(f"[byollm] {a.index}: {report.summary()}")


def cmd_rag_search(a: Any) -> None:
    from byollm.rag.index import RagIndex

    filters = {k: v for k, v in (("source", _csv(a.source)), ("tags", _csv(a.tags))) if v}
    hits = RagIndex.open(a.index).search(a.query, a.k, a.retriever, groups=set(_csv(a.groups)) if a.groups else None,
                                         filters=filters or None)
    for h in hits:
        c = h.chunk
        if a.json:
            print(json.dumps({"rank": h.rank, "score": h.score, "scores": h.scores, "id": c.id, "source": c.source,
                              "start": c.start, "end": c.end, "title": c.title, "headings": c.headings,
                              "text": c.text}))
        else:
            where = " > ".join(c.headings) or c.title
            print(f"[{h.rank}] {h.score:.4f}  {c.source}:{c.start}-{c.end}  {where}")
            print("    " + " ".join(c.text.split())[:300])
    if not hits:
        print("[byollm] nothing retrieved", file=sys.stderr)


def cmd_rag_ask(a: Any) -> None:
    from byollm.rag.ask_cli import run_ask

    run_ask(a)


def cmd_safety_bias(a: Any) -> None:
    from byollm.safety.bias import format_scores, score_checkpoint

    scores = score_checkpoint(a.ckpt, a.data, batch_size=a.batch_size, seed=a.seed, device=a.device)
    print(json.dumps(scores.to_dict()) if a.json else format_scores(scores))


def cmd_evaluate(a: Any) -> None:
    from byollm.interop.lm_eval import run_evaluate

    run_evaluate(a)


def cmd_redteam(a: Any) -> None:
    from byollm.safety.redteam import cmd_redteam

    cmd_redteam(a)


def cmd_safety_toxicity(a: Any) -> None:
    from byollm.safety.toxicity import run_toxicity_cli

    run_toxicity_cli(a)


def cmd_safety_canary(a: Any) -> None:
    from byollm.safety.canary_run import run_canary

    run_canary(a)


def cmd_safety_fairness(a: Any) -> None:
    from byollm.safety.fairness import run_fairness_cli

    run_fairness_cli(a)


def cmd_safety_eval(a: Any) -> None:
    from byollm.safety.report import run_eval_command

    run_eval_command(a)


def cmd_rag_eval(a: Any) -> None:
    from byollm.rag.evaluate import evaluate_squad, format_table
    from byollm.rag.index import RETRIEVERS

    retrievers = RETRIEVERS if a.retriever == "all" else (a.retriever,)
    results = evaluate_squad(_file_or_dataset(a.qa), index=a.index, retrievers=retrievers, chunk_size=a.chunk_size,
                             chunk_overlap=a.chunk_overlap)
    print(json.dumps(results) if a.json else format_table(results))


def cmd_data_list(a: Any) -> None:
    from byollm.data import get_spec, list_datasets

    for name in list_datasets():
        spec = get_spec(name)
        print(f"{name:<18} {spec.description}")


def cmd_data_download(a: Any) -> None:
    from byollm.data import download

    print(f"[byollm] {a.name}: {download(a.name, force=a.force)}")


def cmd_data_scrub(a: Any) -> None:
    from byollm.safety.pii import scrub_file

    kinds = [k.strip().upper() for k in a.kinds.split(",") if k.strip()] if a.kinds else None
    r = scrub_file(a.input, a.output, report=a.report, kinds=kinds, field=a.field)
    counts = ", ".join(f"{k}: {n}" for k, n in r["counts"].items()) or "nothing found"
    print(f"[byollm] scrubbed {a.input} -> {a.output} ({counts})" + (f"; report {a.report}" if a.report else ""))


def cmd_data_prepare(a: Any) -> None:
    from byollm.data import prepare, read_meta

    out = Path(a.out) if a.out else Path("data") / f"{Path(a.name).stem}-{a.tokenizer.replace(':', '')}"
    prepared = prepare(a.name, a.tokenizer, out, val_fraction=a.val_fraction, seed=a.seed,
                       allow_fallback=a.allow_fallback)
    meta = read_meta(prepared)
    counts = ", ".join(f"{k}: {v['tokens']:,} tokens" for k, v in meta.get("splits", {}).items())
    print(f"[byollm] prepared {a.name} -> {prepared} ({counts})")
