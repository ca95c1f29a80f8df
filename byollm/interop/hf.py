"""Hugging Face checkpoints in and out: GPT-2, Llama (SmolLM), Mistral and Qwen2 <-> byollm's `GPT`.

Our model and Hugging Face's implementations compute the same functions; only the names differ (and GPT-2's
weights are stored transposed and fused). Converting is therefore three small steps:

1. config: an HF `config.json` maps field by field onto `ModelConfig` (`config_from_hf`, `config_to_hf`);
2. weights: each HF parameter name maps onto one of ours (`LLAMA_NAMES`, `GPT2_NAMES` below);
3. files: an HF directory is `config.json` + `model.safetensors` (+ tokenizer files).

Reading and writing directories needs only torch and safetensors. `transformers` is needed only to convert
in-memory transformers models (`from_hf_model`, `to_hf_model`), and is imported lazily there.

RoPE needs no weight surgery: our `apply_rope` pairs channel i with channel i + D/2 ("rotate half"), exactly
as transformers' Llama does, so q_proj/k_proj weights copy over unchanged. (Meta's original Llama weights
pair adjacent channels (2i, 2i+1); transformers' conversion script permutes them once, so every HF Llama
checkpoint is already in the rotate-half layout.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from byollm.errors import ByollmError, CheckpointError, ConfigError, require
from byollm.model import GPT, ModelConfig, build_model

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from byollm.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")  # SmolLM/SmolLM2 are model_type "llama"

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded: {"weight_map": {name: "model-0000i-of-0000n..."}}
HF_TORCH_WEIGHTS = "pytorch_model.bin"  # the pickle format older checkpoints use
HF_TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
HF_GENERATION_CONFIG = "generation_config.json"

# --------------------------------------------------------------------------------------------------
# How the names correspond
# --------------------------------------------------------------------------------------------------
# Pairs of (our module, Hugging Face's module); `{i}` is the layer number. A module's parameters keep their
# last name part, so "blocks.3.attn.q_proj" <-> "model.layers.3.self_attn.q_proj" maps both .weight and .bias.

LLAMA_NAMES: list[tuple[str, str]] = [  # Llama, SmolLM, Mistral, Qwen2
    ("tok_emb",                  "model.embed_tokens"),
    ("blocks.{i}.norm_1",        "model.layers.{i}.input_layernorm"),
    ("blocks.{i}.attn.q_proj",   "model.layers.{i}.self_attn.q_proj"),
    ("blocks.{i}.attn.k_proj",   "model.layers.{i}.self_attn.k_proj"),
    ("blocks.{i}.attn.v_proj",   "model.layers.{i}.self_attn.v_proj"),
    ("blocks.{i}.attn.o_proj",   "model.layers.{i}.self_attn.o_proj"),
    ("blocks.{i}.norm_2",        "model.layers.{i}.post_attention_layernorm"),
    ("blocks.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj"),
    ("blocks.{i}.mlp.up_proj",   "model.layers.{i}.mlp.up_proj"),
    ("blocks.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
    ("norm_f",                   "model.norm"),
    ("lm_head",                  "lm_head"),  # absent from HF files when tied to embed_tokens
]

GPT2_NAMES: list[tuple[str, str]] = [
    ("tok_emb",                  "transformer.wte"),  # word token embeddings
    ("pos_emb",                  "transformer.wpe"),  # word position embeddings
    ("blocks.{i}.norm_1",        "transformer.h.{i}.ln_1"),
    ("blocks.{i}.attn.qkv",      "transformer.h.{i}.attn.c_attn"),  # q, k, v fused into one matrix (see below)
    ("blocks.{i}.attn.o_proj",   "transformer.h.{i}.attn.c_proj"),
    ("blocks.{i}.norm_2",        "transformer.h.{i}.ln_2"),
    ("blocks.{i}.mlp.up_proj",   "transformer.h.{i}.mlp.c_fc"),  # "fully connected"
    ("blocks.{i}.mlp.down_proj", "transformer.h.{i}.mlp.c_proj"),
    ("norm_f",                   "transformer.ln_f"),
    ("lm_head",                  "lm_head"),  # always tied to wte in GPT-2 checkpoints
]
# GPT-2 was written in TensorFlow, whose dense layers store weights as [in, out]; transformers keeps that
# layout in its `Conv1D` module (y = x @ W + b), while nn.Linear stores [out, in] (y = x @ W.T + b).
# So these weights are transposed on the way in and out. `c_attn` also holds q, k and v side by side:
# its output columns are [q | k | v], split into our q_proj, k_proj, v_proj.
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# HF tensors that are not weights: GPT-2's causal-mask buffers and old Llama checkpoints' RoPE frequencies.
IGNORED_HF_KEYS = re.compile(r"(^|\.)attn\.(masked_)?bias$|rotary_emb\.inv_freq$")


def rename_parameter(name: str, table: list[tuple[str, str]], to_hf: bool) -> str | None:
    """Map one parameter name through `table` (ours -> HF, or HF -> ours); None if no row matches."""
    module, _, param = name.rpartition(".")
    for ours, theirs in table:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        match = re.fullmatch(re.escape(src).replace(r"\{i\}", r"(\d+)"), module)
        if match:
            return (dst.replace("{i}", match.group(1)) if match.groups() else dst) + "." + param
    return None


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _config_dict(hf_config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):  # a transformers PretrainedConfig
        return hf_config.to_dict()
    raise TypeError(f"expected a config.json dict or a transformers config, got {type(hf_config).__name__}")


def _field(d: dict[str, Any], *names: str, default: Any = ...) -> Any:
    """The first of `names` present in the HF config (old and new transformers spell some fields differently)."""
    for name in names:
        if d.get(name) is not None:
            return d[name]
    if default is ...:
        raise CheckpointError(f"the Hugging Face config ({d.get('model_type')}) has no '{names[0]}' field; "
                              "is config.json complete?")
    return default


def config_from_hf(hf_config: Mapping[str, Any] | Any) -> ModelConfig:
    """Our `ModelConfig` for a Hugging Face config (a `config.json` dict or a transformers `PretrainedConfig`)."""
    d = _config_dict(hf_config)
    model_type = d.get("model_type")
    if model_type is None:
        raise CheckpointError("the config has no model_type, so it is not a Hugging Face model config "
                              "(a byollm checkpoint's config.json? load that with byollm.checkpoint.load_checkpoint)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"cannot import Hugging Face model_type {model_type!r}: byollm supports "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)} (SmolLM/SmolLM2 are llama)")
    try:
        return _gpt2_config_from_hf(d) if model_type == "gpt2" else _llama_config_from_hf(d)
    except ConfigError as e:
        raise CheckpointError(f"the Hugging Face {model_type} config does not fit byollm: {e}") from e


def _gpt2_config_from_hf(d: dict[str, Any]) -> ModelConfig:
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh approximation our MLP uses
        raise CheckpointError(f"GPT-2 activation_function={act!r} is not supported (byollm's GELU MLP is "
                              "the tanh approximation: gelu_new or gelu_pytorch_tanh)")
    for key, needed in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if d.get(key, needed) != needed:
            raise CheckpointError(f"GPT-2 option {key}={d[key]} is not supported (byollm needs {key}={needed})")
    n_embd = _field(d, "n_embd", "hidden_size")
    return ModelConfig(
        vocab_size=_field(d, "vocab_size"),
        block_size=_field(d, "n_positions", "n_ctx", "max_position_embeddings"),
        n_layer=_field(d, "n_layer", "num_hidden_layers"),
        n_head=_field(d, "n_head", "num_attention_heads"),
        n_embd=n_embd,
        intermediate_size=d.get("n_inner") or 4 * n_embd,  # n_inner: null means the classic 4x
        pos_embedding="learned",
        norm="layernorm",
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        mlp="gelu",
        bias=True,
        tie_embeddings=d.get("tie_word_embeddings", True),
        init_std=d.get("initializer_range", 0.02),
    )


def _llama_config_from_hf(d: dict[str, Any]) -> ModelConfig:
    model_type = d["model_type"]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{model_type} hidden_act={act!r} is not supported (byollm's SwiGLU MLP uses silu)")
    n_embd, n_head = _field(d, "hidden_size"), _field(d, "num_attention_heads")
    block_size = _field(d, "max_position_embeddings")

    # Biases: Llama has one switch for all attention projections and one for the MLP; Qwen2 always has
    # q/k/v biases and nothing else; Mistral has none. Ours: `qkv_bias` for q/k/v, `bias` for the rest.
    if model_type == "qwen2":
        bias, qkv_bias = False, True
    else:
        attention_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise CheckpointError(f"{model_type} with attention_bias={attention_bias} but mlp_bias={mlp_bias} "
                                  "is not supported (byollm's `bias` covers o_proj and the MLP together)")
        bias = qkv_bias = attention_bias

    # Sliding-window attention (each token sees only the last W tokens) is not implemented; it makes no
    # difference when the window covers the whole context.
    window = d.get("sliding_window")
    sliding = model_type == "mistral" or d.get("use_sliding_window") or "sliding_attention" in (
        d.get("layer_types") or [])
    if sliding and window is not None and window < block_size:
        raise CheckpointError(f"{model_type} sliding-window attention (sliding_window={window} < "
                              f"max_position_embeddings={block_size}) is not supported; byollm attends to the "
                              "whole context")

    if d.get("rope_interleaved"):  # nanotron-style configs say which RoPE layout their weights use
        raise CheckpointError("rope_interleaved=true (adjacent channel pairs) is not supported; byollm and "
                              "transformers use the rotate-half layout")
    rope_theta, rope_scaling = _rope_from_hf(d)
    return ModelConfig(
        vocab_size=_field(d, "vocab_size"),
        block_size=block_size,
        n_layer=_field(d, "num_hidden_layers"),
        n_head=n_head,
        n_kv_head=_field(d, "num_key_value_heads", default=n_head),
        n_embd=n_embd,
        head_dim=_field(d, "head_dim", default=n_embd // n_head),
        intermediate_size=_field(d, "intermediate_size"),
        pos_embedding="rope",
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=bias,
        qkv_bias=qkv_bias,
        tie_embeddings=d.get("tie_word_embeddings", False),  # False is the Llama/Mistral/Qwen2 default
        init_std=d.get("initializer_range", 0.02),
    )


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config layout.

    transformers < 5 writes `"rope_theta": 10000.0` and `"rope_scaling": null | {"rope_type"|"type": ...}`;
    transformers 5 writes one dict, `"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, ...}`.
    """
    params = d.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("per-layer-type rope_parameters are not supported (one RoPE for all layers only)")
    spec = {**(d.get("rope_scaling") or {}), **params}
    theta = spec.get("rope_theta", d.get("rope_theta", 10000.0))
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"rope_type": "linear", "factor": float(spec["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, {"rope_type": "llama3", **{k: spec[k] for k in keys}}
    raise CheckpointError(f"RoPE scaling type {kind!r} is not supported (supported: default, linear, llama3)")


# Each family's building blocks; a config must match one of them completely to be exported.
_STYLES: dict[str, dict[str, str]] = {
    "gpt2": {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
}


def hf_architecture(config: ModelConfig) -> str:
    """Which HF model_type represents `config` exactly: "gpt2", "llama" or "qwen2" (else CheckpointError)."""
    misfits = {arch: [f"{field}={getattr(config, field)!r} (it needs {needed!r})"
                      for field, needed in style.items() if getattr(config, field) != needed]
               for arch, style in _STYLES.items()}
    arch = min(misfits, key=lambda a: len(misfits[a]))
    if misfits[arch]:
        raise CheckpointError(f"cannot export to Hugging Face: no supported architecture fits; the closest, {arch}, "
                              f"does not allow {', '.join(misfits[arch])}")
    if arch == "gpt2":
        if not (config.bias and config.qkv_bias):
            raise CheckpointError("cannot export to Hugging Face GPT-2 with bias=False or qkv_bias=False: GPT-2 "
                                  "has biases in every linear layer and LayerNorm")
        if config.n_kv_head != config.n_head:
            raise CheckpointError(f"cannot export to Hugging Face GPT-2 with n_kv_head={config.n_kv_head} != "
                                  f"n_head={config.n_head}: GPT-2 has no grouped-query attention")
        if config.head_dim * config.n_head != config.n_embd:
            raise CheckpointError(f"cannot export to Hugging Face GPT-2 with head_dim={config.head_dim}: GPT-2 "
                                  f"needs head_dim = n_embd / n_head = {config.n_embd // config.n_head}")
        return "gpt2"
    if config.qkv_bias == config.bias:
        return "llama"  # attention_bias = mlp_bias = bias
    if config.qkv_bias:
        return "qwen2"  # biases on q/k/v only
    raise CheckpointError("cannot export to Hugging Face with qkv_bias=False but bias=True: Llama's attention_bias "
                          "covers q/k/v and o_proj together; set qkv_bias=True or bias=False")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ByollmError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


def _token_ids(tokenizer: Tokenizer | None) -> dict[str, int | None]:
    # Always written, even as null: otherwise transformers fills in its own defaults (Llama: 1 and 2).
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": getattr(tokenizer, "pad_id", None)}


def config_to_hf(config: ModelConfig, tokenizer: Tokenizer | None = None,
                 dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    """The `config.json` of the Hugging Face model equivalent to `config` (GPT2LMHeadModel, LlamaForCausalLM
    or Qwen2ForCausalLM), with the tokenizer's bos/eos/pad ids when a tokenizer is given."""
    arch = hf_architecture(config)
    dtype_name = _dtype_name(_as_dtype(dtype))
    common = {**_token_ids(tokenizer), "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "initializer_range": config.init_std, "use_cache": True,
              "dtype": dtype_name, "torch_dtype": dtype_name}  # transformers >= 4.56 reads dtype, older torch_dtype
    if arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
            "n_positions": config.block_size, "n_ctx": config.block_size,
            "n_inner": config.intermediate_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            **common,
        }
    scaling = None
    if config.rope_scaling:
        scaling = {k: v for k, v in config.rope_scaling.items() if k != "type"}
        scaling["rope_type"] = config.rope_scaling.get("rope_type", config.rope_scaling.get("type"))
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"], "model_type": arch,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "hidden_size": config.n_embd, "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size, "hidden_act": "silu",
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        # RoPE in both layouts: rope_parameters for transformers >= 5, rope_theta + rope_scaling for older.
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta, "rope_scaling": scaling,
        "attention_dropout": 0.0,
        **common,
    }
    if arch == "llama":
        out.update(attention_bias=config.bias, mlp_bias=config.bias)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return out


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def _is_conv1d(hf_name: str) -> bool:
    return hf_name.endswith(".weight") and any(f".{m}." in hf_name for m in GPT2_CONV1D)


def _with_prefix(hf_sd: dict[str, torch.Tensor], prefix: str, marker: str) -> dict[str, torch.Tensor]:
    """Add the `transformer.`/`model.` prefix that bare checkpoints (e.g. the hub's `gpt2`) leave out."""
    if marker in hf_sd and prefix + marker not in hf_sd:
        return {(k if k.startswith("lm_head.") else prefix + k): v for k, v in hf_sd.items()}
    return hf_sd


def state_dict_from_hf(hf_sd: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face weights -> our parameter names (tensors are shared or transposed views, not copies)."""
    arch = hf_architecture(config)
    sd = {k: v for k, v in hf_sd.items() if not IGNORED_HF_KEYS.search(k)}
    if arch == "gpt2":
        sd, table = _with_prefix(sd, "transformer.", "wte.weight"), GPT2_NAMES
    else:
        sd, table = _with_prefix(sd, "model.", "embed_tokens.weight"), LLAMA_NAMES
    ours: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        new = rename_parameter(name, table, to_hf=False)
        if new is None:
            raise CheckpointError(f"unexpected weight '{name}' in the Hugging Face {arch} checkpoint: byollm has "
                                  "no parameter for it; is config.json from the same model as the weights?")
        ours[new] = tensor.t() if arch == "gpt2" and _is_conv1d(name) else tensor
    if arch == "gpt2":
        ours = _split_qkv(ours, config)
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)  # the same matrix as tok_emb.weight
    return ours


def state_dict_to_hf(our_sd: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our weights -> Hugging Face names and layouts; a tied lm_head is left out, as HF files store it once."""
    arch = hf_architecture(config)
    sd = dict(our_sd)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    table = LLAMA_NAMES
    if arch == "gpt2":
        sd, table = _fuse_qkv(sd), GPT2_NAMES
    hf: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        new = rename_parameter(name, table, to_hf=True)
        if new is None:
            raise CheckpointError(f"parameter '{name}' has no Hugging Face {arch} equivalent")
        hf[new] = tensor.t() if arch == "gpt2" and _is_conv1d(new) else tensor
    return hf


def _split_qkv(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """blocks.i.attn.qkv.{weight,bias} ([q | k | v] stacked along the output dim) -> q_proj, k_proj, v_proj."""
    q_size, kv_size = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    for name in [n for n in sd if ".attn.qkv." in n]:
        fused = sd.pop(name)
        prefix, param = name.rsplit(".qkv.", 1)
        if fused.shape[0] != q_size + 2 * kv_size:
            raise CheckpointError(f"GPT-2 weight for {name} has {fused.shape[0]} q/k/v outputs but the config needs "
                                  f"{q_size + 2 * kv_size}; is config.json from the same model?")
        for part, tensor in zip(("q_proj", "k_proj", "v_proj"), fused.split([q_size, kv_size, kv_size]), strict=True):
            sd[f"{prefix}.{part}.{param}"] = tensor
    return sd


def _fuse_qkv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of _split_qkv: q_proj, k_proj, v_proj -> one blocks.i.attn.qkv."""
    for name in [n for n in sd if ".attn.q_proj." in n]:
        prefix, param = name.rsplit(".q_proj.", 1)
        parts = [sd.pop(f"{prefix}.{p}.{param}") for p in ("q_proj", "k_proj", "v_proj")]
        sd[f"{prefix}.qkv.{param}"] = torch.cat(parts, dim=0)
    return sd


# --------------------------------------------------------------------------------------------------
# In-memory transformers models
# --------------------------------------------------------------------------------------------------


def from_hf_model(hf_model: Any) -> GPT:
    """Our `GPT` with the weights of a transformers model (same device and dtype), in eval mode."""
    config = config_from_hf(hf_model.config)
    param = next(hf_model.parameters())
    sd = state_dict_from_hf(hf_model.state_dict(), config)
    return build_model(config, sd, device=param.device, dtype=param.dtype).eval()


def to_hf_model(model: GPT, tokenizer: Tokenizer | None = None) -> Any:
    """The equivalent transformers model (`GPT2LMHeadModel`, `LlamaForCausalLM` or `Qwen2ForCausalLM`), eval mode."""
    transformers = require("transformers", "hf")
    param = next(model.parameters())
    hf_dict = config_to_hf(model.config, tokenizer)
    for key in ("architectures", "dtype", "torch_dtype"):
        hf_dict.pop(key)
    hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    missing, unexpected = hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:  # a bug in the tables above, not a user error
        raise RuntimeError(f"byollm -> transformers mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf_model.to(device=param.device, dtype=param.dtype).eval()


# --------------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------------


def read_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory: model.safetensors, its sharded form, or legacy pytorch_model.bin."""
    path = Path(path)
    files: list[Path] = []
    for single, index in ((HF_WEIGHTS, HF_WEIGHTS_INDEX), (HF_TORCH_WEIGHTS, HF_TORCH_WEIGHTS_INDEX)):
        if (path / single).is_file():
            files = [path / single]
        elif (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / index} is not a valid shard index ({e!r})") from e
            files = [path / name for name in sorted(set(weight_map.values()))]
        if files:
            break
    else:
        raise CheckpointError(f"'{path}' has no weights: expected {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} (sharded) or "
                              f"{HF_TORCH_WEIGHTS}; download the model's weight files too")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight shard {file} is missing; download all files listed in the index")
        try:
            if file.suffix == ".safetensors":
                tensors.update(load_file(str(file)))
            else:  # weights_only: a pickle could run arbitrary code; this loads tensors only
                tensors.update(torch.load(file, map_location="cpu", weights_only=True))
        except Exception as e:  # safetensors/pickle raise assorted types for truncated or corrupt files
            raise CheckpointError(f"cannot read {file}: {e}") from e
    return tensors


def has_hf_tokenizer(path: str | Path) -> bool:
    path = Path(path)
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def load_hf_dir(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer | None]:
    """Our model (eval mode) and tokenizer (None if the directory has none) from a Hugging Face model directory.

    Needs no transformers: config.json is read as JSON and the weights are renamed with the tables above."""
    path = Path(path)
    config_file = path / HF_CONFIG
    if not path.is_dir():
        raise CheckpointError(f"no Hugging Face model at '{path}': the directory does not exist (byollm reads local "
                              "directories; download hub models first, e.g. with `hf download NAME --local-dir DIR`)")
    if not config_file.is_file():
        raise CheckpointError(f"'{path}' is not a Hugging Face model directory: it has no {HF_CONFIG}")
    try:
        hf_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e})") from e
    config = config_from_hf(hf_config)
    state_dict = state_dict_from_hf(read_hf_weights(path), config)
    model = build_model(config, state_dict, device=device, dtype=dtype).eval()
    tokenizer = None
    if has_hf_tokenizer(path):
        from byollm.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    return model, tokenizer


def generation_config(tokenizer: Tokenizer | None) -> dict[str, Any]:
    return {k: v for k, v in _token_ids(tokenizer).items() if v is not None}


def export_hf(model: GPT, out_dir: str | Path, tokenizer: Tokenizer | None = None,
              dtype: torch.dtype | str | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face model directory, replacing `out_dir` atomically.

    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)`
    then load it. `dtype` (e.g. torch.bfloat16) casts the saved weights; default: the model's own dtype.
    """
    from byollm.atomic import atomic_dir_write

    config = model.config
    dtype = _as_dtype(dtype) or next(model.parameters()).dtype
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"vocab_size={config.vocab_size}; export the tokenizer the model was trained with")
    hf_config = config_to_hf(config, tokenizer, dtype)  # raises before anything is written if not exportable
    hf_sd = state_dict_to_hf(model.state_dict(), config)
    # safetensors wants contiguous tensors that share no memory: transposed GPT-2 weights become copies.
    tensors = {name: t.detach().to(device="cpu", dtype=dtype).contiguous() for name, t in hf_sd.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp / HF_GENERATION_CONFIG).write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_hf(tmp)  # tokenizer.json, tokenizer_config.json, special_tokens_map.json

    return atomic_dir_write(out_dir, write)


__all__ = [
    "GPT2_NAMES", "IGNORED_HF_KEYS", "LLAMA_NAMES", "SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf",
    "export_hf", "from_hf_model", "has_hf_tokenizer", "hf_architecture", "load_hf_dir", "read_hf_weights",
    "rename_parameter", "state_dict_from_hf", "state_dict_to_hf", "to_hf_model",
]
