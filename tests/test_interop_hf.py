"""Hugging Face interop: configs, weights and directories convert both ways and compute the same logits.

Every model here is tiny, built locally from a config with random weights (norm weights and biases too,
so a mapping mistake cannot hide behind ones and zeros). Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from byollm.checkpoint import load_checkpoint, save_checkpoint
from byollm.errors import CheckpointError
from byollm.interop.convert import convert_from_hf, export_checkpoint_to_hf
from byollm.interop.hf import (
    config_from_hf,
    config_to_hf,
    export_hf,
    from_hf_model,
    load_hf_dir,
    state_dict_from_hf,
    state_dict_to_hf,
    to_hf_model,
)
from byollm.model import GPT, KVCache, ModelConfig, list_presets, preset

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

TOL = 1e-4
VOCAB = 128


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere: matrices N(0, 0.15), norm weights 1 + N(0, 0.2), biases N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1:
                p.copy_(0.15 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(1 + 0.2 * noise)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two threads spin and stall when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------------
# Tiny Hugging Face configs covering every mapping path
# --------------------------------------------------------------------------------------------------

_LLAMA_SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=160, vocab_size=VOCAB, max_position_embeddings=64,
                    bos_token_id=None, eos_token_id=None)
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}


def hf_config(case: str):
    t = transformers
    if case == "gpt2":
        return t.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=64,
                            bos_token_id=None, eos_token_id=None)
    if case == "gpt2-untied":
        return t.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_inner=96, vocab_size=VOCAB, n_positions=64,
                            layer_norm_epsilon=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    if case == "llama-gqa":  # untied, grouped-query attention, non-default rope_theta
        return t.LlamaConfig(**_LLAMA_SHAPE, rope_theta=5000.0, tie_word_embeddings=False)
    if case == "llama-tied":  # SmolLM-style
        return t.LlamaConfig(**_LLAMA_SHAPE, rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    if case == "llama3-rope":
        return t.LlamaConfig(**_LLAMA_SHAPE, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE))
    if case == "llama-bias-linear":  # biases everywhere, head_dim != hidden/heads, linear rope scaling
        return t.LlamaConfig(**_LLAMA_SHAPE, head_dim=32, attention_bias=True, mlp_bias=True,
                             rope_scaling={"rope_type": "linear", "factor": 2.0})
    if case == "qwen2":  # q/k/v biases only
        return t.Qwen2Config(**_LLAMA_SHAPE, tie_word_embeddings=True)
    if case == "mistral":
        return t.MistralConfig(**_LLAMA_SHAPE, sliding_window=None)
    raise KeyError(case)


HF_CASES = ["gpt2", "gpt2-untied", "llama-gqa", "llama-tied", "llama3-rope", "llama-bias-linear", "qwen2", "mistral"]
_cache: dict[str, tuple] = {}


@pytest.fixture(params=HF_CASES)
def hf_pair(request):
    """(HF model, our imported model), built once per case."""
    if request.param not in _cache:
        torch.manual_seed(0)
        hf = randomize(transformers.AutoModelForCausalLM.from_config(hf_config(request.param)))
        _cache[request.param] = (hf, from_hf_model(hf))
    return _cache[request.param]


def tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# Import: HF -> ours computes the same logits
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_import_full_forward_matches(hf_pair):
    hf, ours = hf_pair
    x = tokens()
    assert max_diff(ours(x).logits, hf(x).logits) <= TOL


@torch.no_grad()
def test_import_kv_cache_decoding_matches_hf_full_forward(hf_pair):
    hf, ours = hf_pair
    x = tokens(length=16)
    reference = hf(x).logits
    cache = KVCache.for_model(ours, batch_size=2, max_len=16)
    prefill = 10
    logits = ours(x[:, :prefill], kv_cache=cache).logits
    assert max_diff(logits, reference[:, :prefill]) <= TOL
    for t in range(prefill, 16):  # one token at a time
        step = ours(x[:, t : t + 1], kv_cache=cache).logits
        assert max_diff(step[:, 0], reference[:, t]) <= TOL, f"decode step at position {t}"


@torch.no_grad()
def test_import_right_padded_batch_matches_on_real_positions(hf_pair):
    hf, ours = hf_pair
    x = tokens(length=14)
    mask = torch.ones_like(x)
    mask[1, 9:] = 0  # the second sequence is 9 tokens long, then padding
    ref, got = hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask).logits
    assert max_diff(got[0], ref[0]) <= TOL
    assert max_diff(got[1, :9], ref[1, :9]) <= TOL
    # and the padded row agrees with the short sequence run on its own
    assert max_diff(got[1, :9], ours(x[1:, :9]).logits[0]) <= TOL


def test_imported_config_fields():
    cfg = config_from_hf(hf_config("llama3-rope"))
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.block_size) == (4, 2, 16, 64)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == _LLAMA3_ROPE
    assert cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and not cfg.tie_embeddings
    qwen = config_from_hf(hf_config("qwen2"))
    assert qwen.qkv_bias and not qwen.bias and qwen.tie_embeddings
    gpt2 = config_from_hf(hf_config("gpt2"))
    assert gpt2.intermediate_size == 256 and gpt2.tie_embeddings and gpt2.bias  # n_inner=None -> 4 * n_embd
    assert config_from_hf(hf_config("gpt2-untied")).intermediate_size == 96


def test_config_from_hf_reads_old_and_new_rope_layouts():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
            "intermediate_size": 96, "vocab_size": VOCAB, "max_position_embeddings": 64}
    old = config_from_hf({**base, "rope_theta": 1e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = config_from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5}})
    assert old == new
    assert new.rope_theta == 1e5 and new.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    plain = config_from_hf({**base, "rope_theta": 1e5, "rope_scaling": None})
    assert plain.rope_theta == 1e5 and plain.rope_scaling is None
    assert config_from_hf(base).n_kv_head == 4  # num_key_value_heads missing: multi-head attention


# The published config.json files of two real checkpoints (openai-community/gpt2, HuggingFaceTB/SmolLM2-135M).
GPT2_CONFIG_JSON = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 50256,
    "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
    "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": 50257,
}
SMOLLM2_CONFIG_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
    "vocab_size": 49152,
}


def test_real_configs_import_as_our_presets():
    assert config_from_hf(GPT2_CONFIG_JSON) == preset("gpt2-124m")
    assert config_from_hf(SMOLLM2_CONFIG_JSON) == preset("smollm2-135m", init_std=0.041666666666666664)


@pytest.mark.parametrize("name", list_presets())
def test_config_round_trip_for_every_preset(name):
    cfg = preset(name)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


# --------------------------------------------------------------------------------------------------
# Export: ours -> HF computes the same logits, with and without HF's own KV cache
# --------------------------------------------------------------------------------------------------

EXPORT_CASES = {
    "gpt-tiny": lambda: preset("gpt-tiny"),
    "llama-tiny": lambda: preset("llama-tiny"),
    "llama-tiny-tied": lambda: preset("llama-tiny", tie_embeddings=True, rope_theta=50000.0),
    "qwen2-style": lambda: preset("llama-tiny", qkv_bias=True),
    "llama3-rope": lambda: preset("llama-tiny", rope_scaling=dict(_LLAMA3_ROPE)),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
@torch.no_grad()
def test_export_loads_in_transformers_with_same_logits(case, tmp_path):
    torch.manual_seed(0)
    ours = randomize(GPT(EXPORT_CASES[case]()))
    export_hf(ours, tmp_path / "hf")
    written = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= written
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    x = tokens(length=16)
    full = ours(x).logits
    assert max_diff(hf(x).logits, full) <= TOL
    # HF's incremental decoding with its own cache (past_key_values) agrees too.
    out = hf(x[:, :10], use_cache=True)
    key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.24 renamed past_key_values
    for t in range(10, 16):
        out = hf(x[:, t : t + 1], **{key: out[key]}, use_cache=True)
        assert max_diff(out.logits[:, -1], full[:, t]) <= TOL


@pytest.mark.parametrize("case", ["gpt-tiny", "llama-tiny", "qwen2-style"])
@torch.no_grad()
def test_to_hf_model_in_memory(case):
    ours = randomize(GPT(EXPORT_CASES[case]()))
    hf = to_hf_model(ours)
    x = tokens()
    assert max_diff(hf(x).logits, ours(x).logits) <= TOL


def test_export_writes_tied_weights_once_and_dtype(tmp_path):
    ours = randomize(GPT(preset("llama-tiny", tie_embeddings=True)))
    export_hf(ours, tmp_path / "hf", dtype=torch.bfloat16)
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]


# --------------------------------------------------------------------------------------------------
# State dicts and directories round trip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_state_dict_round_trip_is_exact(case):
    cfg = EXPORT_CASES[case]()
    ours = randomize(GPT(cfg))
    sd = ours.state_dict()
    back = state_dict_from_hf(state_dict_to_hf(sd, cfg), cfg)
    expected = {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "llama-tied", "qwen2"])
@torch.no_grad()
def test_save_pretrained_convert_load_checkpoint(case, tmp_path):
    hf = randomize(transformers.AutoModelForCausalLM.from_config(hf_config(case)))
    hf.save_pretrained(tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "meta.json").read_text())
    assert meta["source"].endswith("hf") and meta["converted_from"] == f"huggingface/{hf.config.model_type}"
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.kind == "checkpoint"
    x = tokens()
    reference = hf(x).logits
    assert max_diff(loaded.model(x).logits, reference) <= TOL
    direct = load_checkpoint(tmp_path / "hf")  # an HF directory is accepted wherever a checkpoint is
    assert direct.kind == "hf" and direct.tokenizer is None
    assert max_diff(direct.model(x).logits, reference) <= TOL


@pytest.mark.parametrize("case", ["gpt-tiny", "qwen2-style"])
def test_export_then_load_hf_dir_round_trip(case, tmp_path):
    ours = randomize(GPT(EXPORT_CASES[case]()))
    export_hf(ours, tmp_path / "hf")
    back, tokenizer = load_hf_dir(tmp_path / "hf")
    assert tokenizer is None and back.config == ours.config
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


@torch.no_grad()
def test_legacy_gpt2_layout_sharded_and_bin_files(tmp_path):
    """Hub GPT-2 files have no `transformer.` prefix and carry attn.bias mask buffers; others are sharded
    or in pytorch_model.bin. All load to the same model."""
    hf = randomize(transformers.AutoModelForCausalLM.from_config(hf_config("gpt2")))
    x = tokens()
    reference = hf(x).logits
    config = hf.config.to_dict()
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}

    raw = {k.removeprefix("transformer."): v for k, v in sd.items()}
    for i in range(2):
        raw[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        raw[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    layouts = {"raw": {"model.safetensors": raw}, "bin": {"pytorch_model.bin": sd},
               "sharded": {"model-00001-of-00002.safetensors": {k: v for k, v in sd.items() if ".h.1." not in k},
                           "model-00002-of-00002.safetensors": {k: v for k, v in sd.items() if ".h.1." in k}}}
    for layout, files in layouts.items():
        d = tmp_path / layout
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        for name, tensors in files.items():
            if name.endswith(".bin"):
                torch.save(tensors, d / name)
            else:
                save_file(tensors, str(d / name))
        if layout == "sharded":
            weight_map = {k: name for name, tensors in files.items() for k in tensors}
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        model, _ = load_hf_dir(d)
        assert max_diff(model(x).logits, reference) <= TOL, layout


@pytest.mark.slow  # a fresh interpreter: a few seconds to import torch
def test_loading_directories_needs_no_transformers(tmp_path):
    export_hf(randomize(GPT(preset("llama-tiny"))), tmp_path / "hf")
    code = textwrap.dedent(f"""
        import sys
        from byollm.checkpoint import load_checkpoint
        from byollm.interop.hf import export_hf, load_hf_dir
        model, _ = load_hf_dir({str(tmp_path / "hf")!r})
        load_checkpoint({str(tmp_path / "hf")!r})
        export_hf(model, {str(tmp_path / "again")!r})
        assert "transformers" not in sys.modules, "transformers was imported"
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1], env=env)


# --------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------


def write_config(d: Path, config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_unsupported_model_type(tmp_path):
    d = write_config(tmp_path / "bert", {"model_type": "bert", "hidden_size": 64})
    with pytest.raises(CheckpointError, match=r"'bert'.*gpt2, llama, mistral, qwen2"):
        load_hf_dir(d)


def test_missing_directory_and_non_hf_config(tmp_path):
    with pytest.raises(CheckpointError, match="directory does not exist"):
        load_hf_dir(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no model_type"):
        config_from_hf(preset("gpt-tiny").to_dict())


def test_missing_weights_file(tmp_path):
    d = write_config(tmp_path / "hf", config_to_hf(preset("llama-tiny")))
    with pytest.raises(CheckpointError, match="no weights.*model.safetensors"):
        load_hf_dir(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard .*model-00001.safetensors is missing"):
        load_hf_dir(d)


def test_weights_that_do_not_fit_the_config(tmp_path):
    export_hf(randomize(GPT(preset("llama-tiny"))), tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "intermediate_size": 192}))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .* needs"):
        load_hf_dir(tmp_path / "hf")
    config_file.write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected .*blocks\.1\."):
        load_hf_dir(tmp_path / "hf")
    config_file.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing .*blocks\.2\."):
        load_hf_dir(tmp_path / "hf")


def test_hf_weight_without_a_place_in_our_model():
    cfg = preset("llama-tiny")
    hf_sd = state_dict_to_hf(GPT(cfg).state_dict(), cfg)
    hf_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints: ignored
    assert state_dict_from_hf(hf_sd, cfg).keys() == GPT(cfg).state_dict().keys()
    hf_sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)  # e.g. a Qwen3 checkpoint
    with pytest.raises(CheckpointError, match=r"unexpected weight 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        state_dict_from_hf(hf_sd, cfg)


@pytest.mark.parametrize(("change", "message"), [
    ({"sliding_window": 16, "model_type": "mistral"}, "sliding-window attention"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not supported"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias=True but mlp_bias=False"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_interleaved": True}, "rope_interleaved"),
])
def test_unsupported_hf_features_are_errors(change, message):
    with pytest.raises(CheckpointError, match=message):
        config_from_hf({**config_to_hf(preset("llama-tiny")), **change})


def test_unsupported_gpt2_activation():
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        config_from_hf({**config_to_hf(preset("gpt-tiny")), "activation_function": "relu"})


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(norm="layernorm"), "norm='layernorm'"),
    (dict(pos_embedding="learned", mlp="gelu"), "no supported architecture fits"),
    (dict(qkv_bias=False, bias=True), "qkv_bias=False but bias=True"),
])
def test_unexportable_configs_name_the_blocking_field(overrides, message, tmp_path):
    model = GPT(preset("llama-tiny", **overrides))
    with pytest.raises(CheckpointError, match=message):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_export_needs_full_attention_heads():
    with pytest.raises(CheckpointError, match="n_kv_head=2"):
        config_to_hf(preset("gpt-tiny", n_kv_head=2))


# --------------------------------------------------------------------------------------------------
# The tokenizer travels with the model
# --------------------------------------------------------------------------------------------------

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


@pytest.fixture(scope="module")
def bpe():
    tokenizer_pkg = pytest.importorskip("byollm.tokenizer")
    return tokenizer_pkg.BPETokenizer.train(TEXT, vocab_size=300, special_tokens=["<|endoftext|>"])


@torch.no_grad()
def test_tokenizer_round_trips_through_hf_export(bpe, tmp_path):
    ids = bpe.encode(TEXT + "<|endoftext|>")
    model = randomize(GPT(preset("gpt-tiny", vocab_size=320)))
    save_checkpoint(model, tmp_path / "ckpt", bpe)
    export_checkpoint_to_hf(tmp_path / "ckpt", tmp_path / "hf")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == bpe.eos_id == bpe.special_tokens["<|endoftext|>"]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == bpe.eos_id

    back, tokenizer = load_hf_dir(tmp_path / "hf")
    assert tokenizer is not None and tokenizer.encode(TEXT + "<|endoftext|>") == ids
    assert tokenizer.eos_id == bpe.eos_id

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(TEXT + "<|endoftext|>")["input_ids"] == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.tensor([ids[:32]])
    assert max_diff(hf(x).logits, model(x).logits) <= TOL

    convert_from_hf(tmp_path / "hf", tmp_path / "ckpt2")  # ... and back into a byollm checkpoint
    loaded = load_checkpoint(tmp_path / "ckpt2")
    assert loaded.tokenizer is not None and loaded.tokenizer.encode(TEXT) == bpe.encode(TEXT)


def test_export_refuses_a_tokenizer_larger_than_the_vocabulary(bpe, tmp_path):
    with pytest.raises(CheckpointError, match="300 tokens but the model only vocab_size=128"):
        export_hf(GPT(preset("gpt-tiny")), tmp_path / "hf", bpe)


def test_mistral_without_sliding_window_imports():
    cfg = config_from_hf(hf_config("mistral"))
    assert isinstance(cfg, ModelConfig) and cfg.n_kv_head == 2 and not cfg.bias and not cfg.qkv_bias


def test_gpt2_style_vocab_and_merges_tokenizer_is_picked_up(bpe, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_config(hf_config("gpt2"))
    hf.save_pretrained(tmp_path / "hf")
    bpe.save(tmp_path / "tok")
    for name in ("vocab.json", "merges.txt"):  # the original GPT-2 release has only these two files
        (tmp_path / "hf" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    _, tokenizer = load_hf_dir(tmp_path / "hf")
    assert tokenizer is not None and tokenizer.encode(TEXT) == bpe.encode(TEXT)
