"""What a training run needs to know, as dataclasses: the schema of every YAML recipe in configs/.

A config file fills these fields; dotted overrides change single values (`--model.n_layer 4 --lr 3e-4`);
an unknown key is an error that names the nearest valid one. `model` is a preset plus overrides
(`byollm.model.config.ModelChoice`), `data` says which text and which tokenizer, and the flat fields are
the training hyper-parameters, named as in nanoGPT where nanoGPT has a name for them.

    >>> cfg = load_config("configs/quickstart.yaml", {"max_steps": 50, "model.n_layer": 2})
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from byollm.errors import ConfigError
from byollm.model.config import ModelChoice


@dataclass
class DataConfig:
    """Which text to train on and how to cut it into tokens (see `byollm.data.prepare`)."""

    name: str = "tinyshakespeare"  # a dataset name (`byollm.data.list_datasets()`) or a local text file / folder
    tokenizer: str = "char"  # "char", "bpe:N" (train an N-id BPE), "gpt2" / "hf:REPO" (Hub) or a tokenizer's dir
    dir: str | None = None  # an already prepared folder (train.bin, val.bin, meta.json, tokenizer/): used as is
    allow_fallback: bool = False  # nowhere to be found (no mirror, cache or network): use CPython's pydoc text
    # Streaming (byollm.data.streaming): read, tokenise and batch documents while training, no prepare step.
    streaming: bool | None = None  # None: when the registry marks the dataset as streamed (fineweb-edu)
    val_docs: int = 10_000  # streaming: the first val_docs documents are the validation set, never trained on
    prefetch: int = 8  # streaming: batches made ahead by a background thread (0: none)


@dataclass
class TrainConfig:
    """One pretraining run. Steps count optimizer updates; one step sees
    batch_size x block_size x grad_accum x world_size tokens."""

    model: ModelChoice = field(default_factory=ModelChoice)  # preset + overrides; vocab_size follows the tokenizer
    data: DataConfig = field(default_factory=DataConfig)
    # ---- batch -----------------------------------------------------------------------------------
    batch_size: int = 12  # sequences per micro-batch, per process
    block_size: int | None = None  # tokens per sequence; None: the model's block_size
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    # ---- optimiser: AdamW, weight decay on matrices only, warmup then decay to min_lr --------------
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # the step where the decay reaches min_lr; None: max_steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    decay_embeddings: bool = True  # GPT-2/nanoGPT decay the embedding tables too (a tied one is the LM head)
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the blocks' matrices, AdamW (lr) for the rest
    muon_lr: float = 0.02  # Muon's peak learning rate (the schedule scales it like lr)
    muon_momentum: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    # ---- where and how fast -----------------------------------------------------------------------
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # bf16: autocast (weights stay fp32); auto: bf16 on GPUs
    compile: bool = False  # torch.compile the model
    peak_flops: float | None = None  # for MFU; None: the GPU's bf16 peak from a table, or measured on a CPU
    # ---- watching it train (every N steps; 0: only at the end) ---------------------------------------
    log_interval: int = 10
    eval_interval: int = 250
    eval_batches: int = 20  # fixed validation batches per evaluation
    stop_at_val_loss: float | None = None  # stop early once an evaluation reaches this val loss (benchmarks)
    sample_interval: int = 0
    sample_prompt: str = "\n"
    sample_tokens: int = 200
    checkpoint_interval: int = 1000
    keep_last: int = 2  # checkpoints kept on disk (older ones are deleted)
    tensorboard: bool = False  # also write TensorBoard event files (needs `pip install tensorboard`)
    # ---- the run ------------------------------------------------------------------------------------
    seed: int = 1337
    out_dir: str = "runs"
    name: str | None = None  # runs/<name>/; None: <preset>-<date>-<time>
    resume: bool = False  # continue runs/<name>/ from its latest checkpoint

    def __post_init__(self) -> None:
        # Sections given as dicts (model, data, and a subclass's own: align, lora, ...) become their dataclass.
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
                setattr(self, f.name, _from_dict(hints[f.name], value, f"{f.name}."))
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first value that cannot work."""
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "keep_last", "sample_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("log_interval", "eval_interval", "sample_interval", "checkpoint_interval", "warmup_steps",
                     "weight_decay", "grad_clip", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be at least 1, got {self.block_size}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} and lr={self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        allowed = {"dtype": ("auto", "fp32", "bf16"), "schedule": ("cosine", "linear", "constant"),
                   "optimizer": ("adamw", "muon")}
        for name, choices in allowed.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {', '.join(choices)}")
        if self.data.val_docs < 1 or self.data.prefetch < 0:
            raise ConfigError(f"data.val_docs must be >= 1 and data.prefetch >= 0, got {self.data.val_docs} and "
                              f"{self.data.prefetch}")
        if self.name is not None and (not self.name or "/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"name {self.name!r} must be a plain folder name (runs/<name>/)")

    # ---- serialisation ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d, "")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks in double quotes ("\n"), which YAML's default block style makes unreadable."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (or the defaults), then dotted overrides such as {"model.n_layer": 4}."""
    d: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{p} must hold a mapping of config keys, got {type(d).__name__}")
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = d
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot override {dotted}: {key} is not a section")
        node[leaf] = value
    try:
        return TrainConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


# --------------------------------------------------------------------------------------------------
# dict -> dataclass, with "did you mean" for unknown keys and YAML's strings coerced ("1e-3" is a str in YAML)
# --------------------------------------------------------------------------------------------------


def _from_dict(cls: Any, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {d!r}")
    hints = get_type_hints(cls)
    unknown = [k for k in d if k not in hints]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(hints), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{hint}")
    values = {}
    for key, value in d.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            values[key] = value if isinstance(value, tp) else _from_dict(tp, value or {}, f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, tp, f"{prefix}{key}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn YAML/CLI scalars into the field's type where that is unambiguous; complain otherwise."""
    args = get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        args = get_args(tp)
    try:
        if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if tp is int and isinstance(value, (str, float)) and float(value) == int(float(value)):
            return int(float(value))
        if tp is bool and isinstance(value, bool):
            return value
        if tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if get_origin(tp) is list and isinstance(value, (list, tuple)):
            return [_coerce(v, args[0], name) for v in value]
        if get_origin(tp) is tuple and isinstance(value, (list, tuple)):
            return tuple(_coerce(v, t, name) for v, t in zip(value, args, strict=True))
        if get_origin(tp) is Literal and value in args:
            return value
        if get_origin(tp) is dict and isinstance(value, dict):
            return value
    except (ValueError, TypeError):
        pass
    expected = " or ".join(repr(a) for a in args) if get_origin(tp) is Literal else getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


__all__ = ["DataConfig", "TrainConfig", "load_config"]
