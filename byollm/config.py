"""Configs: dataclass sections, filled by one library (jsonargparse) from YAML files, dotted overrides and dicts.

A recipe's config is composed of the sections it reads, each owned by the code that reads it:

    RunConfig     (train/run.py)    out_dir, name, resume, seed, device, dtype, compile -> start_run()
    LoopConfig    (train/loop.py)   max_steps, grad_accum, grad_clip, intervals          -> Trainer
    OptimConfig   (train/optim.py)  lr, schedule, weight decay, betas (Muon for pretrain) -> build_training_optimizer()
    + the recipe's own fields and sub-sections (model/data, align, rollout, lora, ...)

Sections are mixed into one dataclass, so the keys of a YAML recipe stay flat (`max_steps: 100`, `lr: 3e-4`,
nanoGPT's names) while nested sub-sections keep their prefix (`model.n_layer`, `align.beta`). A recipe lists
only the sections it reads, so `--help` shows nothing it would ignore.

Every way in goes through `parse_config` (the CLI builds its parser with the same `add_config_arguments`):

    >>> parse_config(TrainConfig, "configs/quickstart.yaml", {"max_steps": 50, "model.n_layer": 2})

Field descriptions are the attribute docstrings under each field; jsonargparse shows them in `--help`.
An unknown key is a ConfigError naming the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from byollm.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass
class Section:
    """Base of every config dataclass: after __init__, each section class in the MRO checks its own fields
    (its `check` method), so a recipe config validates exactly the sections it is made of."""

    def __post_init__(self) -> None:
        # Sub-sections given as dicts (Python callers: `TrainConfig(model={"preset": "gpt-tiny"})`) go through
        # the same parser as YAML files.
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, dict) and dataclasses.is_dataclass(hints.get(f.name)):
                setattr(self, f.name, parse_config(hints[f.name], None, value))
        for cls in reversed(type(self).__mro__):
            check = cls.__dict__.get("check")
            if check is not None:
                check(self)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """The config from a (possibly nested) dict of values, validated and typed by jsonargparse."""
        return parse_config(cls, None, d)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


class _Dumper(yaml.SafeDumper):
    """Strings with line breaks in double quotes ("\n"), which YAML's default block style makes unreadable."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style='"' if "\n" in s else None))


# --------------------------------------------------------------------------------------------------
# One path from YAML / overrides / dicts to a dataclass
# --------------------------------------------------------------------------------------------------


def _enable_field_docstrings() -> None:
    """jsonargparse reads a field's description from the string literal under it (attribute docstring)."""
    import jsonargparse

    if hasattr(jsonargparse, "set_parsing_settings"):
        try:
            jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
            return
        except TypeError:  # an older jsonargparse: the setting has its older name
            pass
    jsonargparse.set_docstring_parse_options(attribute_docstrings=True)


def add_config_arguments(parser: Any, cls: type, skip: set[str] | None = None, nested_key: str | None = None) -> None:
    """Add `--config FILE` and one option per field of `cls` (dotted for sub-sections; all under `nested_key`
    when given) to a jsonargparse parser."""
    from jsonargparse import ActionConfigFile

    _enable_field_docstrings()
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe (configs/*.yaml); options given "
                        "after it override its values")
    parser.add_class_arguments(cls, nested_key, skip=skip or set())
    for action in parser._actions:  # a sub-section's own option (`--model FILE`) loads it from a file
        if action.option_strings and (action.help or "").startswith("Path to a configuration file"):
            action.help = f"a YAML file with the {action.dest}.* settings (its keys without the prefix)"


def config_from_args(cls: type[T], args: Any, **values: Any) -> T:
    """`cls` from parsed, instantiated arguments (jsonargparse's Namespace: sub-sections already dataclasses)
    and extra `values` that take precedence (a positional CKPT argument, say)."""
    fields = {f.name: args[f.name] for f in dataclasses.fields(cls) if f.name in args}  # type: ignore[arg-type]
    try:
        return cls(**{**fields, **values})
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def instantiate(parser: Any, ns: Any) -> Any:
    """Turn the sub-sections of a parsed namespace into their dataclasses (jsonargparse renamed the call)."""
    return parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)


def parse_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """`cls` from a YAML file (or the defaults), then overrides: dotted ({"model.n_layer": 4}) or nested."""
    from jsonargparse import ArgumentParser

    d: dict[str, Any] = {}
    if path is not None:
        d = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        if isinstance(value, dict) and dotted in d and isinstance(d[dotted], dict):
            value = {**d[dotted], **value}
        _set_dotted(d, dotted, value)
    parser = ArgumentParser(exit_on_error=False)
    add_config_arguments(parser, cls)
    where = f"{path}: " if path is not None else ""
    unknown = unknown_key(d, parser, refused=getattr(cls, "REFUSED", None))
    if unknown:
        raise ConfigError(f"{where}{unknown}")
    try:
        ns = parser.parse_object(d)
    except Exception as e:  # jsonargparse raises ArgumentError / TypeError / ValueError for bad values
        if isinstance(e, ConfigError):
            raise ConfigError(f"{where}{e}") from None
        raise ConfigError(f"{where}{one_line(str(e))}") from None
    return config_from_args(cls, instantiate(parser, ns))


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {one_line(str(e))}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p} must hold a mapping of config keys, got {type(d).__name__}")
    return d


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = d
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a section")
    node[leaf] = value


def known_keys(parser: Any) -> set[str]:
    """Every option's dotted name (`max_steps`, `model.n_layer`, ...) of a parser."""
    return {a.dest for a in parser._actions if a.dest not in ("help", "config", "print_config")}


def unknown_key(d: dict[str, Any], parser: Any, where: str = "", refused: dict[str, str] | None = None) -> str | None:
    """'unknown config key ... (did you mean ...?)' for the first key of a nested dict the parser lacks;
    `refused`: keys (or sections) that belong to other recipes, with the message to give instead."""
    known = known_keys(parser)
    stack = [("", d)]
    while stack:
        prefix, node = stack.pop(0)
        for key, sub in node.items() if isinstance(node, dict) else ():
            dotted = f"{prefix}{key}"
            if isinstance(sub, dict) and any(k.startswith(dotted + ".") for k in known):
                stack.append((dotted + ".", sub))
                continue
            if dotted in known:
                continue
            if any(k.startswith(dotted + ".") for k in known):
                continue  # a section given a non-dict value: jsonargparse names the problem
            if refused and dotted.split(".")[0] in refused:
                return refused[dotted.split(".")[0]]
            close = difflib.get_close_matches(dotted, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"unknown config key '{dotted}'{where}{hint}"
    return None


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip()) or "invalid config"


__all__ = ["Section", "add_config_arguments", "config_from_args", "instantiate", "known_keys", "one_line",
           "parse_config", "read_yaml", "unknown_key"]
