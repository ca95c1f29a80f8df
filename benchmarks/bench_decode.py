"""Decode speed at batch 1 on the CPU: our generation against transformers and llama.cpp, same weights.

    python benchmarks/bench_decode.py                      # llama-tiny, gpt2-124m, smollm2-135m: ~3-4 minutes
    python benchmarks/bench_decode.py --quick              # smoke run: llama-tiny, a few tokens, ~10 s
    python benchmarks/bench_decode.py --presets smollm2-135m --new-tokens 128 --reps 5 --out decode.json

For each preset, one randomly initialised fp32 model (seed 0) and one fixed prompt of --prompt-len random token
ids; every contender continues it greedily for exactly --new-tokens tokens (end-of-sequence ignored), with
--threads threads, timed interleaved (A B, B A, ...; see common.interleaved):

  ours          byollm.generate.generate (KV cache, fp32)
  engine        byollm.serve.engine.Engine(model).generate([prompt], ...), when that module exists
  engine-t      the engine with transpose_weights=True (byollm.serve.layout; what `byollm serve` uses on a CPU)
  engine-fast   the engine with fast_decode=True (byollm.serve.fast_decode: fused, transposed weights, few ops)
  hf            transformers `generate` (do_sample=False) on the same weights (byollm.interop.hf.to_hf_model), fp32
  llama.cpp f32 llama-cpp-python on our GGUF export (byollm.interop.gguf.export_gguf), f32 weights
  llama.cpp f16 the same with f16 weights (llama.cpp's default f16 KV cache in both)
  llama.cpp q8_0 the f32 export quantised to Q8_0 by llama.cpp itself (8.5 bits per weight)
  engine-int8   opt-in (--contenders ... engine-int8): the engine with int8 weights (FBGEMM), another precision
  engine-bf16   opt-in: the engine on the model cast to bfloat16 (PyTorch's own bf16 CPU kernels)

Bandwidth: the run first measures the read bandwidth (the best of 5 sums over a 1 GiB fp32 tensor, --threads
threads), then gives each contender's achieved bytes/s = weight bytes read per token x tok/s (ours and the
engine: `decode_weight_bytes` / `Engine.weight_bytes`; llama.cpp: the GGUF file's size) and its fraction of
the read bandwidth. The engine contenders also report decode-only tok/s (`Engine.decode_steps` /
`decode_seconds`: prefill and sampling left out).

GGUF export covers Llama-style models only, so gpt2-124m runs ours and hf. The GGUF files carry a small
byte-level BPE tokenizer padded to the model's vocabulary (unused [PAD] tokens); the model sizes are the
presets', except that llama-tiny's vocabulary is that tokenizer's (320 ids) and its block_size is
raised to prompt + new tokens. tok/s = new tokens / seconds
of the whole call, prompt processing (prefill) included: the time a user waits for --new-tokens tokens.
The table also says whether each contender produced the same greedy tokens as ours (random weights have
near-ties, so f16 may differ after a few tokens; f32 should agree).

A packaged real model (`--presets smollm2-135m-instruct`, the `real` extra) runs its real weights instead:
ours and the engine in fp32 after dequantisation, transformers on our HF export, llama.cpp on the ORIGINAL
quantised file (`llama.cpp-orig`: Q4_1 for SmolLM2) and on our f32/f16 exports, from a real ChatML prompt
(a question; end of turn ignored so every contender writes --new-tokens tokens). llama.cpp's quantised dot
products round activations to 8 bits, so its Q4_1 tokens may part from ours after a near-tie.

llama.cpp runs with its plain CPU buffers (`use_extra_bufts=False`): llama-cpp-python 0.3.36's repacked
AMX / AVX-512 buffers segfault decoding Q4_1 on an AMX Xeon (tests/test_gguf_import.py); pass
--llama-cpp-extra-bufts to use them where they work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported from the tests
sys.path.append(str(Path(__file__).resolve().parents[1]))  # byollm from this checkout when it is not installed

from common import interleaved, load_average, machine_info, median, table, warn_if_busy, write_json  # noqa: E402

from byollm.generate import generate  # noqa: E402
from byollm.model import GPT, preset  # noqa: E402
from byollm.sampling import SamplingParams  # noqa: E402

FULL = dict(presets=["llama-tiny", "gpt2-124m", "smollm2-135m"], new_tokens=128, reps=3)
QUICK = dict(presets=["llama-tiny"], new_tokens=16, reps=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", help=f"default: {' '.join(FULL['presets'])}")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, help="tokens generated per call (default 128; --quick 16)")
    p.add_argument("--reps", type=int, help="timed calls per contender (default 3; --quick 2)")
    p.add_argument("--threads", type=int, default=2, help="threads for every contender (torch and llama.cpp)")
    p.add_argument("--contenders", nargs="+",
                   default=["ours", "engine", "engine-t", "engine-fast", "hf", "llama.cpp-f32", "llama.cpp-f16",
                            "llama.cpp-q8_0", "llama.cpp-orig"],
                   help="which to run (default: all that apply; also engine-int8 and engine-bf16, other precisions)")
    p.add_argument("--quick", action="store_true", help="llama-tiny only, 16 tokens: a smoke run")
    p.add_argument("--llama-cpp-extra-bufts", action="store_true",
                   help="let llama.cpp repack weights for its AMX/AVX-512 kernels (segfaults on Q4_1 on some CPUs)")
    p.add_argument("--out", help="write all results (every call's seconds) to this JSON file")
    args = p.parse_args(argv)
    mode = QUICK if args.quick else FULL
    args.presets = args.presets or mode["presets"]
    args.new_tokens = args.new_tokens or mode["new_tokens"]
    args.reps = args.reps or mode["reps"]
    return args


def small_tokenizer() -> Any:
    """A 320-id byte-level BPE (trained on Python's own docs, present everywhere) to put in the GGUF files."""
    from pydoc_data.topics import topics

    from byollm.tokenizer import BPETokenizer

    text = "\n".join(topics[k] for k in sorted(topics))[:50_000]
    return BPETokenizer.train(text, vocab_size=320)


def make_model(name: str, tokenizer_size: int, length: int) -> GPT:
    """The preset, with room for the tokenizer's ids and for `length` positions (llama-tiny has 64)."""
    config = preset(name)
    config = dataclasses.replace(config, vocab_size=max(config.vocab_size, tokenizer_size),
                                 block_size=max(config.block_size, length))
    torch.manual_seed(0)
    return GPT(config).eval()


# --------------------------------------------------------------------------------------------------
# Contenders: each returns a function that generates args.new_tokens tokens and returns them
# --------------------------------------------------------------------------------------------------


def ours_fn(model: GPT, prompt: list[int], n: int):
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    return lambda: generate(model, prompt, params).completions[0].token_ids


def engine_fn(model: GPT, prompt: list[int], n: int, int8: str | bool = False, transpose: bool = False,
              fast: bool = False, dtype: torch.dtype | None = None):
    from byollm.serve.engine import Engine  # ImportError: the engine is not there (yet)

    in_place = int8 or transpose or fast or dtype  # these change the model's layers in place: work on a copy
    model = copy.deepcopy(model) if in_place else model
    if dtype is not None:
        model = model.to(dtype)
    engine = Engine(model, int8=int8, transpose_weights=transpose, fast_decode=fast)
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())

    def run() -> list[int]:
        return list(engine.generate([prompt], params)[0])

    return run, engine


def read_bandwidth(gib: float = 1.0, tries: int = 5) -> float:
    """Bytes/s of the best of `tries` sums over a `gib` GiB fp32 tensor: what streaming weights can reach."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(tries):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best


def quantize_gguf(src: Path, dst: Path, kind: str = "q8_0") -> Path:
    """llama.cpp's own quantiser (through llama-cpp-python) on one of our GGUF exports."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[kind]
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src} to {kind}")
    return dst


def hf_fn(model: GPT, prompt: list[int], n: int):
    from byollm.interop.hf import to_hf_model

    hf = to_hf_model(model)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt])

    def run() -> list[int]:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False)
        return out[0, len(prompt):].tolist()

    return run, type(hf).__name__


def llama_cpp_fn(path: Path, prompt: list[int], n: int, threads: int, extra_bufts: bool = False):
    from byollm.interop.gguf import load_llama_cpp

    llm = load_llama_cpp(path, extra_bufts=extra_bufts, n_ctx=len(prompt) + n + 8, n_batch=len(prompt) + 8,
                         n_threads=threads, n_threads_batch=threads, verbose=False)

    def run() -> list[int]:
        llm.reset()  # otherwise llama-cpp-python reuses the prompt's KV cache from the previous call
        out: list[int] = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) == n:
                return out
        return out

    return run, llm


# The question a packaged real model is timed on (its own chat template renders the prompt).
REAL_QUESTION = "Explain in a few sentences why the sky is blue."


def real_model(name: str) -> tuple[GPT, Any, list[int], Path]:
    """A packaged real model (byollm.interop.pretrained): our fp32 model, its tokenizer, a real chat prompt,
    and the original GGUF file it was converted from."""
    from byollm.checkpoint import load_checkpoint
    from byollm.interop.pretrained import packaged_checkpoint, packaged_gguf
    from byollm.tokenizer import chat_format

    loaded = load_checkpoint(packaged_checkpoint(name))
    prompt = chat_format(loaded.tokenizer).encode_prompt([{"role": "user", "content": REAL_QUESTION}])
    return loaded.model.eval(), loaded.tokenizer, prompt, packaged_gguf(name)


# Every contender in table order, and the llama.cpp file of the same weight precision each is compared with.
CONTENDERS = ("ours", "engine", "engine-t", "engine-fast", "engine-bf16", "engine-int8", "hf", "llama.cpp-f32",
              "llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-orig")
SAME_PRECISION = {"ours": "llama.cpp-f32", "engine": "llama.cpp-f32", "engine-t": "llama.cpp-f32",
                  "engine-fast": "llama.cpp-f32", "hf": "llama.cpp-f32", "engine-bf16": "llama.cpp-f16",
                  "engine-int8": "llama.cpp-q8_0"}


def bench_preset(name: str, args: argparse.Namespace, tok: Any, tmp: Path) -> dict[str, Any]:
    from byollm.interop.pretrained import PACKAGED_MODELS

    original: Path | None = None
    if name in PACKAGED_MODELS:
        model, tok, prompt, original = real_model(name)
    else:
        model = make_model(name, tok.vocab_size, args.prompt_len + args.new_tokens)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, tok.vocab_size, (args.prompt_len,), generator=g).tolist()
    cfg = model.config
    n = args.new_tokens
    row: dict[str, Any] = {"preset": name, "params (M)": model.num_params() / 1e6, "vocab": cfg.vocab_size,
                           "prompt tokens": len(prompt)}
    fns: dict[str, Any] = {}
    keep: list[Any] = []  # llama.cpp models stay alive while timed
    if "ours" in args.contenders:
        fns["ours"] = ours_fn(model, prompt, n)
    from byollm.serve.fast_decode import decode_weight_bytes

    weight_bytes = {"ours": decode_weight_bytes(model), "hf": decode_weight_bytes(model)}  # per token
    engines: dict[str, Any] = {}
    llama_style = cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
    variants = {"engine": {}, "engine-t": dict(transpose=True), "engine-fast": dict(fast=True),
                "engine-int8": dict(int8="fbgemm"), "engine-bf16": dict(dtype=torch.bfloat16)}
    for k, kwargs in variants.items():
        if k not in args.contenders or (k == "engine-fast" and not llama_style):
            continue
        try:
            fns[k], engines[k] = engine_fn(model, prompt, n, **kwargs)
            weight_bytes[k] = engines[k].weight_bytes
        except ImportError:
            row[k] = "not available"
    if "hf" in args.contenders:
        fns["hf"], row["hf_class"] = hf_fn(model, prompt, n)
    for dtype in ("f32", "f16", "q8_0"):
        if f"llama.cpp-{dtype}" not in args.contenders or not llama_style:
            continue
        from byollm.interop.gguf import export_gguf

        if dtype == "q8_0":
            f32 = export_gguf(model, tmp / f"{name}-f32-for-q8.gguf", tok, dtype="f32")
            path = quantize_gguf(f32, tmp / f"{name}-q8_0.gguf")
        else:
            path = export_gguf(model, tmp / f"{name}-{dtype}.gguf", tok, dtype=dtype)
        row[f"gguf_{dtype}_mb"] = path.stat().st_size / 1e6
        weight_bytes[f"llama.cpp-{dtype}"] = path.stat().st_size  # its tensors (a tied table once) + metadata
        fns[f"llama.cpp-{dtype}"], llm = llama_cpp_fn(path, prompt, n, args.threads, args.llama_cpp_extra_bufts)
        keep.append(llm)
    if original is not None and "llama.cpp-orig" in args.contenders:
        row["gguf_orig_mb"] = original.stat().st_size / 1e6
        weight_bytes["llama.cpp-orig"] = original.stat().st_size
        fns["llama.cpp-orig"], llm = llama_cpp_fn(original, prompt, n, args.threads, args.llama_cpp_extra_bufts)
        keep.append(llm)

    outputs = {k: fn() for k, fn in fns.items()}  # warm-up, and the tokens to compare
    reference = outputs.get("ours")
    before = {k: (e.decode_steps, e.decode_seconds) for k, e in engines.items()}
    times = interleaved(fns, reps=args.reps, warmup=0)
    result: dict[str, Any] = {**row, "seconds": times, "tokens": outputs, "load_average_1min": load_average(),
                              "weight_bytes_per_token": weight_bytes}
    for k, ts in times.items():
        result[f"{k} tok/s"] = n / median(ts)
        if k in weight_bytes:
            result[f"{k} GB/s"] = weight_bytes[k] * result[f"{k} tok/s"] / 1e9
            result[f"{k} of read bw"] = weight_bytes[k] * result[f"{k} tok/s"] / args.read_bandwidth
        if reference is not None and k != "ours":
            same = next((i for i, (a, b) in enumerate(zip(outputs[k], reference, strict=False)) if a != b), n)
            result[f"{k} same tokens"] = f"{same}/{n}"
    for k, e in engines.items():  # decode steps alone: no prefill, no sampling
        steps, seconds = e.decode_steps - before[k][0], e.decode_seconds - before[k][1]
        result[f"{k} decode-only tok/s"] = steps / seconds
        result[f"{k} decode-only of read bw"] = weight_bytes[k] * steps / seconds / args.read_bandwidth
    for k in ("engine", "engine-t", "engine-fast", "ours", "engine-int8", "engine-bf16", "hf"):
        if f"{k} tok/s" not in result:
            continue
        for peer in ("hf", "llama.cpp-f32", "llama.cpp-f16", "llama.cpp-q8_0", "llama.cpp-orig"):
            if f"{peer} tok/s" in result:
                result[f"{k}/{peer}"] = result[f"{k} tok/s"] / result[f"{peer} tok/s"]
    del keep
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "presets": []}
    m = results["machine"]
    with contextlib.suppress(ImportError):
        import llama_cpp

        m["llama_cpp_python"] = llama_cpp.__version__
    print(f"{m['cpu']}, {m['cores']} cores, {args.threads} threads; torch {m['torch']}, transformers "
          f"{m['transformers']}, llama-cpp-python {m.get('llama_cpp_python', 'absent')}; {m['date']}")
    warn_if_busy(args.threads)
    args.read_bandwidth = read_bandwidth(0.125 if args.quick else 1.0)
    results["read_bandwidth_GBps"] = args.read_bandwidth / 1e9
    print(f"read bandwidth ({'1/8' if args.quick else '1'} GiB sum, {args.threads} threads): "
          f"{args.read_bandwidth / 1e9:.1f} GB/s")
    tok = small_tokenizer()
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        for name in args.presets:
            print(f"\n{name}: {args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy ...", flush=True)
            try:
                results["presets"].append(bench_preset(name, args, tok, Path(tmp)))
            except Exception as e:  # report and go on with the next preset
                traceback.print_exc()
                results["presets"].append({"preset": name, "error": repr(e)})
    rows = results["presets"]
    print(f"\n== decode at batch 1, {args.threads} threads: tokens/s (median of {args.reps} interleaved calls, prefill "
          f"included), weight bytes read per token, achieved GB/s and its fraction of the read bandwidth "
          f"({args.read_bandwidth / 1e9:.1f} GB/s) ==")
    for r in rows:
        if "error" in r:
            continue
        per = []
        for k in CONTENDERS:
            if f"{k} tok/s" not in r:
                continue
            peer = SAME_PRECISION.get(k)
            per.append({"contender": k, "tok/s": r[f"{k} tok/s"],
                        "decode-only tok/s": r.get(f"{k} decode-only tok/s", "-"),
                        "MB/token": r["weight_bytes_per_token"].get(k, 0) / 1e6 or "-",
                        "GB/s": r.get(f"{k} GB/s", "-"), "of read bw": r.get(f"{k} of read bw", "-"),
                        "decode-only of read bw": r.get(f"{k} decode-only of read bw", "-"),
                        "vs llama.cpp same precision": r.get(f"{k}/{peer}", "-") if peer else "-",
                        "same tokens as ours": r.get(f"{k} same tokens", "-")})
        print(f"\n{r['preset']} ({r['params (M)']:.0f}M params, {r['prompt tokens']}-token prompt, "
              f"load {r['load_average_1min']}):")
        print(table(per))
    for r in rows:
        if "error" in r:
            print(f"{r['preset']}: error {r['error']}")
    results["wall_s"] = time.perf_counter() - started
    print(f"\n{results['wall_s']:.0f} s; 1-minute load average now {load_average()}")
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
