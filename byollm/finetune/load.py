"""Load a checkpoint straight into NF4, one tensor at a time: the full-precision model never exists in memory.

`quantize_model(load_checkpoint(path).model)` first builds the whole fp32 model and then quantises it, so its
peak is the fp32 model. `load_quantized` instead builds the model on the meta device (no memory), then reads the
weights file tensor by tensor (`SafetensorsReader`: plain reads, no memory map): each target linear weight is
quantised to NF4 as soon as it is read and its fp32 copy dropped; every other parameter (embeddings, norms, the
LM head) is loaded as is. `quant_type="q4_1"` stores the weights in llama.cpp's Q4_1 instead (`q4.py`).
The peak is the NF4 model plus the non-target weights plus one fp32 matrix. The result is the same model, bit for
bit, as `quantize_model(load_checkpoint(path).model, targets)` (tested).

Works for byollm checkpoints (or run folders) and for Llama-style Hugging Face directories (llama, mistral, qwen2;
`model.safetensors` or its sharded form), whose tensors are renamed one by one. A Hugging Face GPT-2 directory
(fused, transposed q/k/v) or one with pytorch .bin weights is loaded whole and then quantised, with a note.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from byollm.checkpoint import CONFIG, TOKENIZER_DIR, WEIGHTS, Loaded, load_checkpoint, resolve_checkpoint
from byollm.errors import ByollmError, CheckpointError
from byollm.finetune.nf4 import DEFAULT_TARGETS, NF4Linear, quantize_model
from byollm.finetune.q4 import Q4_1Linear
from byollm.model import GPT, ModelConfig
from byollm.tokenizer import load_tokenizer

QUANT_TYPES = ("nf4", "q4_1")  # the 4-bit formats of a QLoRA base: QLoRA's NormalFloat, llama.cpp's Q4_1

# safetensors dtype names -> torch dtypes (the ones a model checkpoint holds).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsReader:
    """Reads one tensor at a time from a .safetensors file with plain file reads.

    Why not `safetensors.safe_open`: its tensors are views of a memory map of the whole file, and every page
    read through a map stays in this process's resident memory while any tensor from it lives (a kept
    embedding keeps the map, and with it the fp32 weights we already quantised). Reading into a fresh tensor
    leaves the file in the page cache only. The format: 8 bytes (little-endian header length), a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the end of the header), the data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by __exit__/close
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(n))
        except (struct.error, ValueError) as e:
            self._file.close()
            raise CheckpointError(f"cannot read {self.path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self._entries, self._data_start = header, 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def get_tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which byollm cannot load")
        begin, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=dtype)
        raw = t.view(-1).view(torch.uint8).numpy() if t.numel() else None  # the tensor's own bytes, writable
        if raw is None or raw.nbytes != end - begin:
            if t.numel() == 0 and end == begin:
                return t
            raise CheckpointError(f"{self.path}: tensor {name} is {end - begin} bytes on disk, expected "
                                  f"{t.numel() * t.element_size()}; the file is damaged")
        self._file.seek(self._data_start + begin)
        if self._file.readinto(raw) != raw.nbytes:
            raise CheckpointError(f"{self.path} ends inside tensor {name}: the file is truncated")
        return t

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _our_source(ckpt: Path, stack: ExitStack) -> tuple[ModelConfig, dict[str, Callable[[], torch.Tensor]]]:
    config = ModelConfig.load(ckpt / CONFIG)
    f = stack.enter_context(SafetensorsReader(ckpt / WEIGHTS))
    getters = {k: (lambda k=k: f.get_tensor(k)) for k in f.keys()}
    if config.tie_embeddings and "tok_emb.weight" not in getters and "lm_head.weight" in getters:
        getters["tok_emb.weight"] = getters["lm_head.weight"]  # save_model kept the shared tensor under this name
    if config.tie_embeddings:
        getters.pop("lm_head.weight", None)
    return config, getters


def _hf_source(path: Path, stack: ExitStack) -> tuple[ModelConfig, dict[str, Callable[[], torch.Tensor]]] | None:
    """Our names -> lazy readers for a Llama-style HF directory with safetensors weights; None if not that."""
    from byollm.interop.hf import (
        HF_CONFIG,
        HF_WEIGHTS,
        HF_WEIGHTS_INDEX,
        LLAMA_NAMES,
        config_from_hf,
        hf_architecture,
    )
    from byollm.interop.hf import IGNORED_HF_KEYS as _IGNORED_HF_KEYS
    from byollm.interop.hf import rename_parameter as _rename

    config = config_from_hf(json.loads((path / HF_CONFIG).read_text()))
    if hf_architecture(config) == "gpt2":
        return None
    if (path / HF_WEIGHTS).is_file():
        files = [path / HF_WEIGHTS]
    elif (path / HF_WEIGHTS_INDEX).is_file():
        weight_map = json.loads((path / HF_WEIGHTS_INDEX).read_text())["weight_map"]
        files = [path / n for n in sorted(set(weight_map.values()))]
    else:
        return None
    getters: dict[str, Callable[[], torch.Tensor]] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weight shard {file} is missing; download all files listed in the index")
        f = stack.enter_context(SafetensorsReader(file))
        for key in f.keys():
            if _IGNORED_HF_KEYS.search(key):
                continue
            hf_key = key if key.startswith(("model.", "lm_head.")) else "model." + key
            ours = _rename(hf_key, LLAMA_NAMES, to_hf=False)
            if ours is None:
                raise CheckpointError(f"unexpected weight '{key}' in the Hugging Face checkpoint {path}: byollm has "
                                      "no parameter for it; is config.json from the same model as the weights?")
            getters[ours] = lambda f=f, key=key: f.get_tensor(key)
    if config.tie_embeddings:
        getters.pop("lm_head.weight", None)
    return config, getters


@torch.no_grad()
def load_quantized(path: str | Path, targets: Iterable[str] = DEFAULT_TARGETS, *, double_quant: bool = True,
                   quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Loaded:
    """The model of any CKPT path with its target linear layers (name suffixes or regular expressions, as in
    `quantize_model`) as frozen 4-bit layers, materialised tensor by tensor from the weights file; all other
    parameters are loaded normally and frozen too. Returns a `Loaded` (model in eval mode, tokenizer).

    quant_type: "nf4" (`NF4Linear`, QLoRA's format) or "q4_1" (`Q4_1Linear`, llama.cpp's: for a model imported
    from a Q4_1 GGUF file these are exactly the file's 4-bit weights, see q4.py)."""
    if quant_type not in QUANT_TYPES:
        raise ByollmError(f"unknown 4-bit format {quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    kind, ckpt = resolve_checkpoint(path)
    with ExitStack() as stack:
        source = _our_source(ckpt, stack) if kind != "hf" else _hf_source(ckpt, stack)
        if source is None and quant_type != "nf4":
            raise ByollmError(f"{ckpt}: the {quant_type} format reads byollm checkpoints and Llama-style safetensors "
                              "Hugging Face directories; use lora.quant_type nf4 for this model")
        if source is None:
            print(f"[byollm] {ckpt}: GPT-2 or .bin Hugging Face weights are loaded whole, then quantised",
                  file=sys.stderr)
            loaded = load_checkpoint(ckpt, device=device)
            quantize_model(loaded.model, targets, double_quant=double_quant, compute_dtype=compute_dtype)
            return loaded
        config, getters = source
        with torch.device("meta"):
            model = GPT(config)
        patterns = list(targets)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and any(n.split(".")[-1] == p or re.fullmatch(p, n) for p in patterns)]
        if not names:
            raise CheckpointError(f"no linear layer matches the targets {patterns}")
        expected = {k for k in model.state_dict() if not (config.tie_embeddings and k == "lm_head.weight")}
        missing, unexpected = sorted(expected - set(getters)), sorted(set(getters) - expected)
        if missing or unexpected:
            raise CheckpointError(f"weights in {ckpt} do not fit its config: missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]}; is config.json from the same model as the weights?")

        def read(name: str, like: torch.Tensor) -> torch.Tensor:
            t = getters[name]()
            if t.shape != like.shape:
                raise CheckpointError(f"weight {name} in {ckpt} has shape {tuple(t.shape)} but the config needs "
                                      f"{tuple(like.shape)}; is config.json from the same model?")
            return t.to(device=device, dtype=torch.float32 if t.is_floating_point() else t.dtype)

        for name in names:  # quantise each target weight as it is read; its fp32 copy is dropped right after
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            meta: nn.Linear = getattr(parent, child)
            linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
            linear.weight = nn.Parameter(read(name + ".weight", meta.weight), requires_grad=False)
            if meta.bias is not None:
                linear.bias = nn.Parameter(read(name + ".bias", meta.bias), requires_grad=False)
            setattr(parent, child, Q4_1Linear.from_linear(linear, compute_dtype=compute_dtype) if quant_type == "q4_1"
                    else NF4Linear.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype))
            del linear
        for name, param in list(model.named_parameters()):
            if param.device.type != "meta" or (config.tie_embeddings and name == "lm_head.weight"):
                continue
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, leaf, nn.Parameter(read(name, param), requires_grad=False))
        for name, buf in list(model.named_buffers()):
            if buf.device.type == "meta":
                module_name, _, leaf = name.rpartition(".")
                module = model.get_submodule(module_name) if module_name else model
                module._buffers[leaf] = torch.empty_like(buf, device=device)
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        model.init_buffers()
    tokenizer = None
    if kind == "hf":
        from byollm.interop.hf import has_hf_tokenizer

        tokenizer = load_tokenizer(ckpt) if has_hf_tokenizer(ckpt) else None
    elif (ckpt / TOKENIZER_DIR).is_dir():
        tokenizer = load_tokenizer(ckpt / TOKENIZER_DIR)
    return Loaded(model.eval(), tokenizer, ckpt, kind)


__all__ = ["QUANT_TYPES", "load_quantized"]
