"""Export to GGUF, the single-file format of llama.cpp (and Ollama, LM Studio, ...), with the tokenizer inside.

A GGUF file is a header of typed key/value metadata (architecture, sizes, RoPE, tokenizer) followed by named
tensors. Writing one is mostly renaming, as for Hugging Face (`byollm.interop.hf`), with two real changes:

1. RoPE layout. Our `apply_rope` (like transformers' Llama) rotates channel i together with channel i + D/2
   of each head ("rotate half", GPT-NeoX style). llama.cpp's `llama` architecture rotates adjacent channels
   (2i, 2i+1), as Meta's original Llama code did. Both rotate the pair by the same angle position * theta_i,
   so reordering each head's q and k output channels as (0, D/2, 1, D/2 + 1, ...) gives llama.cpp the very
   same attention scores (q . k does not change when both are permuted alike). That reordering is `permute_rope`,
   the same permutation llama.cpp's `convert_hf_to_gguf.py` applies to Hugging Face Llama checkpoints.
2. Tokenizer. Our byte-level BPE is GPT-2's algorithm, which llama.cpp calls the `gpt2` tokenizer model:
   tokens in their printable byte-level spelling, merges as "a b" strings, and a pre-tokenizer name
   (`gpt-2`: the GPT-2 split regex ours uses; `smollm`: digits split one by one first, as SmolLM's tokenizer
   does, see PRE_TOKENIZERS). Special tokens become CONTROL tokens (never produced from text unless asked
   for), bos/eos/pad ids and the chat template are written as metadata.

Weights are written in f32 or f16 (norm weights always f32, as llama.cpp expects). Quantise further with
llama.cpp's own `llama-quantize` tool.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from byollm.atomic import atomic_file_write
from byollm.errors import ByollmError, CheckpointError, TokenizerError, require
from byollm.model import GPT, ModelConfig
from byollm.model.model import rope_inverse_frequencies

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from byollm.tokenizer import Tokenizer

GGUFDtype = Literal["f32", "f16"]

# Our module -> llama.cpp's tensor name (`{i}`: layer), for the `llama` architecture.
GGUF_NAMES: list[tuple[str, str]] = [
    ("tok_emb",                  "token_embd"),
    ("blocks.{i}.norm_1",        "blk.{i}.attn_norm"),
    ("blocks.{i}.attn.q_proj",   "blk.{i}.attn_q"),
    ("blocks.{i}.attn.k_proj",   "blk.{i}.attn_k"),
    ("blocks.{i}.attn.v_proj",   "blk.{i}.attn_v"),
    ("blocks.{i}.attn.o_proj",   "blk.{i}.attn_output"),
    ("blocks.{i}.norm_2",        "blk.{i}.ffn_norm"),
    ("blocks.{i}.mlp.gate_proj", "blk.{i}.ffn_gate"),
    ("blocks.{i}.mlp.up_proj",   "blk.{i}.ffn_up"),
    ("blocks.{i}.mlp.down_proj", "blk.{i}.ffn_down"),
    ("norm_f",                   "output_norm"),
    ("lm_head",                  "output"),  # left out when tied: llama.cpp then reuses token_embd
]

# llama.cpp's hyper-parameters (key `llama.<name>` in the file, written by GGUFWriter.add_<name>) and the
# ModelConfig field each one is.
GGUF_HPARAMS: list[tuple[str, str]] = [
    ("vocab_size",           "vocab_size"),
    ("context_length",       "block_size"),
    ("embedding_length",     "n_embd"),
    ("block_count",          "n_layer"),
    ("feed_forward_length",  "intermediate_size"),
    ("head_count",           "n_head"),
    ("head_count_kv",        "n_kv_head"),
    ("key_length",           "head_dim"),
    ("value_length",         "head_dim"),
    ("rope_dimension_count", "head_dim"),
    ("rope_freq_base",       "rope_theta"),
    ("layer_norm_rms_eps",   "norm_eps"),
]

# The pre-tokenizer llama.cpp must use for our byte-level BPE (GPT-2's split regex).
GPT2_PRE_TOKENIZER = "gpt-2"

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) that byollm writes and reads, each as the `tokenizers`
# pre-tokenizer (its JSON form) that splits text into the same pieces. llama.cpp's src/llama-vocab.cpp gives each
# name its list of split regexes, applied one after the other:
#   gpt-2:  GPT-2's  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)  = ByteLevel(use_regex)
#   smollm: \p{N} (every digit a piece of its own), then GPT-2's             = Digits(individual) + ByteLevel
# (`smollm` shares its regexes with starcoder, refact, command-r, codeshell, exaone and minerva, which are not
# listed because no test covers them). Matching ignores ByteLevel's trim_offsets, which changes offsets, not ids.
_BYTE_LEVEL: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    GPT2_PRE_TOKENIZER: _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def _without_trim_offsets(spec: Any) -> Any:
    if isinstance(spec, dict):
        return {k: _without_trim_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_without_trim_offsets(v) for v in spec]
    return spec


def gguf_pre_name(pre_tokenizer: dict[str, Any] | None) -> str | None:
    """The llama.cpp pre-tokenizer name of a `tokenizers` pre-tokenizer (its tokenizer.json entry), or None."""
    found = _without_trim_offsets(pre_tokenizer)
    return next((name for name, spec in PRE_TOKENIZERS.items() if _without_trim_offsets(spec) == found), None)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def check_exportable(config: ModelConfig) -> None:
    """Raise CheckpointError unless `config` is a Llama-style model that llama.cpp's `llama` architecture runs."""
    misfits = [f"{field}={getattr(config, field)!r} (it needs {needed!r})"
               for field, needed in (("pos_embedding", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"))
               if getattr(config, field) != needed]
    if misfits:
        raise CheckpointError(f"cannot export to GGUF: only Llama-style models (RoPE, RMSNorm, SwiGLU) are "
                              f"supported, and this config has {', '.join(misfits)}; export GPT-2-style models "
                              "with `byollm export hf` instead")
    if config.bias or config.qkv_bias:
        raise CheckpointError("cannot export to GGUF a model with linear-layer biases (bias/qkv_bias=True): the "
                              "exporter writes bias-free Llama; export with `byollm export hf` instead")
    kind = (config.rope_scaling or {}).get("rope_type", (config.rope_scaling or {}).get("type"))
    if kind not in (None, "linear", "llama3"):
        raise CheckpointError(f"cannot export to GGUF: RoPE scaling {kind!r} is not supported (linear, llama3)")


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def permute_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from rotate-half pairs (i, i + D/2) to adjacent pairs (2i, 2i + 1).

    weight: (n_heads * D, in) (or (n_heads * D,) for a bias). Row h*D + 2i + s of the result is row
    h*D + s*D/2 + i of the input (s = 0 or 1)."""
    rows = weight.shape[0]
    d = rows // n_heads
    return weight.reshape(n_heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _gguf_name(name: str) -> str:
    module, _, param = name.rpartition(".")
    for ours, theirs in GGUF_NAMES:
        match = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(\d+)"), module)
        if match:
            return (theirs.replace("{i}", match.group(1)) if match.groups() else theirs) + "." + param
    raise CheckpointError(f"parameter '{name}' has no GGUF equivalent")


def gguf_tensors(model: GPT, dtype: GGUFDtype = "f32") -> dict[str, torch.Tensor]:
    """llama.cpp's tensor names -> CPU tensors in the layout it expects (matrices in `dtype`, norms in f32)."""
    config = model.config
    check_exportable(config)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16}[dtype]
    sd = dict(model.state_dict())
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # llama.cpp uses token_embd as the output matrix when `output` is absent
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        t = tensor.detach().to("cpu", torch.float32)
        if ".attn.q_proj." in name:
            t = permute_rope(t, config.n_head)
        elif ".attn.k_proj." in name:
            t = permute_rope(t, config.n_kv_head)
        # llama.cpp keeps 1-D tensors (norm weights) in f32.
        out[_gguf_name(name)] = (t if t.dim() == 1 else t.to(torch_dtype)).contiguous()
    if config.rope_scaling and config.rope_scaling.get("rope_type", config.rope_scaling.get("type")) == "llama3":
        # llama.cpp divides each base frequency by `rope_freqs` (convert_hf_to_gguf.py writes the same factors).
        base = rope_inverse_frequencies(ModelConfig.from_dict({**config.to_dict(), "rope_scaling": None}))
        out["rope_freqs.weight"] = (base / rope_inverse_frequencies(config)).float().contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def gguf_vocab(tokenizer: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """What the GGUF tokenizer metadata needs: tokens, token types, merges and the pre-tokenizer name.

    `vocab_size` is the model's: ids past the tokenizer's own (an embedding padded to a round size) become
    unused `[PAD{i}]` tokens, as in llama.cpp's converter."""
    from byollm.tokenizer import BPETokenizer, CharTokenizer
    from byollm.tokenizer.bpe import from_byte_level, to_byte_level

    if tokenizer.vocab_size > vocab_size:
        raise TokenizerError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only vocab_size="
                             f"{vocab_size}; export the tokenizer the model was trained with")
    specials = set(tokenizer.special_tokens.values())
    if isinstance(tokenizer, BPETokenizer):
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
        merges = [f"{tokenizer.id_to_token(a)} {tokenizer.id_to_token(b)}" for a, b in tokenizer.merges]
        pre = GPT2_PRE_TOKENIZER
    elif isinstance(tokenizer, CharTokenizer):
        # Each character as a byte-level token with no merges: llama.cpp's BPE then yields one token per
        # character, exactly like ours. That needs every character to be a single UTF-8 byte.
        wide = [c for c in tokenizer.chars if len(c.encode("utf-8")) != 1]
        if wide:
            raise TokenizerError(f"cannot export this character tokenizer to GGUF: characters such as {wide[:3]} "
                                 "take more than one UTF-8 byte, which llama.cpp's byte-level tokenizer cannot "
                                 "represent as single tokens; use a BPE tokenizer")
        tokens = [to_byte_level(c.encode("utf-8")) for c in tokenizer.chars]
        tokens += sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
        # llama.cpp requires a merges list and the gguf writer refuses an empty one; so one merge of the first
        # character with itself, which is no token: llama.cpp splits a merged symbol that is not in the vocabulary
        # back into its byte tokens, so it changes nothing.
        merges, pre = [f"{tokens[0]} {tokens[0]}"], GPT2_PRE_TOKENIZER
    else:
        tokens, merges, pre = _fast_vocab(tokenizer)
    gguf = require("gguf", "gguf")
    types = [int(gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL) for i in range(len(tokens))]
    for i, t in enumerate(tokens):
        if i not in specials and from_byte_level(t) is None:  # a non-special added token (plain text)
            types[i] = int(gguf.TokenType.USER_DEFINED)
    n_pad = vocab_size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [int(gguf.TokenType.UNUSED)] * n_pad
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


def _fast_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[str], str]:
    """A FastTokenizer (tokenizers' JSON) that is plain byte-level BPE with a pre-tokenizer llama.cpp knows."""
    import json

    hf = getattr(tokenizer, "hf", None)
    if hf is None:
        raise TokenizerError(f"cannot export a {type(tokenizer).__name__} to GGUF (supported: byte-level BPE, "
                             "character tokenizers)")
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    pre = gguf_pre_name(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or spec.get("normalizer") or pre is None or model.get("byte_fallback"):
        raise TokenizerError("cannot export this tokenizer to GGUF: only byte-level BPE with no normalizer and the "
                             f"pre-tokenizer of {' or '.join(PRE_TOKENIZERS)} is supported; export with `byollm "
                             "export hf` and convert with llama.cpp's convert_hf_to_gguf.py")
    tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, merges, pre


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def export_gguf(model: GPT, out_path: str | Path, tokenizer: Tokenizer | None,
                dtype: GGUFDtype = "f32", name: str = "byollm") -> Path:
    """Write `model` and `tokenizer` as one GGUF file that llama.cpp loads (`llama` architecture).

    dtype: "f32" (exact) or "f16" (half the size). The file is written to a temporary name and renamed, so
    `out_path` is never left half-written."""
    gguf = require("gguf", "gguf")
    if dtype not in ("f32", "f16"):
        raise ByollmError(f"unknown GGUF dtype {dtype!r}; use f32 or f16 (quantise further with llama-quantize)")
    config = model.config
    check_exportable(config)
    if tokenizer is None:
        raise TokenizerError("cannot export to GGUF without a tokenizer: llama.cpp needs the vocabulary in the file; "
                             "give a checkpoint that carries its tokenizer")
    vocab = gguf_vocab(tokenizer, config.vocab_size)  # raises before anything is written
    tensors = gguf_tensors(model, dtype)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16))
        for key, field in GGUF_HPARAMS:
            getattr(writer, f"add_{key}")(getattr(config, field))
        scaling = config.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        writer.add_token_merges(vocab["merges"])
        writer.add_add_bos_token(False)  # byollm never prepends bos by itself
        writer.add_add_eos_token(False)
        for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                          ("pad", writer.add_pad_token_id)):
            if (token_id := getattr(tokenizer, f"{role}_id")) is not None:
                add(token_id)
        from byollm.tokenizer.chat_template import END, hf_tokenizer_config

        template = hf_tokenizer_config(tokenizer).get("chat_template") or tokenizer.hf_config.get("chat_template")
        if template:
            writer.add_chat_template(template)
        # The end of a chat turn: ours (<|end|>), else the one an imported tokenizer named (ChatML's <|im_end|>).
        eot = END if END in tokenizer.special_tokens else tokenizer.hf_config.get("eot_token")
        if isinstance(eot, str) and (eot_id := tokenizer.token_to_id(eot)) is not None:
            writer.add_eot_token_id(eot_id)

        for tensor_name, t in tensors.items():
            writer.add_tensor(tensor_name, t.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return atomic_file_write(out_path, write)


def export_checkpoint_to_gguf(ckpt_path: str | Path, out_path: str | Path, dtype: GGUFDtype = "f32") -> Path:
    """`byollm export gguf CKPT OUT.gguf`: any checkpoint path byollm accepts -> one GGUF file."""
    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt_path)
    return export_gguf(loaded.model, out_path, loaded.tokenizer, dtype, name=Path(ckpt_path).resolve().name)


def load_llama_cpp(path: str | Path, *, extra_bufts: bool = False, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(model_path=path, **kwargs)` with llama.cpp's extra CPU buffer types off by default.

    Those buffers (weights repacked for its AMX / AVX-512 kernels) segfault decoding Q4_1 files on an AMX Xeon
    (llama-cpp-python 0.3.36); the plain CPU buffers run the same quantised formats. llama-cpp-python takes its
    model parameters from `llama_model_default_params`, so that function is swapped for the load only."""
    llama_cpp = require("llama_cpp", "llamacpp")
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params() -> Any:  # a ctypes llama_model_params
        p = defaults()
        p.use_extra_bufts = extra_bufts
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


__all__ = ["GGUF_HPARAMS", "GGUF_NAMES", "GPT2_PRE_TOKENIZER", "PRE_TOKENIZERS", "check_exportable",
           "export_checkpoint_to_gguf", "export_gguf", "gguf_pre_name", "gguf_tensors", "gguf_vocab", "load_llama_cpp",
           "permute_rope"]
