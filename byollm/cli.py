"""The `byollm` command: a thin layer that parses arguments, calls one library function, prints.

Each verb lives in a `cmd_*` function; the parser is built with jsonargparse so configs are
dataclasses filled from YAML files (`--config run.yaml`) and dotted overrides (`--model.n_layer 4`).
User errors (`ByollmError`, bad arguments) print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from pathlib import Path
from typing import Any, Literal, Optional  # noqa: UP035 - built at run time

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from byollm.errors import ByollmError
from byollm.model.config import ModelChoice, list_presets, model_config_from, preset  # noqa: F401

# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def _torch_dtype(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ByollmError(f"unknown dtype '{name}'; use one of {', '.join(table)}")
    return table[name]


def cmd_generate(a: Namespace) -> None:
    from byollm.checkpoint import load_checkpoint
    from byollm.generate import SamplingParams, stream_text

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


def cmd_chat(a: Namespace) -> None:
    from byollm.chat import ChatSession, run_chat
    from byollm.checkpoint import load_checkpoint
    from byollm.generate import SamplingParams
    from byollm.tokenizer.chat import require_chat_tokens

    loaded = load_checkpoint(a.ckpt, device=a.device, dtype=_torch_dtype(a.dtype))
    print(f"[byollm] loaded {loaded.describe()} ({loaded.model.num_params() / 1e6:.1f}M parameters)", file=sys.stderr)
    require_chat_tokens(loaded.tokenizer)  # "this model was not trained with a chat template; run byollm sft first"
    params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, repetition_penalty=a.repetition_penalty, seed=a.seed)
    run_chat(ChatSession(loaded.model, loaded.tokenizer, params, system=a.system))


def cmd_export_hf(a: Namespace) -> None:
    from byollm.interop.hf import export_checkpoint_to_hf

    out = export_checkpoint_to_hf(a.ckpt, a.out_dir, dtype=_torch_dtype(a.dtype))
    print(f"[byollm] wrote a Hugging Face model directory: {out}")
    print(f"  load it with: AutoModelForCausalLM.from_pretrained('{out}')")


def cmd_export_gguf(a: Namespace) -> None:
    from byollm.interop.gguf import export_checkpoint_to_gguf

    out = export_checkpoint_to_gguf(a.ckpt, a.out, dtype=a.dtype)
    print(f"[byollm] wrote a GGUF file for llama.cpp: {out}")
    print(f"  run it with: llama-cli -m {out}   (or Python: llama_cpp.Llama(model_path='{out}'))")


def cmd_serve(a: Namespace) -> None:
    from byollm.serve.settings import ServeConfig

    values = a.as_dict()
    ckpt = values.pop("ckpt")
    for key in ("config", "__path__"):
        values.pop(key, None)
    settings = ServeConfig(**values)  # checked before the model loads
    settings.load_api_keys()
    from byollm.serve.server import serve

    serve(ckpt, settings, dtype=_torch_dtype(settings.dtype))


def cmd_convert_from_hf(a: Namespace) -> None:
    from byollm.interop.hf import convert_from_hf

    out = convert_from_hf(a.src, a.ckpt)
    print(f"[byollm] converted {a.src} to a byollm checkpoint: {out}")
    print(f"  try: byollm generate {out} --prompt 'Hello'")


def cmd_tokenizer_train(a: Namespace) -> None:
    from byollm.tokenizer import train_tokenizer

    tok = train_tokenizer([Path(f) for f in a.files], vocab_size=a.vocab_size, kind=a.kind, impl=a.impl,
                          out_dir=Path(a.out), show_progress=sys.stderr.isatty())
    print(f"[byollm] trained a {a.kind} tokenizer ({a.impl}) with {tok.vocab_size} tokens -> {a.out}")


def cmd_model_presets(a: Namespace) -> None:
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


def cmd_model_info(a: Namespace) -> None:
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


def cmd_init(a: Namespace) -> None:
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


def _train_config(a: Namespace):
    from byollm.train import TrainConfig

    values = a.as_dict()
    for key in ("config", "__path__"):
        values.pop(key, None)
    return TrainConfig.from_dict(values)


def cmd_pretrain(a: Namespace) -> None:
    from byollm.train import pretrain

    pretrain(_train_config(a))


def _align_config(a: Namespace):
    from byollm.train.align import AlignTrainConfig

    values = a.as_dict()
    for key in ("config", "__path__"):
        values.pop(key, None)
    return AlignTrainConfig.from_dict(values)


def _align_verb(recipe: str):
    def cmd(a: Namespace) -> None:
        from byollm.train.align import align

        align(_align_config(a), recipe)

    cmd.__name__ = f"cmd_{recipe}"
    return cmd


def cmd_finetune(a: Namespace) -> None:
    from byollm.finetune.recipe import FinetuneTrainConfig, finetune

    values = a.as_dict()
    ckpt, data = values.pop("ckpt", None), values.pop("data", None)
    for key in ("config", "__path__"):
        values.pop(key, None)
    if ckpt is not None:
        values.setdefault("align", {})["base"] = ckpt
    if data is not None:
        values.setdefault("align", {})["dataset"] = data
    finetune(FinetuneTrainConfig.from_dict(values))


def cmd_merge(a: Namespace) -> None:
    from byollm.finetune.recipe import merge

    out = merge(a.ckpt, a.adapter, a.out)
    print(f"[byollm] merged {a.adapter} into {a.ckpt}: {out}")
    print(f"  export it with: byollm export hf {out} OUT_DIR")


def cmd_ppo(a: Namespace) -> None:
    from byollm.train.align import ppo_chat
    from byollm.train.ppo import PPOConfig

    values = a.as_dict()
    for key in ("config", "__path__"):
        values.pop(key, None)
    ppo_chat(PPOConfig(**values))


def cmd_quickstart(a: Namespace) -> None:
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
          "--max_steps 2000   # train it longer")
    print("  byollm pretrain --config configs/quickstart.yaml --model.preset llama-13m --block_size 256"
          "   # a bigger model")
    print("  byollm pretrain --config configs/quickstart.yaml --device cuda --dtype bf16 --compile true"
          "   # on a GPU")


def cmd_eval(a: Namespace) -> None:
    from byollm.train import evaluate_checkpoint

    r = evaluate_checkpoint(a.ckpt, a.data, split=a.split, batch_size=a.batch_size, block_size=a.block_size,
                            max_batches=a.max_batches, device=a.device, dtype=a.dtype)
    how = "every token once" if r["exact"] else f"first {a.max_batches} batches"
    print(f"[byollm] {r['checkpoint']} on {r['data']} ({r['split']}, {r['tokens']:,.0f} tokens, {how}, "
          f"{r['seconds']:.1f}s)", file=sys.stderr)
    print(f"{r['split']} loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  bits/byte {r['bpb']:.4f}")


def cmd_data_list(a: Namespace) -> None:
    from byollm.data import get_spec, list_datasets

    for name in list_datasets():
        spec = get_spec(name)
        print(f"{name:<18} {spec.description}")


def cmd_data_download(a: Namespace) -> None:
    from byollm.data import download

    print(f"[byollm] {a.name}: {download(a.name, force=a.force)}")


def cmd_data_prepare(a: Namespace) -> None:
    from byollm.data import prepare, read_meta

    out = Path(a.out) if a.out else Path("data") / f"{Path(a.name).stem}-{a.tokenizer.replace(':', '')}"
    prepared = prepare(a.name, a.tokenizer, out, val_fraction=a.val_fraction, seed=a.seed,
                       allow_fallback=a.allow_fallback)
    meta = read_meta(prepared)
    counts = ", ".join(f"{k}: {v['tokens']:,} tokens" for k, v in meta.get("splits", {}).items())
    print(f"[byollm] prepared {a.name} -> {prepared} ({counts})")


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def _sub(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False)


def _group(verbs: Any, name: str, description: str, help: str, dest: str) -> Any:
    """A verb with verbs of its own (`byollm export hf`): jsonargparse wants the parent added first."""
    parser = _sub(description)
    verbs.add_subcommand(name, parser, help=help)
    return parser.add_subcommands(dest=dest, required=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="byollm", description="Build your own LLM: train, fine-tune, serve and ship "
                            "a Transformer written from scratch.", exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    verbs = parser.add_subcommands(dest="command", required=True)

    p = _sub("Generate text from a checkpoint (byollm, run directory or Hugging Face directory).")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("--prompt", type=str, default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", "--top_k", type=Optional[int], default=None)  # noqa: UP045
    p.add_argument("--top-p", "--top_p", type=Optional[float], default=None)  # noqa: UP045
    p.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", type=Optional[list[str]], default=None, help="stop strings")  # noqa: UP045
    p.add_argument("--num-samples", "--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--dtype", type=str, default="auto", help="float32, bfloat16, float16 or auto (as saved)")
    verbs.add_subcommand("generate", p, help="generate text from a checkpoint")

    p = _sub("Chat with a model trained in byollm's chat format (after byollm sft): type a message, the reply "
             "streams back; /reset forgets the conversation, /exit quits. Reads stdin line by line when piped.")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("--system", type=Optional[str], default=None, help="system message")  # noqa: UP045
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", "--top_k", type=Optional[int], default=None)  # noqa: UP045
    p.add_argument("--top-p", "--top_p", type=Optional[float], default=None)  # noqa: UP045
    p.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.0)
    p.add_argument("--seed", type=Optional[int], default=None, help="seed sampling (reproducible replies)")  # noqa: UP045
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--dtype", type=str, default="auto", help="float32, bfloat16, float16 or auto (as saved)")
    verbs.add_subcommand("chat", p, help="chat with a model in the terminal (streaming)")

    from byollm.serve.settings import ServeConfig

    p = _sub("Serve a checkpoint over HTTP with an OpenAI-compatible API (/v1/models, /v1/completions, "
             "/v1/chat/completions, streaming), /health and Prometheus /metrics. API keys come from "
             "--api_keys_file or the BYOLLM_API_KEYS environment variable, never the command line. "
             "Needs the serve extra: pip install 'byollm[serve]'.")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(ServeConfig, None, skip={"api_keys"})
    verbs.add_subcommand("serve", p, help="serve a model with an OpenAI-compatible HTTP API")

    export_verbs = _group(verbs, "export", "Export a checkpoint for other tools.",
                          "export to Hugging Face or GGUF (llama.cpp)", "format")
    p = _sub("Write a Hugging Face model directory (config.json, model.safetensors, tokenizer).")
    p.add_argument("ckpt", type=str)
    p.add_argument("out_dir", type=str)
    p.add_argument("--dtype", type=str, default="auto")
    export_verbs.add_subcommand("hf", p, help="Hugging Face transformers directory")
    p = _sub("Write one GGUF file (weights and tokenizer) that llama.cpp, Ollama and LM Studio load; Llama-style "
             "models only.")
    p.add_argument("ckpt", type=str)
    p.add_argument("out", type=str, help="output file, e.g. model.gguf")
    p.add_argument("--dtype", type=Literal["f32", "f16"], default="f32", help="f32 (exact) or f16 (half the size)")
    export_verbs.add_subcommand("gguf", p, help="GGUF file for llama.cpp / Ollama")

    convert_verbs = _group(verbs, "convert", "Convert checkpoints from other tools into byollm checkpoints.",
                           "import checkpoints from Hugging Face", "format")
    p = _sub("Convert a Hugging Face GPT-2 / Llama / Mistral / Qwen2 / SmolLM directory to a byollm checkpoint.")
    p.add_argument("src", type=str, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("ckpt", type=str, help="output checkpoint directory")
    convert_verbs.add_subcommand("from-hf", p, help="from a Hugging Face model directory")

    tok_verbs = _group(verbs, "tokenizer", "Tokenizers: train a byte-level BPE (from scratch or with `tokenizers`) "
                       "or a char tokenizer.", "train tokenizers", "action")
    p = _sub("Train a tokenizer on text files and save it (readable vocab/merges plus tokenizer.json).")
    p.add_argument("files", type=str, nargs="+", help="UTF-8 text files")
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=1024)
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--kind", type=Literal["bpe", "char"], default="bpe")
    p.add_argument("--impl", type=Literal["scratch", "fast"], default="fast",
                   help="scratch: our pure-Python trainer; fast: the tokenizers library (same merges)")
    tok_verbs.add_subcommand("train", p, help="train a tokenizer")

    model_verbs = _group(verbs, "model", "Inspect model shapes: presets, parameter counts, FLOPs.",
                         "inspect model presets", "action")
    model_verbs.add_subcommand("presets", _sub("List the named model presets."), help="list presets")
    p = _sub("Print the resolved config, parameter count and FLOPs per token of a preset or checkpoint.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--ckpt", type=Optional[str], default=None)  # noqa: UP045
    p.add_argument("--seq-len", "--seq_len", type=Optional[int], default=None,  # noqa: UP045
                   help="sequence length for the FLOPs estimate (default: block_size)")
    p.add_class_arguments(ModelChoice, "model")
    model_verbs.add_subcommand("info", p, help="config, parameters and FLOPs")

    data_verbs = _group(verbs, "data", "Datasets: the registry, the local mirror ($BYOLLM_DATA_MIRROR), the cache, "
                        "downloads and token shards.", "list, download and prepare datasets", "action")
    data_verbs.add_subcommand("list", _sub("List the registered datasets."), help="list registered datasets")
    p = _sub("Make sure a dataset is on disk: local mirror, then cache, then download (verified by sha256).")
    p.add_argument("name", type=str)
    p.add_argument("--force", type=bool, default=False, help="download into the cache even if a copy exists")
    data_verbs.add_subcommand("download", p, help="fetch a dataset (mirror -> cache -> download)")
    p = _sub("Tokenise a dataset into train.bin/val.bin token shards plus meta.json and the tokenizer.")
    p.add_argument("name", type=str, help="registry name or a local text/JSON/JSONL file or directory")
    p.add_argument("--tokenizer", type=str, default="char", help="char, bpe:N, or a tokenizer directory")
    p.add_argument("--out", type=Optional[str], default=None, help="output dir (default data/NAME-TOKENIZER)")  # noqa: UP045
    p.add_argument("--val-fraction", "--val_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--allow-fallback", "--allow_fallback", type=bool, default=False,
                   help="offline with no copy: use CPython's bundled docs text instead (with a notice)")
    data_verbs.add_subcommand("prepare", p, help="tokenise into memory-mapped shards")

    p = _sub("Write a randomly initialised checkpoint (a preset with overrides) to train or export later.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(ModelChoice, "model")
    p.add_argument("--tokenizer", type=Optional[str], default=None,  # noqa: UP045
                   help="tokenizer dir to bundle (sets vocab_size)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=str, required=True)
    verbs.add_subcommand("init", p, help="create a randomly initialised checkpoint")

    from byollm.train.config import TrainConfig

    p = _sub("Pretrain a model: a YAML recipe (configs/*.yaml) plus dotted overrides; writes runs/<name>/. "
             "Under torchrun, one process per device (DDP).")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(TrainConfig, None)
    verbs.add_subcommand("pretrain", p, help="pretrain a model from a config (YAML + overrides)")

    from byollm.train.align import AlignTrainConfig

    align_help = {
        "sft": "Supervised fine-tuning on conversations (Alpaca, JSON/JSONL messages): loss on assistant tokens only.",
        "reward": "Train a reward model (scalar head, Bradley-Terry loss) on preference pairs (HH-RLHF, JSON/JSONL).",
        "dpo": "Direct Preference Optimisation on preference pairs, against the frozen starting (SFT) model.",
        "orpo": "ORPO: SFT on the chosen replies plus an odds-ratio preference term, no reference model.",
    }
    for recipe, text in align_help.items():
        p = _sub(f"{text} A YAML recipe (configs/{recipe}-*.yaml) plus dotted overrides (--align.base CKPT); "
                 "writes runs/<name>/ with held_out.json, metrics and a checkpoint.")
        p.add_argument("--config", action=ActionConfigFile)
        p.add_class_arguments(AlignTrainConfig, None)
        verbs.add_subcommand(recipe, p, help=text.split(":")[0].split(" (")[0].rstrip("."))

    from byollm.finetune.recipe import FinetuneTrainConfig

    p = _sub("Fine-tune a model with the SFT objective: --method full (all weights), lora, dora or qlora (the base "
             "read straight into NF4). Adapters are saved in PEFT format in runs/<name>/adapter/; "
             "`byollm merge` folds them into the base.")
    p.add_argument("ckpt", type=Optional[str], default=None, nargs="?",  # noqa: UP045
                   help="the model to start from (checkpoint, run dir or HF dir)")
    p.add_argument("--data", type=Optional[str], default=None,  # noqa: UP045
                   help="dataset name (alpaca) or local .json/.jsonl (same as --align.dataset)")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(FinetuneTrainConfig, None, skip={"data", "model"})  # data: the --data above
    verbs.add_subcommand("finetune", p, help="fine-tune: full, LoRA, QLoRA or DoRA")

    p = _sub("Fold a LoRA/DoRA/QLoRA adapter (PEFT format) into its base model and write a normal checkpoint.")
    p.add_argument("ckpt", type=str, help="the base model the adapter was trained on")
    p.add_argument("adapter", type=str, help="the adapter folder (runs/<name>/adapter)")
    p.add_argument("out", type=str, help="output checkpoint directory")
    verbs.add_subcommand("merge", p, help="merge an adapter into its base model")

    from byollm.train.ppo import PPOConfig

    p = _sub("RLHF with PPO: the policy (an SFT model) answers prompts, a reward model scores them, PPO with a "
             "KL penalty to the frozen starting policy. --prompts: a prompt file (one user turn a line / JSONL) "
             "or a preference dataset (hh-rlhf), whose held-out split gives --val_prompts evaluation prompts.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_class_arguments(PPOConfig, None)
    verbs.add_subcommand("ppo", p, help="RLHF with PPO against a reward model")

    p = _sub("Train a small Llama-style character model on Tiny Shakespeare on the CPU (a few minutes), then "
             "print where everything went and what to run next. Same as configs/quickstart.yaml.")
    p.add_argument("--max-steps", "--max_steps", type=Optional[int], default=None,  # noqa: UP045
                   help="optimizer steps (default 1000)")
    p.add_argument("--preset", type=Optional[str], default=None, help="model preset (default llama-nano)")  # noqa: UP045
    p.add_argument("--batch-size", "--batch_size", type=Optional[int], default=None)  # noqa: UP045
    p.add_argument("--block-size", "--block_size", type=Optional[int], default=None)  # noqa: UP045
    p.add_argument("--device", type=Optional[str], default=None, help="default cpu")  # noqa: UP045
    p.add_argument("--dtype", type=Optional[Literal["auto", "fp32", "bf16"]], default=None)  # noqa: UP045
    p.add_argument("--compile", type=Optional[bool], default=None)  # noqa: UP045
    p.add_argument("--out-dir", "--out_dir", type=str, default="runs")
    p.add_argument("--name", type=Optional[str], default=None, help="default quickstart-<date>-<time>")  # noqa: UP045
    verbs.add_subcommand("quickstart", p, help="train a small model on Tiny Shakespeare in minutes on a CPU")

    p = _sub("Evaluate a checkpoint on a dataset split: mean loss over every token, perplexity, bits per byte.")
    p.add_argument("ckpt", type=str, help="checkpoint dir or run dir")
    p.add_argument("--data", type=str, required=True,
                   help="dataset name or text file (tokenised with the checkpoint's tokenizer), or a prepared dir")
    p.add_argument("--split", type=Literal["val", "train"], default="val")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16)
    p.add_argument("--block-size", "--block_size", type=Optional[int], default=None,  # noqa: UP045
                   help="default: the model's block_size")
    p.add_argument("--max-batches", "--max_batches", type=Optional[int], default=None,  # noqa: UP045
                   help="stop early (an estimate)")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--dtype", type=Literal["auto", "fp32", "bf16"], default="fp32")
    verbs.add_subcommand("eval", p, help="val loss, perplexity and bits per byte of a checkpoint")
    return parser


COMMANDS = {
    ("generate",): cmd_generate,
    ("chat",): cmd_chat,
    ("serve",): cmd_serve,
    ("export", "hf"): cmd_export_hf,
    ("export", "gguf"): cmd_export_gguf,
    ("convert", "from-hf"): cmd_convert_from_hf,
    ("tokenizer", "train"): cmd_tokenizer_train,
    ("model", "presets"): cmd_model_presets,
    ("model", "info"): cmd_model_info,
    ("init",): cmd_init,
    ("data", "list"): cmd_data_list,
    ("data", "download"): cmd_data_download,
    ("data", "prepare"): cmd_data_prepare,
    ("pretrain",): cmd_pretrain,
    ("sft",): _align_verb("sft"),
    ("reward",): _align_verb("reward"),
    ("dpo",): _align_verb("dpo"),
    ("orpo",): _align_verb("orpo"),
    ("finetune",): cmd_finetune,
    ("merge",): cmd_merge,
    ("ppo",): cmd_ppo,
    ("quickstart",): cmd_quickstart,
    ("eval",): cmd_eval,
}


def _dispatch(ns: Namespace) -> None:
    path: list[str] = [ns.command]
    args = ns[ns.command]
    while True:
        key = "format" if "format" in args else "action" if "action" in args else None
        if key is None or not isinstance(args.get(key), str) or args[key] not in args:
            break
        path.append(args[key])
        args = args[args[key]]
    COMMANDS[tuple(path)](args)


def _friendly(message: str, parser: ArgumentParser) -> str:
    """One line, with a 'did you mean' when an option name was mistyped."""
    first = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    if "nrecognized arguments" in first or "does not accept nested key" in first:
        known = [o for a in _all_actions(parser) for o in a.option_strings]
        for word in first.replace(":", " ").replace("'", " ").replace('"', " ").split():
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], known, n=1)
                if close and close[0] == word.split("=")[0]:  # valid, but for another command
                    return f"{first} (an option of another command, not this one)"
                if close:
                    return f"{first} (did you mean {close[0]}?)"
    return " ".join(line.strip() for line in message.strip().splitlines())


def _unknown_config_keys(argv: list[str], parser: ArgumentParser) -> str | None:
    """jsonargparse reports an unknown key inside a --config YAML poorly; find it ourselves."""
    import yaml

    known = {a.dest for a in _all_actions(parser)}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag != "--config" or not Path(value).is_file():
            continue
        try:
            data = yaml.safe_load(Path(value).read_text()) or {}
        except yaml.YAMLError as e:
            return f"{value} is not valid YAML: {' '.join(str(e).split())}"
        stack = [("", data)]
        while stack:
            prefix, node = stack.pop()
            for key, sub in node.items() if isinstance(node, dict) else ():
                dotted = f"{prefix}{key}"
                if isinstance(sub, dict) and any(k.startswith(dotted + ".") for k in known):
                    stack.append((dotted + ".", sub))
                elif dotted not in known:
                    close = difflib.get_close_matches(dotted, known, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    return f"unknown key '{dotted}' in {value}{hint}"
    return None


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = list(parser._actions)
    for a in parser._actions:
        for sub in getattr(a, "choices", None) or {}:
            if isinstance(a.choices, dict) and isinstance(a.choices[sub], argparse.ArgumentParser):
                actions += _all_actions(a.choices[sub])
    return actions


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        _dispatch(ns)
    except argparse.ArgumentError as e:
        if debug:
            raise
        message = _unknown_config_keys(argv, parser) or _friendly(str(e), parser)
        print(f"byollm: error: {message} (see --help)", file=sys.stderr)
        return 2
    except ByollmError as e:
        if debug:
            raise
        print(f"byollm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("byollm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `byollm ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
