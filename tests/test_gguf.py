"""GGUF export, checked against llama.cpp itself (llama-cpp-python): same tokens, same logits, same greedy text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from byollm.errors import ByollmError
from byollm.generate import generate
from byollm.interop.gguf import export_gguf, permute_rope
from byollm.model import GPT, preset
from byollm.sampling import SamplingParams
from byollm.tokenizer import BPETokenizer, CharTokenizer, add_chat_tokens, train_bpe_fast

llama_cpp = pytest.importorskip("llama_cpp")  # installed by the dev extra; skipped only where it is absent
gguf = pytest.importorskip("gguf")

N_NEW = 24
SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  All: Speak, speak! 123 it's"


@pytest.fixture(scope="module")
def trained(shakespeare_text: str) -> tuple[GPT, BPETokenizer]:
    """llama-tiny (untied head, GQA) with a 320-id BPE tokenizer and chat tokens, trained for a few dozen steps
    so that its greedy continuations are confident (a random model's near-ties could flip between runtimes)."""
    text = shakespeare_text[:20_000]
    tok = BPETokenizer.train(text, vocab_size=320)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size + 3, block_size=128))
    data = torch.tensor(tok.encode(text[:8000]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


def load(path: Path, n_ctx: int = 128, f32_cache: bool = True) -> llama_cpp.Llama:
    kv = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32: the default f16 KV cache rounds
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx, logits_all=True,
                           verbose=False, **kv)


def greedy_llama_cpp(llm: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == n:
            return out
    return out


def greedy_ours(model: GPT, prompt: list[int], n: int) -> list[int]:
    return generate(model, prompt, SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())).completions[
        0].token_ids


def test_permute_rope_pairs_adjacent_channels():
    # One head of D=6: rotate-half pairs (0,3), (1,4), (2,5) become adjacent rows (0,1), (2,3), (4,5).
    w = torch.arange(12.0).reshape(12, 1)  # two heads
    assert permute_rope(w, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_matches_our_logits_and_greedy_tokens(trained, tmp_path, dtype):
    model, tok = trained
    path = export_gguf(model, tmp_path / f"m-{dtype}.gguf", tok, dtype=dtype)
    reference = model
    if dtype == "f16":  # the same rounded weights; llama.cpp still computes in f32
        reference = GPT(model.config)
        reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        reference.eval()
    prompt = tok.encode(SAMPLE)[:20]
    llm = load(path)
    assert llm.n_vocab() == model.config.vocab_size and int(llm.metadata["llama.context_length"]) == 128

    llm.reset()
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    with torch.no_grad():
        ours = reference(torch.tensor([prompt])).logits[0]
    scale = ours.abs().max().item()
    # f32: the same arithmetic up to summation order (measured ~3e-7 relative; without the RoPE permutation
    # it is ~5e-2). f16: llama.cpp also rounds the activations to f16 for its matmuls (measured ~2e-4).
    assert (theirs - ours).abs().max().item() < {"f32": 1e-5, "f16": 1e-3}[dtype] * scale

    expected = greedy_ours(reference, prompt, N_NEW)
    assert len(set(expected)) > 3  # not a degenerate repeat of one token
    assert greedy_llama_cpp(llm, prompt, N_NEW) == expected


def test_tokenizer_parity_bpe_with_special_tokens(trained, tmp_path):
    model, tok = trained
    llm = load(export_gguf(model, tmp_path / "m.gguf", tok), f32_cache=False)
    chat = "<|user|>Speak, speak!<|end|>\n<|assistant|>We are resolved."
    for text in (SAMPLE, chat, "  leading spaces and trailing  \n\n", "émigré naïve 💡 ünïcödé"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    # Without `special`, control tokens in the text are plain text in both.
    assert llm.tokenize(chat.encode(), add_bos=False, special=False) == tok.encode(chat, allowed_special=False)
    ids = tok.encode(SAMPLE + chat)
    assert llm.detokenize(ids, special=True).decode() == tok.decode(ids)
    meta = llm.metadata
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_id == tok.special_tokens["<|end|>"]
    assert "<|assistant|>" in meta["tokenizer.chat_template"]
    assert float(meta["llama.rope.freq_base"]) == model.config.rope_theta


def test_tied_fast_tokenizer_char_tokenizer_and_rope_scaling(shakespeare_text, tmp_path):
    """A tied head (no `output` tensor), the tokenizers-trained BPE, linear RoPE scaling, and a char vocabulary."""
    tok = train_bpe_fast(shakespeare_text[:5000], vocab_size=300)
    torch.manual_seed(1)
    config = dataclasses.replace(preset("llama-tiny"), vocab_size=300, tie_embeddings=True, init_std=0.3,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = GPT(config).eval()
    llm = load(export_gguf(model, tmp_path / "tied.gguf", tok))
    assert llm.tokenize(SAMPLE.encode(), add_bos=False, special=True) == tok.encode(SAMPLE)
    prompt = tok.encode(SAMPLE)[:16]
    assert greedy_llama_cpp(llm, prompt, 12) == greedy_ours(model, prompt, 12)

    char = CharTokenizer.train(shakespeare_text[:5000], special_tokens=["<|endoftext|>"])
    torch.manual_seed(2)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=char.vocab_size, init_std=0.3)).eval()
    llm = load(export_gguf(model, tmp_path / "char.gguf", char))
    text = "First Citizen:\n\nYou are all resolved rather to die than to famish?<|endoftext|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == char.encode(text)
    prompt = char.encode(text)[:20]
    assert greedy_llama_cpp(llm, prompt, 12) == greedy_ours(model, prompt, 12)


def test_llama3_rope_scaling_travels_as_rope_freqs(shakespeare_text, tmp_path):
    """Llama 3.1's RoPE scaling becomes llama.cpp's `rope_freqs` tensor; a short original context makes it bite."""
    tok = train_bpe_fast(shakespeare_text[:5000], vocab_size=300)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(1)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=300, init_std=0.3, rope_scaling=scaling)).eval()
    llm = load(export_gguf(model, tmp_path / "l3.gguf", tok))
    prompt = list(range(40, 100))
    llm.reset()
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)], dtype=np.float32))
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0]
    assert (theirs - ours).abs().max().item() < 1e-4 * ours.abs().max().item()  # measured ~1e-5 (unscaled: ~1)


def test_refusals_are_one_line_errors(trained, tmp_path):
    model, tok = trained
    with pytest.raises(ByollmError, match="only Llama-style models"):
        export_gguf(GPT(preset("gpt-tiny")), tmp_path / "g.gguf", tok)
    with pytest.raises(ByollmError, match="without a tokenizer"):
        export_gguf(model, tmp_path / "n.gguf", None)
    with pytest.raises(ByollmError, match="more than one UTF-8 byte"):
        export_gguf(GPT(preset("llama-tiny")), tmp_path / "c.gguf", CharTokenizer(["a", "é"]))
    with pytest.raises(ByollmError, match="but the model only"):
        export_gguf(GPT(preset("llama-tiny")), tmp_path / "v.gguf", tok)  # 128 ids < the tokenizer's
    with pytest.raises(ByollmError, match="f32 or f16"):
        export_gguf(model, tmp_path / "q.gguf", tok, dtype="q8_0")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_gguf(trained, tmp_path, capsys):
    from byollm.checkpoint import save_checkpoint
    from byollm.cli import main

    model, tok = trained
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tok)
    out = tmp_path / "out" / "model.gguf"
    assert main(["export", "gguf", str(ckpt), str(out), "--dtype", "f16"]) == 0
    assert "llama" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" in types  # llama-tiny's head is untied
    assert main(["export", "gguf", str(tmp_path / "missing"), str(out)]) == 2
