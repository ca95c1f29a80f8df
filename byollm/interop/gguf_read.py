"""Import a GGUF file (llama.cpp's format) as a byollm checkpoint: the exporter (`byollm.interop.gguf`) backwards.

    convert_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "out/smollm2")   # `byollm convert from-gguf FILE CKPT`

It reads with the `gguf` library (llama.cpp's own Python package) and uses the exporter's tables, so the two
directions cannot drift apart:

1. Metadata -> ModelConfig. `GGUF_HPARAMS` pairs each `llama.*` hyper-parameter with its ModelConfig field; the
   key each one has in the file is asked of `gguf.GGUFWriter` itself (`hparam_key`). The `llama` architecture is
   always RoPE + RMSNorm + SwiGLU without biases; the embeddings are tied when there is no `output` tensor.
2. Tensors -> our state dict. GGUF lists a tensor's dimensions fastest-varying first (ggml's ne[0] is the length
   of a row), the reverse of torch's order, so a Linear's (out, in) matrix is stored as [in, out]. Quantised
   tensors (Q8_0, Q4_1, Q4_K, ...) are blocks of small integers with a scale each; `gguf.quants.dequantize`
   turns them into fp32 (the library's definition of each format). Names go back through `GGUF_NAMES`, and
   each head's q/k rows back from llama.cpp's adjacent RoPE pairs to our rotate-half layout (`unpermute_rope`,
   the inverse of `permute_rope`).
3. Tokenizer metadata (`tokenizer.ggml.*`) -> a `tokenizers.Tokenizer`: byte-level BPE with the file's tokens
   and merges, the pre-tokenizer that splits text as llama.cpp does for the file's `pre` name
   (`PRE_TOKENIZERS`), CONTROL tokens as special added tokens and USER_DEFINED ones as plain added tokens, the
   bos/eos/pad roles, and the chat template (`tokenizer.chat_template`) kept for tokenizer_config.json.

The weights of a quantised file come back exactly as llama.cpp's dequantisation defines them, in fp32: the
model is the quantised model, not the original one it was quantised from.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from byollm.errors import CheckpointError, TokenizerError, require
from byollm.interop.gguf import GGUF_HPARAMS, GGUF_NAMES, PRE_TOKENIZERS
from byollm.model import GPT, ModelConfig, build_model

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from byollm.tokenizer.fast import FastTokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
# Tensor types read (dequantised to fp32); others are refused by name. Extend with care: each one needs a test.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TOKENIZER_MODELS = ("gpt2",)  # llama.cpp's name for byte-level BPE


# --------------------------------------------------------------------------------------------------
# The file and its metadata
# --------------------------------------------------------------------------------------------------


def open_gguf(path: str | Path) -> Any:
    """A `gguf.GGUFReader` on `path` (memory-mapped: tensors are read when used)."""
    gguf = require("gguf", "gguf")
    path = Path(path)
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"no GGUF file at '{path}': the path {where} (give a .gguf file, e.g. one from "
                              "`byollm export gguf` or a llama.cpp model download)")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as e:  # bad magic, unknown version, truncated file
        raise CheckpointError(f"cannot read '{path}' as GGUF: {e}") from e


def read_field(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata `key` (a number, string, bool or list), or `default` when the file lacks it."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class _KeyRecorder:
    """Stands in for a GGUFWriter: records the key an `add_<hparam>` method would write."""

    def __init__(self, arch: str) -> None:
        self.arch, self.keys = arch, []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("add_"):
            raise AttributeError(name)
        return lambda key, *args, **kwargs: self.keys.append(key)


class _Value(int):
    """A dummy value for the recorder: an int that also has the `.value` of an enum (add_rope_scaling_type)."""

    value = "none"


def hparam_key(name: str, arch: str = "llama") -> str:
    """The metadata key `GGUFWriter.add_<name>` writes, e.g. "head_count" -> "llama.attention.head_count"."""
    gguf = require("gguf", "gguf")
    recorder = _KeyRecorder(arch)
    getattr(gguf.GGUFWriter, f"add_{name}")(recorder, _Value(0))
    return recorder.keys[0]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Checks, then the config
# --------------------------------------------------------------------------------------------------


def check_importable(reader: Any, path: str | Path = "the file") -> str:
    """Raise CheckpointError unless byollm models the file's architecture and can read all its tensor types.

    Runs before anything slow, so a file we cannot import fails in a second. Returns the architecture."""
    arch = read_field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"cannot import GGUF architecture {arch!r} from {path}; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, SmolLM and other Llama-style files); for "
                              "others convert the original Hugging Face model with `byollm convert from-hf`")
    if int(read_field(reader, hparam_key("expert_count", arch), 0) or 0) > 0:
        raise CheckpointError(f"cannot import {path}: it is a mixture-of-experts model "
                              f"({read_field(reader, hparam_key('expert_count', arch))} experts), which byollm does "
                              "not model")
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"cannot import {path}: tensor '{t.name}' is stored as {t.tensor_type.name}, a "
                                  f"type byollm does not dequantise (supported: {', '.join(SUPPORTED_TYPES)}); "
                                  "requantise with llama.cpp's llama-quantize, e.g. to Q8_0 or Q4_K_M")
    return arch


def config_from_gguf(reader: Any) -> ModelConfig:
    """The ModelConfig a `llama` GGUF file describes (call `check_importable` first)."""
    arch = read_field(reader, "general.architecture")
    values: dict[str, Any] = {}
    for name, field in GGUF_HPARAMS:
        value = read_field(reader, hparam_key(name, arch))
        if value is None:
            continue
        if field in values and values[field] != value:  # key_length / value_length / rope_dimension_count
            raise CheckpointError(f"cannot import this GGUF file: {hparam_key(name, arch)}={value} differs from the "
                                  f"head size {values[field]}; byollm needs key, value and RoPE widths equal "
                                  "(no partial rotary embeddings)")
        values[field] = value
    for needed in ("embedding_length", "block_count", "head_count"):
        if read_field(reader, hparam_key(needed, arch)) is None:
            raise CheckpointError(f"cannot import this GGUF file: it has no {hparam_key(needed, arch)}")
    if "vocab_size" not in values:
        values["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    if "block_size" not in values:
        values["block_size"] = 2048
    natural = int(values["n_embd"]) // int(values["n_head"])
    if read_field(reader, hparam_key("key_length", arch)) is None and values.get("head_dim", natural) != natural:
        raise CheckpointError(f"cannot import this GGUF file: RoPE covers {values['head_dim']} of each head's "
                              f"{natural} channels (partial rotary embeddings), which byollm does not model")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise CheckpointError("cannot import this GGUF file: it scales RoPE with a `rope_freqs` tensor (Llama 3.1's "
                              "scheme), which byollm cannot recover from the file; convert the Hugging Face model "
                              "with `byollm convert from-hf` instead")
    scaling = None
    kind = read_field(reader, hparam_key("rope_scaling_type", arch), "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": float(read_field(reader, hparam_key("rope_scaling_factor", arch)))}
    elif kind not in ("none", None):
        raise CheckpointError(f"cannot import this GGUF file: RoPE scaling {kind!r} is not supported (none, linear)")
    values.update(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_scaling=scaling,
                  tie_embeddings="output.weight" not in names)
    for key in ("block_size", "n_embd", "n_layer", "n_head", "n_kv_head", "head_dim", "intermediate_size",
                "vocab_size"):
        if values.get(key) is not None:
            values[key] = int(values[key])
    for key in ("rope_theta", "norm_eps"):
        if key in values:  # float32 in the file (1e-5 reads back as 9.99999974738e-06): the shortest decimal
            values[key] = float(str(np.float32(values[key])))  # that is the same float32, 1e-05
    return ModelConfig.from_dict(values)


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def unpermute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rope`: each head's rows from adjacent RoPE pairs (2i, 2i + 1) back to rotate-half
    pairs (i, i + D/2). Row h*D + s*D/2 + i of the result is row h*D + 2i + s of the input."""
    rows = weight.shape[0]
    d = rows // n_heads
    return weight.reshape(n_heads, d // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def our_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> ours ("blk.3.attn_q.weight" -> "blocks.3.attn.q_proj.weight")."""
    module, _, param = gguf_name.rpartition(".")
    for ours, theirs in GGUF_NAMES:
        match = re.fullmatch(re.escape(theirs).replace(r"\{i\}", r"(\d+)"), module)
        if match:
            return (ours.replace("{i}", match.group(1)) if match.groups() else ours) + "." + param
    raise CheckpointError(f"GGUF tensor '{gguf_name}' has no byollm equivalent (a `llama` file has token_embd, "
                          "blk.N.attn_*/ffn_*, output_norm and output)")


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    """One `gguf.ReaderTensor` as an fp32 torch tensor in torch's dimension order."""
    gguf = require("gguf", "gguf")
    if tensor.tensor_type.name not in SUPPORTED_TYPES:
        raise CheckpointError(f"tensor '{tensor.name}' is stored as {tensor.tensor_type.name}, a type byollm does "
                              f"not dequantise (supported: {', '.join(SUPPORTED_TYPES)})")
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # ne[0] (the row length) comes first in GGUF
    values = np.array(values, dtype=np.float32, copy=not values.flags.writeable or values.dtype != np.float32)
    return torch.from_numpy(values.reshape(shape))


def state_dict_from_gguf(reader: Any, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names -> fp32 tensors, q/k rows back in the rotate-half layout."""
    out: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = our_name(tensor.name)
        t = dequantize_tensor(tensor)
        if ".attn.q_proj." in name:
            t = unpermute_rope(t, config.n_head)
        elif ".attn.k_proj." in name:
            t = unpermute_rope(t, config.n_kv_head)
        out[name] = t
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def tokenizer_from_gguf(reader: Any) -> FastTokenizer:
    """The file's tokenizer (`tokenizer.ggml.*`) as a FastTokenizer that encodes and decodes as llama.cpp does."""
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as HFTokenizer

    from byollm.tokenizer.fast import FastTokenizer

    gguf = require("gguf", "gguf")
    kind = read_field(reader, "tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZER_MODELS:
        raise TokenizerError(f"cannot import a GGUF tokenizer of type {kind!r}: byollm reads byte-level BPE "
                             f"({', '.join(SUPPORTED_TOKENIZER_MODELS)}) only (not SentencePiece 'llama' vocabularies)")
    pre = read_field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise TokenizerError(f"cannot import a GGUF tokenizer with pre-tokenizer {pre!r}: byollm knows how llama.cpp "
                             f"splits text for {', '.join(PRE_TOKENIZERS)} only")
    tokens: list[str] = read_field(reader, "tokenizer.ggml.tokens")
    types: list[int] = read_field(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in read_field(reader, "tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        twice = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise TokenizerError(f"cannot import this GGUF tokenizer: the token {twice!r} is listed twice")

    hf = HFTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    spec = json.loads(hf.to_str())
    spec["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.decoder = decoders.ByteLevel()
    special = (int(gguf.TokenType.CONTROL), int(gguf.TokenType.UNKNOWN))
    added = [AddedToken(tokens[i], special=types[i] in special, normalized=False) for i in range(len(tokens))
             if types[i] in (*special, int(gguf.TokenType.USER_DEFINED))]
    hf.add_tokens(added)  # the tokens are in the vocabulary already: they keep their ids

    def token(role: str) -> str | None:
        i = read_field(reader, f"tokenizer.ggml.{role}_token_id")
        return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

    roles = {"bos": token("bos"), "eos": token("eos"), "pad": token("padding")}
    adds = {r: bool(read_field(reader, f"tokenizer.ggml.add_{r}_token", False)) and roles[r] is not None
            for r in ("bos", "eos")}
    if any(adds.values()):  # llama.cpp adds them when told to: so does transformers with add_special_tokens=True
        ends = [roles[r] for r in ("bos", "eos") if adds[r]]
        hf.post_processor = processors.TemplateProcessing(
            single=" ".join([*([roles["bos"]] if adds["bos"] else []), "$A", *([roles["eos"]] if adds["eos"] else [])]),
            special_tokens=[(t, vocab[t]) for t in ends])
    fast = FastTokenizer(hf, roles=roles)
    # tokenizer_config.json keeps the chat template (Jinja, as transformers' apply_chat_template reads it).
    template = read_field(reader, "tokenizer.chat_template")
    fast.hf_config = {"chat_template": template} if template else {}
    # The end of a chat turn (ChatML's <|im_end|>): generation of a reply stops there (tokenizer.chat_format).
    if (eot := token("eot")) is not None:
        fast.hf_config["eot_token"] = eot
    return fast


# --------------------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------------------


def gguf_info(reader: Any) -> dict[str, Any]:
    """What the checkpoint's meta.json records about the file it came from."""
    keys = {"name": "general.name", "license": "general.license", "file_type": "general.file_type",
            "pre_tokenizer": "tokenizer.ggml.pre", "eot_token_id": "tokenizer.ggml.eot_token_id"}
    info = {short: read_field(reader, key) for short, key in keys.items() if key in reader.fields}
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {**info, "tensor_types": types}


def load_gguf(path: str | Path) -> tuple[GPT, FastTokenizer, dict[str, Any]]:
    """Our model (fp32, eval mode), its tokenizer and a description of the file, from one GGUF file."""
    reader = open_gguf(path)
    arch = check_importable(reader, path)
    config = config_from_gguf(reader)
    tokenizer = tokenizer_from_gguf(reader)
    model = build_model(config, state_dict_from_gguf(reader, config)).eval()
    return model, tokenizer, {"architecture": arch, **gguf_info(reader)}


def convert_from_gguf(gguf_path: str | Path, ckpt_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """`byollm convert from-gguf FILE CKPT`: one GGUF file -> a byollm checkpoint directory (written atomically).

    meta.json records the source file, its sha256 and what the file said about itself; `meta` adds entries."""
    from byollm.checkpoint import save_checkpoint

    model, tokenizer, info = load_gguf(gguf_path)
    source = Path(gguf_path).resolve()
    record = {"source": str(source), "sha256": sha256_file(source), "converted_from": f"gguf/{info['architecture']}",
              "gguf": info, **(meta or {})}
    return save_checkpoint(model, ckpt_dir, tokenizer, meta=record)


__all__ = ["SUPPORTED_ARCHITECTURES", "SUPPORTED_TYPES", "check_importable", "config_from_gguf", "convert_from_gguf",
           "dequantize_tensor", "gguf_info", "hparam_key", "load_gguf", "open_gguf", "our_name", "read_field",
           "sha256_file", "state_dict_from_gguf", "tokenizer_from_gguf", "unpermute_rope"]
