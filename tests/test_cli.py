"""The `byollm` command end to end: help everywhere, the README's first-look commands, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import parsers

from byollm.cli import COMMANDS, build_parser, main, verb_path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "byollm.cli", *args], capture_output=True, text=True, timeout=300)


def sub_verbs(p: argparse.ArgumentParser) -> dict[str, str]:
    """A parser's verbs and their one-line help (empty for a leaf verb)."""
    return {c.dest: c.help for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a._choices_actions}


@pytest.fixture(scope="module")
def cli_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    return parsers(build_parser())


GROUPS = [("export",), ("convert",), ("tokenizer",), ("model",), ("data",), ("cloud",), ("rag",), ("safety",)]


@pytest.mark.parametrize("path", [(), *GROUPS, *COMMANDS])
def test_help_on_every_subcommand(path: tuple[str, ...], cli_parsers: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([*path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    squeezed = "".join(out.split())  # --help wraps lines
    usage = out.split("\n\n")[0]
    # the usage line is this verb's: `usage: byollm [options] export [options] hf [--dtype DTYPE] ckpt out_dir`
    assert re.match(r"usage: byollm\b" + "".join(rf".*\b{re.escape(w)}\b" for w in path), usage, re.S), usage
    p = cli_parsers[path]
    assert p.description and "".join(p.description.split()) in squeezed  # what the verb does
    for verb, text in sub_verbs(p).items():  # a group lists its verbs, each with its line
        assert verb in out and text and "".join(text.split()) in squeezed, f"{verb} is not listed with its help"


def test_every_verb_has_a_command_and_every_command_a_verb(cli_parsers: dict) -> None:
    leaves = {path for path, p in cli_parsers.items() if path and not sub_verbs(p)}
    assert leaves == set(COMMANDS)
    assert set(sub_verbs(cli_parsers[()])) == {path[0] for path in COMMANDS}
    ns = build_parser().parse_args(["export", "gguf", "ck", "out.gguf", "--dtype", "f16"])
    path, args = verb_path(ns)
    assert path == ("export", "gguf") and (args.ckpt, args.out, args.dtype) == ("ck", "out.gguf", "f16")


@pytest.mark.parametrize(
    ("args", "messages"),
    [
        (["pretrian"], ["invalid choice: 'pretrian'", "did you mean 'pretrain'?"]),
        (["export", "hff", "a", "b"], ["'hff'", "did you mean 'hf'?"]),
        (["pretrain", "--max_stpes", "3"], ["--max_stpes", "did you mean --max_steps?"]),
        (["sft", "--method", "lora"], ["--method", "an option of another command"]),
        (["pretrain", "--schedule", "cosin"], ['"schedule"', "'cosine', 'linear', 'constant'", "cosin"]),
        (["export"], ["hf,gguf"]),
        (["generate"], ["required", "ckpt"]),
    ],
)
def test_argument_errors_are_one_line_naming_the_option(args: list[str], messages: list[str],
                                                        capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("byollm: error:"), err
    assert all(m in err for m in messages), err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
                 + "All:\nSpeak, speak. Ünïcödé ✓ 123\n" * 20)
    return p


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    d = tmp_path_factory.mktemp("cli")
    assert main(["tokenizer", "train", "--vocab-size", "300", str(corpus), "--out", str(d / "tok")]) == 0
    assert main(["init", "--model.preset", "llama-tiny", "--model.n_layer", "1", "--tokenizer", str(d / "tok"),
                 "--out", str(d / "ckpt")]) == 0
    return d / "ckpt"


def test_init_applies_overrides_and_tokenizer_vocab(init_ckpt: Path) -> None:
    cfg = json.loads((init_ckpt / "config.json").read_text())
    assert cfg["n_layer"] == 1 and cfg["vocab_size"] == 300 and cfg["pos_embedding"] == "rope"


def test_generate_prints_prompt_and_continuation(init_ckpt: Path) -> None:
    r = run_cli("generate", str(init_ckpt), "--prompt", "First", "--max-new-tokens", "5", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("First") and len(r.stdout) > len("First\n")
    assert "loaded checkpoint" in r.stderr


def test_export_then_convert_back_round_trips_weights(init_ckpt: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    assert main(["export", "hf", str(init_ckpt), str(tmp_path / "hf")]) == 0
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["model_type"] == "llama"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    a, b = load_file(init_ckpt / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_model_info_with_yaml_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  preset: gpt2-124m\n  n_layer: 2\n")
    assert main(["model", "info", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    # 2 GPT-2 blocks: 2 * 7,087,872 + embeddings 50257*768 + 1024*768 + final norm 2*768
    assert f"parameters: {2 * 7_087_872 + 50257 * 768 + 1024 * 768 + 2 * 768:,}" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "does/not/exist"], "no checkpoint at 'does/not/exist'"),
        (["model", "info", "--model.preset", "gpt2-124", "--model.n_layer", "1"], "did you mean gpt2-124m"),
        (["model", "info", "--model.n_lyer", "3"], "did you mean --model.n_layer"),
        (["tokenizer", "train", "missing.txt", "--out", "x"], "missing.txt"),
    ],
)
def test_user_errors_are_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "byollm.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byollm: error:"), r.stderr
    assert message in lines[0]


def test_bad_yaml_key_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  preset: gpt-tiny\n  n_heads: 2\n")
    assert main(["model", "info", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "n_heads" in err and len(err.splitlines()) == 1


def test_weights_from_another_architecture_are_refused(init_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(init_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(pos_embedding="learned", norm="layernorm", mlp="gelu", bias=True)  # a GPT-2 block
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run_cli("generate", str(bad), "--max-new-tokens", "1")
    assert r.returncode == 2 and "do not fit the config" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["unknown name", "wrong checksum", "missing offline", "corrupt file"])
def test_data_errors_are_one_clear_line(case: str, tmp_path: Path) -> None:
    # The four ways data goes wrong for a user, through the real command (a fresh process, real registry).
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    env = {**os.environ, "BYOLLM_DATA_MIRROR": str(mirror), "BYOLLM_CACHE": str(cache), "BYOLLM_OFFLINE": "1"}
    name, message = "tinyshakespeare", ""
    if case == "unknown name":
        name, message = "tinyshakespear", "did you mean 'tinyshakespeare'"
    elif case == "wrong checksum":
        (mirror / "tinyshakespeare.txt").write_text("First Citizen:\nBefore we proceed any further, hear me")
        message = "checksum"
    elif case == "missing offline":
        message = "set BYOLLM_DATA_MIRROR to a folder holding tinyshakespeare.txt"
    else:
        name = str(tmp_path / "broken.jsonl")
        Path(name).write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c\n')
        message = "line 3 is not valid JSON"
    r = subprocess.run([sys.executable, "-m", "byollm.cli", "data", "prepare", name, "--tokenizer", "char",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("byollm: error:"), r.stderr
    assert message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_ppo_verb_on_a_file_of_chat_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `byollm ppo --prompts FILE` with {"messages": [...]} records (the format byollm.train.ppo.read_prompts
    # documents): each record is the conversation it holds, rendered with the chat template up to the assistant
    # header (a system turn kept, a final assistant reply dropped), not its text wrapped as one user message.
    import torch
    from conftest import tiny_chat_base

    import byollm.train.ppo as ppo_module
    from byollm.checkpoint import load_checkpoint, save_checkpoint
    from byollm.model import RewardModel
    from byollm.tokenizer.chat_template import encode_prompt
    from byollm.train.align import prepare_chat_model

    base = tiny_chat_base(tmp_path)
    loaded = load_checkpoint(base)
    policy = save_checkpoint(prepare_chat_model(loaded.model, loaded.tokenizer), tmp_path / "policy", loaded.tokenizer)
    torch.manual_seed(1)
    scorer = RewardModel(prepare_chat_model(load_checkpoint(base).model, loaded.tokenizer))
    rm = save_checkpoint(scorer, tmp_path / "rm", loaded.tokenizer)
    conversations = [
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How do I bake bread?"},
         {"role": "assistant", "content": "Mix flour and water, then bake it."}],
        [{"role": "user", "content": "Tell me a joke about cats."}],
        [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "The quick brown fox?"}],
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    seen: list[list[int]] = []
    real_ppo = ppo_module.ppo

    def spy(cfg, **kwargs):  # what the recipe trains on
        seen.extend(kwargs["prompts"])
        return real_ppo(cfg, **kwargs)

    monkeypatch.setattr(ppo_module, "ppo", spy)
    assert main(["ppo", "--policy", str(policy), "--reward_model", str(rm), "--prompts", str(prompts),
                 "--max_steps", "1", "--rollout.rollout_size", "4", "--rollout.mini_batch_size", "4",
                 "--rollout.ppo_epochs", "1", "--rollout.max_new_tokens", "4", "--device", "cpu", "--dtype", "fp32",
                 "--out_dir", str(tmp_path / "runs"), "--name", "ppo"]) == 0
    tok = load_checkpoint(policy).tokenizer
    expected = [encode_prompt(tok, c[:-1] if c[-1]["role"] == "assistant" else c) for c in conversations]
    assert seen == expected
    assert load_checkpoint(tmp_path / "runs" / "ppo").model.config.n_layer == 2  # the run wrote its policy
