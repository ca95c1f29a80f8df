"""The alignment recipes (byollm.train.align) end to end on a tiny model: SFT -> DPO (and reward, ORPO) through
the recipes and the CLI, bad preference data, the YAML recipes parse, resize_token_embeddings, and the section 2
alignment project in its --quick configuration."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_chat_base

from byollm.checkpoint import checkpoint_kind, load_checkpoint
from byollm.cli import build_parser, main
from byollm.commands import recipe_config
from byollm.config import instantiate
from byollm.errors import ConfigError, DataError
from byollm.model import GPT, preset, resize_token_embeddings
from byollm.tokenizer.chat_template import CHAT_TOKENS, has_chat_tokens
from byollm.train.align import AlignTrainConfig, dpo, load_align_config, orpo, reward, sft

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-style checkpoint whose BPE tokenizer has no chat tokens yet."""
    return tiny_chat_base(tmp_path_factory.mktemp("align"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("align-data")
    sft_records = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"Word {i} is bread."}
                   for i in range(40)]
    pairs = [{"prompt": f"How do I bake bread {i}?", "chosen": "Mix flour and water, then bake it.",
              "rejected": "I will not tell you."} for i in range(40)]
    (d / "sft.json").write_text(json.dumps(sft_records))
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    return {"sft": d / "sft.json", "pairs": d / "pairs.jsonl", "dir": d}


def overrides(out: Path, **extra: object) -> dict[str, object]:
    return {"max_steps": 3, "batch_size": 4, "device": "cpu", "dtype": "fp32", "out_dir": str(out), "lr": 3e-3,
            "min_lr": 0.0, "warmup_steps": 1, "eval_interval": 0, "log_interval": 1, "sample_tokens": 6,
            "align.max_len": 96, "align.eval_batch_size": 8, "align.sample_prompts": ["Bake bread?"], **extra}


def test_sft_then_dpo_through_the_recipes(base: Path, data: dict[str, Path], tmp_path: Path) -> None:
    s = sft(load_align_config(None, overrides(tmp_path, **{"name": "sft", "align.base": str(base),
                                                         "align.dataset": str(data["sft"]), "lr": 1e-2})),
            progress=False)
    # SFT learns the (very repetitive) replies: held-out assistant-token loss goes down.
    assert s.after["loss"] < s.before["loss"]
    assert s.after["examples"] == 4 and "kept all 36" in s.data["train"]
    assert len(s.samples) == 1 and (s.run_dir / "held_out.json").is_file() and (s.run_dir / "metrics.jsonl").is_file()
    sft_ckpt = load_checkpoint(s.run_dir)  # a normal checkpoint whose tokenizer now has the chat template
    assert has_chat_tokens(sft_ckpt.tokenizer)
    assert sft_ckpt.model.config.vocab_size == sft_ckpt.tokenizer.vocab_size == 300 + len(CHAT_TOKENS) + 1  # + pad

    d = dpo(load_align_config(None, overrides(tmp_path, **{"name": "dpo", "align.base": str(s.run_dir),
                                                         "align.dataset": str(data["pairs"]), "align.beta": 0.5})),
            progress=False)
    assert d.before["accuracy"] == 0.0 and d.before["margin"] == 0.0  # policy == reference: implicit rewards 0
    assert d.after["margin"] > 0 and d.after["accuracy"] > 0.5  # chosen moved up relative to rejected
    assert d.after["pairs"] == 4
    # The reference-free ranking (log pi(chosen) > log pi(rejected)) compares the SFT and the DPO model fairly.
    # Measured: 0.0 before (the SFT model gives the shorter refusal the higher log-prob on all 4 held-out pairs),
    # 1.0 after 3 DPO steps; it must at least rise and end on the chosen side of every pair but at most one.
    assert d.after["ranking_accuracy"] > d.before["ranking_accuracy"] and d.after["ranking_accuracy"] >= 0.75


def test_reward_and_orpo_recipes(base: Path, data: dict[str, Path], tmp_path: Path) -> None:
    common = {"align.base": str(base), "align.dataset": str(data["pairs"])}
    r = reward(load_align_config(None, overrides(tmp_path, name="rm", max_steps=5, **common)), progress=False)
    assert checkpoint_kind(r.checkpoint) == "reward" and r.samples == []
    assert r.after["pairs"] == 4
    assert load_checkpoint(r.run_dir, reward=True).model(torch.tensor([[1, 2, 3]])).shape == (1,)
    # The same pairs with chosen and rejected swapped: a reward model must learn whichever side the data prefers,
    # not keep the random base's leaning. The base's held-out rewards are the same on both files, so its two
    # accuracies add up to exactly 1 (no ties) and it cannot rank both right; chance is one of the two.
    # Measured after 5 steps: accuracy 0.0 -> 1.0 on the swapped pairs (margin -0.24 -> 12.9) and 1.0 -> 1.0 on
    # the originals (margin 0.24 -> 10.6), on the 4 held-out pairs each.
    swapped = data["dir"] / "swapped.jsonl"
    swapped.write_text("".join(json.dumps({**p, "chosen": p["rejected"], "rejected": p["chosen"]}) + "\n"
                               for p in map(json.loads, data["pairs"].read_text().splitlines())))
    s = reward(load_align_config(None, overrides(tmp_path, name="rm-swapped", max_steps=5,
                                                 **{**common, "align.dataset": str(swapped)})), progress=False)
    assert r.before["accuracy"] + s.before["accuracy"] == pytest.approx(1.0)
    for m in (r, s):
        assert m.after["accuracy"] >= 0.75 and m.after["margin"] > m.before["margin"] + 5
        assert m.after["loss"] < m.before["loss"]
    o = orpo(load_align_config(None, overrides(tmp_path, name="orpo", **common)), progress=False)
    assert o.after["nll"] < o.before["nll"]


def test_bad_preference_data_is_an_error_or_a_counted_skip(base: Path, data: dict[str, Path], tmp_path: Path) -> None:
    good = [json.loads(x) for x in data["pairs"].read_text().splitlines()]
    bad = data["dir"] / "bad.jsonl"
    rows = [{**good[0], "rejected": ""}, {**good[1], "chosen": "x " * 200}] + good[2:]
    bad.write_text("\n".join(json.dumps(p) for p in rows) + "\n")
    common = {"align.base": str(base), "align.dataset": str(bad), "align.val_fraction": 0.05, "max_steps": 1}
    r = dpo(load_align_config(None, overrides(tmp_path, name="skips", **common)), progress=False)
    report = r.data["train"] + " " + r.data["val"]
    assert "1 with an empty chosen/rejected reply" in report and "1 over-long (> 96 tokens)" in report
    with pytest.raises(DataError, match="strict"):
        dpo(load_align_config(None, overrides(tmp_path, name="strict", **common, **{"align.strict": True})),
            progress=False)
    missing = data["dir"] / "missing.jsonl"
    missing.write_text("\n".join(json.dumps({k: v for k, v in p.items() if k != "rejected"}) for p in good) + "\n")
    with pytest.raises(DataError, match="no field 'rejected'"):
        dpo(load_align_config(None, overrides(tmp_path, name="missing", **{**common, "align.dataset": str(missing)})),
            progress=False)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="align.base"):
        sft(AlignTrainConfig())
    with pytest.raises(ConfigError, match="model.*data"):
        load_align_config(None, {"model.preset": "llama-nano"})
    with pytest.raises(ConfigError, match="unknown config key 'align.bta'.*align.beta"):
        load_align_config(None, {"align.bta": 0.1})


@pytest.mark.parametrize("verb", ["sft", "reward", "dpo", "orpo", "ppo"])
def test_cli_verbs_parse_the_yaml_recipes(verb: str) -> None:
    name = {"sft": "sft-alpaca-cpu", "reward": "reward-hh-cpu", "dpo": "dpo-hh-cpu", "orpo": "orpo-hh-cpu",
            "ppo": "ppo-hh-cpu"}[verb]
    extra = ["--policy", "runs/sft", "--reward_model", "runs/rm"] if verb == "ppo" else ["--align.base", "runs/b"]
    parser = build_parser()
    ns = instantiate(parser, parser.parse_args([verb, "--config", str(REPO / "configs" / f"{name}.yaml"), *extra]))
    cfg = recipe_config(verb, ns[verb])  # what cmd_<verb> hands the recipe
    if verb == "ppo":
        assert cfg.prompts == "hh-rlhf" and cfg.rollout.rollout_size == 16
    else:
        assert cfg.align.base == "runs/b" and cfg.max_steps == 150 and cfg.device == "cpu"


def test_cli_runs_a_recipe(base: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["sft", "--align.base", str(base), "--align.dataset", str(data["sft"]), "--out_dir", str(tmp_path),
            "--name", "cli", "--max_steps", "1", "--batch_size", "2", "--device", "cpu", "--dtype", "fp32",
            "--align.max_len", "96", "--sample_tokens", "4"]
    assert main(args) == 0
    assert (tmp_path / "cli" / "held_out.json").is_file()
    assert main(["sft", "--max_steps", "1"]) == 2  # no base: one clear line, exit 2
    assert "align.base" in capsys.readouterr().err


def test_resize_token_embeddings_keeps_rows_and_ties() -> None:
    torch.manual_seed(0)
    for name in ("gpt-tiny", "llama-tiny"):
        m = GPT(dataclasses.replace(preset(name), vocab_size=50))
        old_emb, old_head = m.tok_emb.weight.clone(), m.lm_head.weight.clone()
        ids = torch.tensor([[1, 2, 3, 4]])
        before = m(ids).logits
        resize_token_embeddings(m, 53)
        assert m.config.vocab_size == 53 and m.tok_emb.weight.shape == (53, m.config.n_embd)
        torch.testing.assert_close(m.tok_emb.weight[:50], old_emb)
        torch.testing.assert_close(m.tok_emb.weight[50:], old_emb.mean(0).expand(3, -1))
        torch.testing.assert_close(m.lm_head.weight[50:], old_head.mean(0).expand(3, -1))
        torch.testing.assert_close(m(ids).logits[..., :50], before)  # old ids: the same function
        if m.config.tie_embeddings:
            assert m.lm_head.weight is m.tok_emb.weight
        resize_token_embeddings(m, 50)
        torch.testing.assert_close(m.tok_emb.weight, old_emb)


def test_section_2_alignment_project_quick(tmp_path: Path) -> None:
    mirror = Path(os.environ.get("BYOLLM_DATA_MIRROR", REPO.parent / "shared" / "data"))
    if not (mirror / "hh_rlhf_harmless_2000.jsonl").is_file() or not (mirror / "alpaca_4500.json").is_file():
        pytest.skip("the data mirror (Alpaca, HH-RLHF) is not here")
    env = {**os.environ, "BYOLLM_DATA_MIRROR": str(mirror), "BYOLLM_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(REPO / "projects" / "section_2_alignment.py"), "--quick", "--out",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["stages"]) == {"pretrain", "sft", "reward", "dpo", "win_rate_dpo_vs_sft", "orpo", "ppo"}
    assert report["targets"]["sft_lowers_held_out_loss"]
    assert report["stages"]["win_rate_dpo_vs_sft"]["n"] == 4
    assert Path(report["stages"]["ppo"]["plot"]).read_bytes()[:4] == b"\x89PNG"
