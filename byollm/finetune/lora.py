"""LoRA and DoRA, written out: low-rank adapters on a frozen model, merged or not, saved in PEFT's format.

LoRA (Hu et al., 2021) freezes a linear layer's weight W [out, in] and learns a low-rank update instead:

    y = W x + b + (alpha / r) * B (A dropout(x)),      A: [r, in], B: [out, r]

A starts Kaiming-uniform (as PEFT does), B starts at zero, so training starts exactly at the base model. Only A
and B are trained: r * (in + out) numbers instead of in * out. Merging folds the update into the weight,
W <- W + (alpha / r) B A, so inference costs nothing extra; unmerging subtracts it again.

DoRA (Liu et al., 2024) splits the adapted weight W' = W + (alpha / r) B A into a direction and a magnitude:
each output row of W' is rescaled to a learned length m (one number per output feature, initialised to the
row norms ||W'||, so training again starts at the base model):

    y = m / ||W'|| * (W' x) + b

As in the paper (section 4.3) and PEFT, ||W'|| is treated as a constant in backpropagation (detached).

Adapters are saved the way PEFT saves them (`adapter_config.json` + `adapter_model.safetensors`, keys named
after the Hugging Face model that `byollm.interop.hf.export_hf` writes), so `peft.PeftModel.from_pretrained`
loads ours and we load PEFT's. Only Llama-style models (llama, mistral, qwen2) are supported for that: in
Hugging Face's GPT-2, q, k and v are one fused `Conv1D` (`c_attn`, transposed weights), so our separate
q/k/v adapters have no PEFT equivalent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from byollm.errors import ByollmError, CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (and, with `use_dora`, a trainable magnitude).

    The base layer's `weight` and `bias` are kept under their own names, so a model's state dict keeps every
    base key (`...q_proj.weight`) and gains `...q_proj.lora_A`, `...q_proj.lora_B` (and `...lora_magnitude`).
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_dora: bool = False) -> None:
        super().__init__()
        if r < 1:
            raise ByollmError(f"LoRA rank r={r} must be at least 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear and PEFT use
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora = use_dora
        self.lora_magnitude = nn.Parameter(self.weight_norm()) if use_dora else None
        self.merged = False
        self._dora_factor: torch.Tensor | None = None  # m / ||W'|| at merge time, to unmerge exactly

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update (alpha / r) B A, shaped like the weight."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def weight_norm(self) -> torch.Tensor:
        """||W + (alpha / r) B A|| for each output row (PEFT's `get_weight_norm`), detached: a constant for autograd."""
        with torch.no_grad():
            return torch.linalg.norm(self.weight + self.delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)
        if self.merged:
            return result
        dropped = self.dropout(x)
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B) * self.scaling
        if not self.use_dora:
            return result + lora
        # m / ||W'|| * (W' x) = W x + (factor - 1) * W x + factor * lora, written as PEFT does so that dropout
        # (applied to the LoRA branch only) gives the same numbers.
        factor = self.lora_magnitude / self.weight_norm()
        base = F.linear(dropped, self.weight) if not isinstance(self.dropout, nn.Identity) else (
            result if self.bias is None else result - self.bias)
        return result + (factor - 1) * base + factor * lora

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the weight: W <- W + (alpha / r) B A (DoRA: W <- m / ||W'|| * W')."""
        if self.merged:
            return
        if self.use_dora:
            self._dora_factor = (self.lora_magnitude / self.weight_norm()).unsqueeze(1)
            self.weight.copy_(self._dora_factor * (self.weight + self.delta_weight()))
        else:
            self.weight.add_(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: the base weight again (to floating-point rounding)."""
        if not self.merged:
            return
        if self.use_dora:
            self.weight.copy_(self.weight / self._dora_factor - self.delta_weight())
            self._dora_factor = None
        else:
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dora={self.use_dora}, merged={self.merged}")


# --------------------------------------------------------------------------------------------------
# Putting adapters on a model
# --------------------------------------------------------------------------------------------------

Targets = str | Iterable[str]


def _selects(name: str, targets: Targets) -> bool:
    """PEFT's rule: a list names module suffixes ("q_proj" hits "blocks.0.attn.q_proj"); a string is a regex
    the whole name must match; "all-linear" is every linear layer except the output head."""
    if isinstance(targets, str):
        if targets == "all-linear":
            return name != "lm_head"
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Targets = ATTENTION, use_dora: bool = False) -> nn.Module:
    """Wrap the chosen linear layers of `model` in `LoRALinear`, in place, and freeze everything else.

    `targets`: module-name suffixes (default: attention q/k/v/o; `ATTENTION + MLP` for both), "all-linear",
    or a regular expression matched against the full module name (e.g. r"blocks\\.[01]\\.attn\\.q_proj")."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ByollmError("the model already has LoRA adapters; merge_and_unload it first or load a fresh model")
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and _selects(name, targets)]
    if not chosen:
        raise ByollmError(f"no linear layer of the model matches targets={targets!r}; its linear layers are named "
                          f"like {next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), '?')!r}")
    tok_emb = getattr(model, "tok_emb", None)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, linear in chosen:
        if tok_emb is not None and linear.weight is tok_emb.weight:
            raise ByollmError(f"cannot put LoRA on {name}: its weight is tied to the token embeddings, so merging "
                              "would change the embeddings too; leave lm_head out of targets")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(linear, r, alpha, dropout, use_dora))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared (tied) tensor counts once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def merge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain `nn.Linear` layers back: the model is a normal model again."""
    for name, m in lora_modules(model).items():
        m.merge()
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


# --------------------------------------------------------------------------------------------------
# PEFT format
# --------------------------------------------------------------------------------------------------


def _llama_only(model: nn.Module) -> str:
    from byollm.interop.hf import hf_architecture

    arch = hf_architecture(model.config)
    if arch == "gpt2":
        raise CheckpointError("PEFT-format adapters need a Llama-style model (llama, mistral, qwen2): Hugging Face's "
                              "GPT-2 fuses q, k and v into one Conv1D (c_attn, weights stored transposed), so "
                              "byollm's separate q_proj/k_proj/v_proj adapters have no PEFT equivalent")
    return arch


def _hf_module(name: str) -> str:
    from byollm.interop.hf import LLAMA_NAMES
    from byollm.interop.hf import rename_parameter as _rename

    hf = _rename(name + ".weight", LLAMA_NAMES, to_hf=True)
    if hf is None:  # pragma: no cover - every linear layer of a Llama-style GPT has a row in the table
        raise CheckpointError(f"module {name} has no Hugging Face equivalent")
    return hf.removesuffix(".weight")


_HF_CLASSES = {"llama": ("LlamaForCausalLM", "MistralForCausalLM"), "qwen2": ("Qwen2ForCausalLM",)}


def save_adapter(model: nn.Module, out_dir: str | Path) -> Path:
    """Write the model's adapters (LoRA/DoRA, or QLoRA's on 4-bit layers) as a PEFT adapter directory
    (atomically); `PeftModel.from_pretrained` on the model exported with `export_hf`/`to_hf_model` loads it."""
    from byollm.atomic import atomic_dir_write
    from byollm.finetune.nf4 import QLoRALinear

    arch = _llama_only(model)
    modules: dict[str, Any] = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear | QLoRALinear)}
    if not modules:
        raise ByollmError("the model has no LoRA adapters to save; apply_lora first")
    if any(m.merged for m in modules.values()):
        raise ByollmError("the adapters are merged into the weights; unmerge_lora before saving them")
    first = next(iter(modules.values()))
    for name, m in modules.items():
        if (m.r, m.alpha, m.use_dora) != (first.r, first.alpha, first.use_dora):
            raise ByollmError(f"{name} has r={m.r}, alpha={m.alpha}, dora={m.use_dora} but other adapters "
                              f"r={first.r}, alpha={first.alpha}, dora={first.use_dora}; PEFT files need one setting")
    hf_names = {name: _hf_module(name) for name in modules}
    # Name targets by suffix (PEFT's usual "q_proj") when that selects exactly these modules, else in full.
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in modules})
    by_suffix = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | LoRALinear | QLoRALinear)
                and _selects(n, suffixes)}
    target_modules = suffixes if by_suffix == set(modules) else sorted(hf_names.values())
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": target_modules,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": first.use_dora,
        "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "auto_mapping": {"base_model_class": _HF_CLASSES[arch][0],
                         "parent_library": f"transformers.models.{arch}.modeling_{arch}"},
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        key = PEFT_PREFIX + hf_names[name]
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach()
        if m.use_dora:
            tensors[f"{key}.lora_magnitude_vector"] = m.lora_magnitude.detach()
    tensors = {k: t.to("cpu").contiguous() for k, t in tensors.items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return atomic_dir_write(out_dir, write)


def _read_adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (path / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"'{path}' is not a LoRA adapter directory: it has no {ADAPTER_CONFIG}")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"'{path}' has no {ADAPTER_WEIGHTS} (adapters in pytorch .bin form are not supported; "
                              "re-save with safe_serialization=True)")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG} is not valid JSON ({e})") from e
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except Exception as e:  # safetensors raises assorted types for truncated files
        raise CheckpointError(f"cannot read {path / ADAPTER_WEIGHTS}: {e}") from e
    return config, tensors


def _check_config(config: dict[str, Any], arch: str, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path} is a {config['peft_type']} adapter; byollm loads LoRA/DoRA adapters only")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class not in _HF_CLASSES[arch]:
        raise CheckpointError(f"the adapter in {path} was made for a {base_class} but the model is a {arch} model "
                              f"({_HF_CLASSES[arch][0]}); load it onto the base model it was trained on")
    unsupported = {"bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}
    for key, needed in unsupported.items():
        value = config.get(key)
        if value is not None and value != needed and value not in ([], {}):
            raise CheckpointError(f"the adapter in {path} uses {key}={value!r}, which byollm does not support "
                                  f"(it needs {key}={needed!r})")


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Put the adapters of a PEFT adapter directory (ours or PEFT's) on `model`, in place; the base model must be
    the one the adapter was trained for, else CheckpointError names what does not fit."""
    path = Path(adapter_dir)
    arch = _llama_only(model)
    config, tensors = _read_adapter(path)
    _check_config(config, arch, path)
    # Group the file's tensors by the Hugging Face module they adapt.
    found: dict[str, dict[str, torch.Tensor]] = {}
    pattern = re.compile(r"(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector"
                         r"(?:\.weight)?)$")
    for key, tensor in tensors.items():
        match = pattern.fullmatch(key)
        if match is None:
            raise CheckpointError(f"the adapter in {path} has a tensor '{key}' that is not a LoRA A/B matrix or DoRA "
                                  "magnitude; byollm cannot load it")
        found.setdefault(match.group(1), {})[match.group(2).split(".")[0]] = tensor
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    by_hf = {_hf_module(n): n for n in linears}
    n_layer = getattr(model.config, "n_layer", "?")
    for hf_name in found:
        if hf_name not in by_hf:
            raise CheckpointError(f"the adapter in {path} adapts '{hf_name}', which this {arch} model (n_layer="
                                  f"{n_layer}) does not have: it was made for a different architecture or depth")
    targets = config.get("target_modules") or []
    expected = {hf for hf, ours in by_hf.items()
                if (_selects(hf, "all-linear") if targets == "all-linear" else _selects(hf, targets))}
    missing = sorted(expected - set(found), key=_natural)
    if missing:
        raise CheckpointError(f"the adapter in {path} has no weights for {missing[0]} (and {len(missing) - 1} more) "
                              f"of this {arch} model (n_layer={n_layer}): it was made for a model with fewer layers "
                              "or other target modules")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    use_dora = bool(config.get("use_dora", False))
    names = {by_hf[hf] for hf in found}
    apply_lora(model, r, alpha, float(config.get("lora_dropout", 0.0)),
               targets="|".join(re.escape(n) for n in sorted(names)), use_dora=use_dora)
    modules = lora_modules(model)
    with torch.no_grad():
        for hf_name, parts in found.items():
            name = by_hf[hf_name]
            m = modules[name]
            wanted = {"lora_A": (r, m.in_features), "lora_B": (m.out_features, r)}
            if use_dora:
                wanted["lora_magnitude_vector"] = (m.out_features,)
            if set(parts) != set(wanted):
                raise CheckpointError(f"the adapter in {path} has {sorted(parts)} for {hf_name}, expected "
                                      f"{sorted(wanted)} (use_dora={use_dora})")
            for part, shape in wanted.items():
                if tuple(parts[part].shape) != shape:
                    raise CheckpointError(
                        f"the adapter in {path} does not fit this model: {hf_name}.{part} has shape "
                        f"{tuple(parts[part].shape)} but {name} needs {shape} (in_features={m.in_features}, "
                        f"out_features={m.out_features}, r={r}); was it trained on a model with another n_embd?")
            m.lora_A.copy_(parts["lora_A"])
            m.lora_B.copy_(parts["lora_B"])
            if use_dora:
                m.lora_magnitude.copy_(parts["lora_magnitude_vector"])
    return model


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ATTENTION", "MLP", "LoRALinear", "apply_lora", "load_adapter",
    "lora_modules", "merge_and_unload", "merge_lora", "save_adapter", "trainable_parameters", "unmerge_lora",
]
