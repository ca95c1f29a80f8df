"""A tokenizer as Hugging Face files: tokenizer.json, tokenizer_config.json and special_tokens_map.json.

`transformers.AutoTokenizer.from_pretrained(directory)` then gives the same ids as our encode, and its
`apply_chat_template` renders what `byollm.tokenizer.chat_format` renders: with byollm's chat tokens, our
template's Jinja twin is written as `chat_template`; otherwise an imported model's own template (read from its
tokenizer_config.json, chat_template.jinja or GGUF file into `hf_config`) is written back as it came.
Every tokenizer's `save_hf` method calls `write_hf_files`.

It imports both `base` (the interface) and `chat_template` (which itself imports `base`); `base` imports
neither, so there is no import cycle.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from byollm.tokenizer.base import Tokenizer, write_json
from byollm.tokenizer.chat_template import hf_tokenizer_config

if TYPE_CHECKING:  # pragma: no cover - type hints only
    import tokenizers

# tokenizer_config.json entries we always write ourselves; an imported model's values for them are dropped.
OWN_CONFIG_KEYS = frozenset({"tokenizer_class", "auto_map", "added_tokens_decoder", "bos_token", "eos_token",
                             "pad_token"})


def _roles(tok: Tokenizer) -> dict[str, str]:
    named = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    return {k: v for k, v in named.items() if v is not None}


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer_config.json of `tok`: an imported model's entries (e.g. its chat_template), then ours."""
    config = {k: v for k, v in tok.hf_config.items() if k not in OWN_CONFIG_KEYS}
    # PreTrainedTokenizerFast loads tokenizer.json as it is. Without clean_up_tokenization_spaces=False,
    # transformers' decode would remove spaces before punctuation and differ from ours.
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **_roles(tok)})
    # With byollm's chat tokens, the chat template that renders exactly as byollm.tokenizer.chat_template does
    # (chat_format's choice too); without them an imported template stays, from hf_config above.
    config.update(hf_tokenizer_config(tok))
    return config


def write_hf_files(tok: Tokenizer, directory: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for transformers."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.to_hf().save(str(directory / "tokenizer.json"))
    roles = _roles(tok)
    others = [t for t in tok.special_tokens if t not in roles.values()]
    write_json(directory / "tokenizer_config.json", tokenizer_config(tok))
    write_json(directory / "special_tokens_map.json", {**roles, "additional_special_tokens": others})


def add_special_tokens_to_hf(hf: tokenizers.Tokenizer, special_tokens: dict[str, int]) -> tokenizers.Tokenizer:
    """Add our special tokens (name -> id) to a `tokenizers.Tokenizer`, in id order, so they get the same ids:
    matched whole in the raw text (not normalised) and skipped by decode(skip_special_tokens=True)."""
    from tokenizers import AddedToken

    ordered = sorted(special_tokens, key=special_tokens.__getitem__)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    return hf


__all__ = ["OWN_CONFIG_KEYS", "add_special_tokens_to_hf", "tokenizer_config", "write_hf_files"]
