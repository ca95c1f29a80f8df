"""Model configuration: one dataclass that describes every architecture the guide builds.

GPT-2 and Llama are the same Transformer with different choices for five building blocks
(positions, normalisation, MLP, attention heads, biases). Each choice is one field here, so a
preset is just a set of values, and a Hugging Face config converts to ours field by field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import textwrap
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints  # noqa: UP035

from byollm.errors import ConfigError


@dataclass
class ModelConfig:
    """The shape of a network: every choice that makes GPT-2, Llama, Mistral, Qwen2 or SmolLM."""

    vocab_size: int = 50257
    """token ids the embedding and the LM head cover"""
    block_size: int = 1024
    """longest sequence the model is built for (positions table / RoPE cache)"""
    n_layer: int = 12
    """Transformer blocks"""
    n_head: int = 12
    """attention (query) heads"""
    n_kv_head: int | None = None
    """key/value heads: None = n_head (multi-head); 1: multi-query; in between: grouped-query"""
    n_embd: int = 768
    """width of the residual stream"""
    head_dim: int | None = None
    """width of one head; None: n_embd // n_head"""
    intermediate_size: int | None = None
    """MLP hidden width; None: 4 * n_embd"""
    pos_embedding: Literal["learned", "rope"] = "learned"
    """learned absolute positions (GPT-2) or rotary embeddings (Llama)"""
    rope_theta: float = 10000.0
    """RoPE base frequency"""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling: {"rope_type": "linear" | "llama3", "factor": ..., ...}; None: none"""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    """LayerNorm (GPT-2) or RMSNorm (Llama)"""
    norm_eps: float = 1e-5
    """epsilon of the norms"""
    mlp: Literal["gelu", "swiglu"] = "gelu"
    """GELU MLP (GPT-2) or gated SwiGLU (Llama)"""
    bias: bool = True
    """biases in linear layers and LayerNorm"""
    qkv_bias: bool | None = None
    """biases on q/k/v only; None: follow `bias` (Qwen2 has q/k/v biases but no others)"""
    tie_embeddings: bool = True
    """the LM head shares the token-embedding matrix"""
    dropout: float = 0.0
    """dropout on attention weights and residual branches while training"""
    attention: Literal["sdpa", "naive"] = "sdpa"
    """fused scaled_dot_product_attention, or the explicit teaching path"""
    init_std: float = 0.02
    """standard deviation of the weight initialisation"""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        for name, allowed in (
            ("pos_embedding", ("learned", "rope")),
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu")),
            ("attention", ("sdpa", "naive")),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise ConfigError(f"unknown model config key {', '.join(hints)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ---- the size dial -------------------------------------------------------------------------
    @classmethod
    def from_depth(
        cls, depth: int, arch: Literal["gpt2", "llama"] = "llama", vocab_size: int = 50257, block_size: int = 1024,
        **overrides: Any,
    ) -> ModelConfig:
        """One knob: depth sets everything else (width = 64 * depth, 64-dim heads), as in nanochat.

        Llama-style models get grouped-query attention with 4 query heads per key/value head where that
        divides, and a SwiGLU MLP whose hidden width keeps the parameter count of a 4x GELU MLP.
        """
        if depth < 1:
            raise ConfigError(f"depth must be >= 1, got {depth}")
        n_embd = 64 * depth
        n_head = depth
        base: dict[str, Any] = dict(vocab_size=vocab_size, block_size=block_size, n_layer=depth, n_head=n_head,
                                    n_embd=n_embd)
        if arch == "llama":
            base.update(_LLAMA_BLOCKS, n_kv_head=n_head // 4 if n_head % 4 == 0 else n_head,
                        intermediate_size=_swiglu_width(n_embd))
        elif arch != "gpt2":
            raise ConfigError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
        base.update(overrides)
        return cls.from_dict(base)


def _swiglu_width(n_embd: int, multiple_of: int = 64) -> int:
    # SwiGLU has three matrices instead of two; 8/3 * n_embd keeps the parameter count of a 4x MLP.
    width = int(8 * n_embd / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


_GPT2_BLOCKS: dict[str, Any] = dict(pos_embedding="learned", norm="layernorm", mlp="gelu", bias=True,
                                    tie_embeddings=True, norm_eps=1e-5)
_LLAMA_BLOCKS: dict[str, Any] = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                     tie_embeddings=True, norm_eps=1e-5)

# Named presets. GPT-2 sizes are OpenAI's; SmolLM2 shapes are HuggingFaceTB's (so a real SmolLM2
# checkpoint imports into exactly this config); the tiny ones are for tests and the CPU quickstart.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-124m": dict(_GPT2_BLOCKS, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "gpt2-350m": dict(_GPT2_BLOCKS, n_layer=24, n_head=16, n_embd=1024, vocab_size=50257, block_size=1024),
    "gpt2-774m": dict(_GPT2_BLOCKS, n_layer=36, n_head=20, n_embd=1280, vocab_size=50257, block_size=1024),
    "gpt2-1558m": dict(_GPT2_BLOCKS, n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024),
    "smollm2-135m": dict(_LLAMA_BLOCKS, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0),
    "smollm2-360m": dict(_LLAMA_BLOCKS, n_layer=32, n_head=15, n_kv_head=5, n_embd=960, intermediate_size=2560,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0),
    # Meta's Llama 3 8B shape (grouped-query attention, 128K vocab, untied head), for planning (`byollm plan`).
    "llama3-8b": dict(_LLAMA_BLOCKS, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336,
                      vocab_size=128256, block_size=8192, rope_theta=500000.0, tie_embeddings=False),
    "llama-40m": dict(_LLAMA_BLOCKS, n_layer=8, n_head=8, n_kv_head=2, n_embd=512, intermediate_size=1408,
                      vocab_size=32000, block_size=1024),
    "llama-13m": dict(_LLAMA_BLOCKS, n_layer=6, n_head=6, n_kv_head=2, n_embd=384, intermediate_size=1024,
                      vocab_size=8192, block_size=512),
    # nanoGPT's Shakespeare-on-a-CPU shape (4 layers, 4 heads, 128 wide, 64 context), char vocab.
    "gpt-nano": dict(_GPT2_BLOCKS, n_layer=4, n_head=4, n_embd=128, vocab_size=65, block_size=64),
    "llama-nano": dict(_LLAMA_BLOCKS, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=384,
                       vocab_size=65, block_size=64),
    # For unit tests: big enough to exercise every code path, small enough to run in milliseconds.
    "gpt-tiny": dict(_GPT2_BLOCKS, n_layer=2, n_head=4, n_embd=64, vocab_size=128, block_size=64),
    "llama-tiny": dict(_LLAMA_BLOCKS, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=160,
                       vocab_size=128, block_size=64, tie_embeddings=False),
}
PRESETS["gpt2"] = PRESETS["gpt2-124m"]


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, or `d<N>`/`llama-d<N>`/`gpt2-d<N>` for the depth dial; overrides win."""
    if name in PRESETS:
        return ModelConfig.from_dict({**PRESETS[name], **overrides})
    for prefix, arch in (("gpt2-d", "gpt2"), ("llama-d", "llama"), ("d", "llama")):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return ModelConfig.from_depth(int(name[len(prefix):]), arch=arch, **overrides)  # type: ignore[arg-type]
    close = difflib.get_close_matches(name, list(PRESETS), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown model preset '{name}'{hint}; choose one of {', '.join(sorted(PRESETS))} "
                      "or d<N>/gpt2-d<N> for the depth dial")


def list_presets() -> list[str]:
    return sorted(PRESETS)


# --------------------------------------------------------------------------------------------------
# Model choice: a preset plus optional per-field overrides, the `model:` section of every config file
# (`--model.preset gpt2-124m --model.n_layer 4` on the command line)
# --------------------------------------------------------------------------------------------------


def _optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
        return tp
    return Optional[tp]  # noqa: UP045 - a runtime type object for jsonargparse


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the string literal under it in the class body (its attribute docstring)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())  # type: ignore[union-attr]
    return docs


# Derived from ModelConfig so the two can never drift apart: every field becomes optional and None means
# "keep the preset's value".
ModelChoice = dataclasses.make_dataclass(
    "ModelChoice",
    [("preset", str, dataclasses.field(default="gpt-tiny"))]
    + [(name, _optional(tp), dataclasses.field(default=None)) for name, tp in get_type_hints(ModelConfig).items()],
)
ModelChoice.__doc__ = "A named preset (see `byollm model presets`) with any field of ModelConfig overridden.\n\n" \
    "Args:\n    preset: a preset name or the depth dial d<N> / gpt2-d<N> (see `byollm model presets`)\n" + "".join(
        f"    {name}: {text}; default: the preset's\n" for name, text in field_docs(ModelConfig).items())
ModelChoice.__module__ = __name__


def model_config_from(choice: Any, **defaults: Any) -> ModelConfig:
    """The ModelConfig a ModelChoice (or a namespace/dict with the same keys) stands for.

    `defaults` fill fields the choice leaves at None before the preset's own values would apply, e.g.
    `vocab_size=tokenizer.vocab_size`: an explicit override in the choice still wins."""
    if dataclasses.is_dataclass(choice):
        values = dataclasses.asdict(choice)
    else:
        values = dict(choice) if isinstance(choice, dict) else dict(vars(choice))
    name = values.pop("preset")
    overrides = {k: v for k, v in defaults.items() if v is not None}
    overrides.update({k: v for k, v in values.items() if v is not None})
    return preset(name, **overrides)


def model_choice_of(config: ModelConfig, preset_name: str) -> dict[str, Any]:
    """A ModelChoice dict that pins every field: what a run writes to its config.yaml."""
    return {"preset": preset_name, **config.to_dict()}


__all__ = ["ModelChoice", "ModelConfig", "PRESETS", "list_presets", "model_choice_of", "model_config_from", "preset"]
