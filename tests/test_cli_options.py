"""Issue 12's promise about the `byollm` options, checked on the real parser and the real recipes:

1. every option of every subcommand (nested ones too) has a one-line description, and `--help` shows it;
2. every option a recipe verb lists reaches the config the recipe runs with (`recipe_config`), given a
   non-default value derived from the field's type and default: nothing is dropped between the CLI and the recipe;
3. every option a recipe verb lists is read by the recipe: the recipe runs (through `main`, a tiny setup) with
   the config classes' attribute reads recorded, and every listed field must have been read.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest
from conftest import parsers, tiny_chat_base

from byollm import config as config_module
from byollm.cli import build_parser, main
from byollm.commands import recipe_config
from byollm.config import Section, instantiate
from byollm.errors import ByollmError
from byollm.model.config import ModelChoice

GENERIC_HELP = "Path to a configuration file."  # jsonargparse's text for a section's `--model FILE` option


@pytest.fixture(scope="module")
def parser() -> Any:
    return build_parser()


def options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options and positionals a user can give (no -h/--help, no subcommand choice)."""
    return [a for a in p._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def label(a: argparse.Action) -> str:
    return a.option_strings[0] if a.option_strings else a.dest


def squeeze(text: str) -> str:
    """Text without any whitespace: --help wraps lines (and may break after a hyphen)."""
    return "".join(text.split())


# --------------------------------------------------------------------------------------------------
# 1. A description for every option, shown by --help
# --------------------------------------------------------------------------------------------------


def test_every_option_of_every_subcommand_has_a_description(parser: Any) -> None:
    verbs = parsers(parser)
    nested = {("export", "hf"), ("export", "gguf"), ("convert", "from-hf"), ("tokenizer", "train"),
              ("model", "presets"), ("model", "info"), ("data", "list"), ("data", "download"), ("data", "prepare"),
              ("rag", "index"), ("rag", "search"), ("rag", "eval"), ("safety", "bias")}
    assert nested <= set(verbs), f"not walked: {nested - set(verbs)}"
    problems = []
    for path, p in verbs.items():
        verb = " ".join(("byollm", *path))
        shown = p.format_help()
        if path and not (p.description or "").strip():
            problems.append(f"{verb}: no description")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):  # each sub-verb's line in its parent's --help
                problems += [f"{verb} {c.dest}: no help line" for c in a._choices_actions if not (c.help or "").strip()]
                continue
            if isinstance(a, argparse._HelpAction):
                continue
            text = (a.help or "").strip()
            if not text or text == argparse.SUPPRESS or text == GENERIC_HELP:
                problems.append(f"{verb} {label(a)}: help is {a.help!r}")
            elif squeeze(text) not in squeeze(shown):
                problems.append(f"{verb} {label(a)}: its help is not shown by --help")
            elif label(a) not in shown:
                problems.append(f"{verb} {label(a)}: not named in --help")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [("pretrain",), ("ppo",), ("finetune",), ("export", "gguf")])
def test_help_through_main_names_every_option(path: tuple[str, ...], parser: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for a in options(parsers(parser)[path]):
        assert label(a) in out, f"byollm {' '.join(path)} --help does not name {label(a)}"
        assert squeeze(a.help) in squeeze(out), f"byollm {' '.join(path)} --help lacks the help of {label(a)}"


# --------------------------------------------------------------------------------------------------
# 2. Every listed option reaches the config the recipe runs with
# --------------------------------------------------------------------------------------------------

# A valid argument list to set one option on top of (what the recipe needs to parse; nothing is loaded).
BASE_ARGS = {"pretrain": [], "sft": ["--align.base", "runs/base"], "reward": ["--align.base", "runs/base"],
             "dpo": ["--align.base", "runs/sft"], "orpo": ["--align.base", "runs/base"],
             "finetune": ["--align.base", "runs/base"], "ppo": ["--policy", "runs/sft", "--reward_model", "runs/rm"],
             "serve": ["runs/sft"]}
# Options that are valid only together with another one.
REQUIRES = {"rollout.advantage": ["--rollout.samples_per_prompt", "2"],  # rloo/grpo compare several answers
            "dist.cpu_offload": ["--dist.strategy", "fsdp"], "dist.meta_init": ["--dist.strategy", "fsdp"]}
# Options that are not config fields, and where they go (tested below).
EXTRAS = {"serve": {"ckpt"}, "finetune": {"ckpt", "data"}}
# Config fields that are deliberately not options.
NOT_OPTIONS = {"serve": {"api_keys"}}  # keys come from a file or the environment, never the command line
# Values for strings whose meaning the type does not carry (each candidate in turn, the first valid one wins).
STRINGS = {"device": ["cpu", "cuda"], "dtype": ["bfloat16", "float32"], "method": ["full", "qlora", "dora"],
           "lora.quant_backend": ["bitsandbytes"], "lora.quant_type": ["q4_1"], "model.preset": ["llama-tiny"],
           "data.tokenizer": ["bpe:300"], "host": ["0.0.0.0"], "name": ["my-run"], "out_dir": ["elsewhere"]}


def config_class(verb: str) -> type:
    from byollm.finetune.recipe import FinetuneTrainConfig
    from byollm.serve.settings import ServeConfig
    from byollm.train.align import CONFIGS
    from byollm.train.config import TrainConfig
    from byollm.train.ppo import PPOConfig

    return {"pretrain": TrainConfig, "finetune": FinetuneTrainConfig, "ppo": PPOConfig, "serve": ServeConfig,
            **CONFIGS}[verb]


def config_fields(cls: type, prefix: str = "") -> dict[str, tuple[type, str, Any]]:
    """dotted name -> (the dataclass that holds the field, its name, its type) for every field, sub-sections'
    fields included (`align.beta`), not the sub-sections themselves."""
    out: dict[str, tuple[type, str, Any]] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(config_fields(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (cls, f.name, tp)
    return out


def dotted_get(obj: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        obj = getattr(obj, key)
    return obj


def plain(x: Any) -> Any:
    return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def candidates(dotted: str, tp: Any, default: Any) -> list[Any]:
    """Non-default values of a field's type, most natural first (validation picks among them)."""
    if get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        assert len(inner) == 1, f"{dotted}: a union of {inner}"
        if default is None:  # any value at all of the type
            return candidates(dotted, inner[0], {bool: None, int: 0, float: 0.0, str: ""}.get(inner[0]))
        return candidates(dotted, inner[0], default)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return [c for c in args if c != default]
    if tp is bool:
        return [True, False] if default is None else [not default]
    if tp is int:
        return [v for v in (default + 1, default + 2, default * 2, default + 16) if v != default]
    if tp is float:
        return [v for v in (default * 2 or 0.5, default / 2, default + 0.5, 1e-6) if v != default]
    if tp is str:
        known = STRINGS.get(dotted)
        if known:
            return [v for v in known if v != default]
        return [f"{default}-other" if default else "other"]
    if origin is tuple:
        return [(0.8, 0.9)]
    if origin is list:
        return [[1, 2]] if args == (int,) else [["a prompt of its own"]] if dotted.endswith("prompts") else \
            [["q_proj"]] if dotted.endswith("targets") else [["http://localhost:3000"]]
    if origin is dict:
        return [{"rope_type": "linear", "factor": 2.0}]
    raise AssertionError(f"{dotted}: no value for type {tp}")


def cli_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


RECIPE_VERBS = ["pretrain", "sft", "reward", "dpo", "orpo", "finetune", "ppo", "serve"]


def listed(parser: Any, verb: str) -> set[str]:
    """The dests of the options `byollm VERB --help` lists (not --config / --print_config / a section's FILE)."""
    fields = config_fields(config_class(verb))
    sections = {d.rsplit(".", 1)[0] for d in fields if "." in d}
    return {a.dest for a in options(parsers(parser)[(verb,)])
            if a.dest not in ("config", "print_config") and a.dest not in sections}


@pytest.mark.parametrize("verb", RECIPE_VERBS)
def test_every_listed_option_reaches_the_recipes_config(verb: str, parser: Any) -> None:
    cls = config_class(verb)
    fields = config_fields(cls)
    shown = listed(parser, verb)
    # Both ways: no option that is not a config field (or a documented extra), no field without an option.
    assert shown - set(fields) == EXTRAS.get(verb, set()), f"{verb}: options that are not config fields"
    assert set(fields) - shown == NOT_OPTIONS.get(verb, set()), f"{verb}: config fields without an option"
    sub = parsers(parser)[(verb,)]
    defaults = cls()
    failures = []
    for dotted in sorted(set(fields) & shown):
        _, _, tp = fields[dotted]
        default = dotted_get(defaults, dotted)
        refusals = []
        for value in candidates(dotted, tp, default):
            argv = [*BASE_ARGS[verb], *REQUIRES.get(dotted, []), f"--{dotted}", cli_text(value)]
            try:
                cfg = recipe_config(verb, instantiate(sub, sub.parse_args(argv)))
            except (ByollmError, argparse.ArgumentError, ValueError, TypeError) as e:  # refused: try the next one
                refusals.append(f"{value!r}: {' '.join(str(e).split())[:160]}")
                continue
            got = dotted_get(cfg, dotted)
            if plain(got) != plain(value) or type(cfg) is not cls:
                failures.append(f"--{dotted} {cli_text(value)} gave {got!r} in the {type(cfg).__name__}")
            break
        else:
            failures.append(f"--{dotted}: no candidate value was accepted: {refusals}")
    assert not failures, f"byollm {verb}:\n" + "\n".join(failures)


def test_finetune_and_serve_positionals_reach_the_config(parser: Any) -> None:
    sub = parsers(parser)[("finetune",)]
    cfg = recipe_config("finetune", instantiate(sub, sub.parse_args(["runs/base", "--data", "mine.jsonl"])))
    assert cfg.align.base == "runs/base" and cfg.align.dataset == "mine.jsonl"
    cfg = recipe_config("finetune", instantiate(sub, sub.parse_args(["--align.dataset", "other.json"])))
    assert cfg.align.base is None and cfg.align.dataset == "other.json"  # without the shortcuts: the dotted keys
    serve = parsers(parser)[("serve",)]
    ns = instantiate(serve, serve.parse_args(["runs/sft", "--port", "9000"]))
    assert ns.ckpt == "runs/sft" and recipe_config("serve", ns).port == 9000  # cmd_serve hands serve() ns.ckpt


# --------------------------------------------------------------------------------------------------
# 3. Every listed option is read by the recipe
# --------------------------------------------------------------------------------------------------


def _counts(frame: Any) -> bool:
    """Whether an attribute read made by `frame` is the recipe using the value (not bookkeeping): reads by
    dataclasses' replace/asdict/repr, by byollm.config (to_yaml, the sub-section parsing) and by validation
    (check / validate / __post_init__) do not count; `model_config_from` reads the model choice with asdict."""
    code = frame.f_code
    if code.co_filename == dataclasses.__file__:
        inner = frame
        while frame is not None and frame.f_code.co_filename == dataclasses.__file__:
            inner, frame = frame, frame.f_back
        return inner.f_code.co_name == "asdict" and frame is not None and frame.f_code.co_name == "model_config_from"
    if code.co_filename.startswith("<") or code.co_filename == config_module.__file__:
        return False  # dataclass-generated __init__/__eq__/__repr__; the config module's own plumbing
    return code.co_name not in ("check", "validate", "__post_init__")


@contextlib.contextmanager
def recorded_reads() -> Iterator[set[tuple[type, str]]]:
    """(class, field) of every counted read of a config field (every Section, and ModelChoice) while inside."""
    reads: set[tuple[type, str]] = set()

    def getattribute(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in type(self).__dataclass_fields__ and _counts(sys._getframe(1)):
            reads.add((type(self), name))
        return value

    patched = [Section, ModelChoice]
    for cls in patched:
        cls.__getattribute__ = getattribute
    try:
        yield reads
    finally:
        for cls in patched:
            del cls.__getattribute__


def _common(out: Path, name: str) -> list[str]:
    return ["--device", "cpu", "--dtype", "fp32", "--out_dir", str(out), "--name", name, "--log_interval", "1",
            "--eval_interval", "1", "--checkpoint_interval", "1", "--keep_last", "1", "--warmup_steps", "1"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny chat base, SFT records, preference pairs, a text file, a streamable JSONL with its tokenizer, and for
    PPO a chat policy, a reward model of the same tokenizer and a prompt file."""
    import torch

    from byollm.checkpoint import load_checkpoint, save_checkpoint
    from byollm.model import RewardModel
    from byollm.tokenizer import CharTokenizer
    from byollm.train.align import prepare_chat_model

    d = tmp_path_factory.mktemp("options")
    base = tiny_chat_base(d)
    (d / "sft.json").write_text(json.dumps([{"instruction": f"Say the word number {i}.", "input": "",
                                             "output": f"Word {i} is bread."} for i in range(20)]))
    (d / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"How do I bake bread {i}?", "chosen": "Mix flour.",
                                                       "rejected": "No."}) + "\n" for i in range(20)))
    (d / "text.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    docs = [f"doc {i}: the cat sat on the mat {i % 7} times." for i in range(30)]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    # "\n": pretraining's default sample prompt
    CharTokenizer.train([*docs, "\n"], special_tokens=("<|endoftext|>",)).save(d / "char-tok")
    loaded = load_checkpoint(base)
    policy = prepare_chat_model(loaded.model, loaded.tokenizer)
    save_checkpoint(policy, d / "policy", loaded.tokenizer)
    torch.manual_seed(1)
    save_checkpoint(RewardModel(prepare_chat_model(load_checkpoint(base).model, loaded.tokenizer)), d / "rm",
                    loaded.tokenizer)
    (d / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Bake {i}?"}]})
                                             + "\n" for i in range(8)))
    return {"dir": d, "base": base, "sft": d / "sft.json", "pairs": d / "pairs.jsonl", "text": d / "text.txt",
            "docs": d / "docs.jsonl", "char_tok": d / "char-tok", "policy": d / "policy", "rm": d / "rm",
            "prompts": d / "prompts.jsonl"}


def recipe_runs(verb: str, a: dict[str, Path], out: Path) -> list[list[str]]:
    """The `byollm VERB ...` runs that together take every code path that reads an option (one where possible)."""
    align = ["--max_steps", "2", "--batch_size", "2", "--lr", "1e-3", "--min_lr", "1e-4", "--align.max_len", "64",
             "--align.eval_batch_size", "4", "--align.max_val", "2", "--align.base", str(a["base"])]
    samples = ["--align.sample_prompts", '["Bake bread?"]', "--sample_tokens", "3", "--sample_interval", "1"]
    if verb == "pretrain":
        common = ["pretrain", "--model.preset", "gpt-tiny", "--max_steps", "2", "--batch_size", "2", "--block_size",
                  "16", "--eval_batches", "1", "--sample_interval", "1", "--sample_tokens", "3", "--optimizer", "muon",
                  "--peak_flops", "1e12"]
        return [[*common, *_common(out, "prepared"), "--data.name", str(a["text"]), "--data.dir", str(out / "data")],
                # data.val_docs and data.prefetch are read only by a streamed dataset
                [*common, *_common(out, "streamed"), "--data.name", str(a["docs"]), "--data.streaming", "true",
                 "--data.tokenizer", str(a["char_tok"]), "--data.val_docs", "3", "--data.prefetch", "1"]]
    if verb == "sft":
        return [["sft", *align, *samples, *_common(out, "sft"), "--align.dataset", str(a["sft"])]]
    if verb == "reward":
        return [["reward", *align, *_common(out, "reward"), "--align.dataset", str(a["pairs"])]]
    if verb in ("dpo", "orpo"):
        return [[verb, *align, *samples, *_common(out, verb), "--align.dataset", str(a["pairs"])]]
    if verb == "finetune":
        # qlora reads the adapter settings and the NF4 ones; only full (Trainer checkpoints) reads keep_last
        return [["finetune", *align, *samples, *_common(out, f"ft-{m}"), "--align.dataset", str(a["sft"]),
                 "--method", m, "--lora.r", "2"] for m in ("qlora", "full")]
    if verb == "ppo":
        return [["ppo", "--policy", str(a["policy"]), "--reward_model", str(a["rm"]), "--prompts", str(a["prompts"]),
                 "--val_prompts", "2", "--max_steps", "1", "--rollout.rollout_size", "4", "--rollout.mini_batch_size",
                 "2", "--rollout.ppo_epochs", "1", "--rollout.max_new_tokens", "3", "--lr", "1e-4",
                 *_common(out, "ppo")]]
    raise AssertionError(verb)


def test_the_read_recorder_counts_uses_not_bookkeeping() -> None:
    @dataclasses.dataclass
    class Probe(Section):
        used: int = 1
        copied: int = 2
        checked: int = 3

        def check(self) -> None:
            assert self.checked > 0

    probe = Probe()
    with recorded_reads() as reads:
        probe = dataclasses.replace(probe, copied=5)  # reads every field: bookkeeping
        probe.to_yaml()
        repr(probe)
        _ = probe.used + 1
    assert reads == {(Probe, "used")}
    assert "__getattribute__" not in Section.__dict__  # put back


# Listed fields a recipe reads only in a configuration these runs do not take, with the reason. Keep it short.
UNREAD: dict[str, dict[str, str]] = {
    "pretrain": {"dist.tp": "read under dist.strategy fsdp+tp with several processes (tests/test_distributed.py)",
                 "dist.reshard_after_forward": "read by FSDP with several processes (tests/test_distributed.py)"},
}


@pytest.mark.parametrize("verb", [*RECIPE_VERBS])
def test_every_listed_option_is_read_by_the_recipe(verb: str, parser: Any, assets: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    if verb == "serve":
        pytest.skip("serve: no recipe run here (the server's tests run it); its options are checked to reach "
                    "ServeConfig above")
    if verb == "ppo":
        from byollm.train.ppo import PPOConfig
        from byollm.train.run import RunConfig

        if not issubclass(PPOConfig, RunConfig):
            pytest.skip("PPOConfig not on sections yet")
    monkeypatch.setenv("BYOLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BYOLLM_OFFLINE", "1")
    cls = config_class(verb)
    fields = config_fields(cls)
    with recorded_reads() as reads:
        for argv in recipe_runs(verb, assets, tmp_path / "runs"):
            assert main(argv) == 0, f"byollm {' '.join(argv)} failed"
    unread = sorted(d for d in listed(parser, verb) - EXTRAS.get(verb, set())
                    if (fields[d][0], fields[d][1]) not in reads and d not in UNREAD.get(verb, {}))
    assert not unread, f"byollm {verb} lists options its recipe never read: {unread}"
