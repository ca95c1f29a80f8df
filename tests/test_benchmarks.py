"""The benchmark scripts run end to end (in their tiniest setting); speed itself is never asserted here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from byollm.train.perf import gpu_peak_flops

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_bench_train_runs_both_sides(tmp_path, capsys):
    pytest.importorskip("transformers")
    bench = load_script("bench_train")
    out = tmp_path / "train.json"
    results = bench.main(["--device", "cpu", "--preset", "llama-tiny", "--batch-size", "2", "--seq-len", "16",
                          "--steps", "2", "--warmup", "0", "--no-compile", "--dtype", "fp32", "--peak-max-n", "128",
                          "--json", str(out)])
    for side in ("ours", "hf"):
        assert results[side]["tokens_per_s"] > 0
        assert not results[side]["compiled"] and results[side]["compile_error"] is None
        assert len(results[side]["round_s"]) == 2
        assert 0 < results[side]["mfu_vs_fp32_peak"]
    assert results["ratio_ours_over_hf"] > 0
    assert results["hf_class"] == "LlamaForCausalLM" and results["hf_attn_implementation"] == "sdpa"
    # Same weights, same batch: the first losses agree (fp32), about ln(vocab_size) for a fresh model.
    assert results["loss_diff_first_step"] < 1e-4
    assert abs(results["ours"]["first_loss"] - math.log(128)) < 0.5
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is the summary
    assert summary["ratio_ours_over_hf"] == pytest.approx(results["ratio_ours_over_hf"], rel=1e-3)
    assert json.loads(out.read_text())["summary"] == summary


@pytest.mark.parametrize("name, flops", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                         ("NVIDIA H200 NVL", 835e12),
                                         ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_gpu_peak_table(name, flops):
    assert gpu_peak_flops(name) == flops  # NVIDIA datasheets, dense bf16


def test_bench_train_falls_back_to_eager_when_compile_fails(monkeypatch):
    """A peer that torch.compile cannot handle is reported and then timed eager, not fatal."""
    pytest.importorskip("transformers")
    import torch

    bench = load_script("bench_train")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    def fake_compile(model, *args, **kwargs):  # ours: stays the plain module; the peer: fails when first called
        return model if isinstance(model, bench.GPT) else broken

    monkeypatch.setattr(torch, "compile", fake_compile)
    results = bench.main(["--device", "cpu", "--preset", "gpt-tiny", "--batch-size", "2", "--seq-len", "8",
                          "--steps", "1", "--warmup", "0", "--compile", "--peak-max-n", "128"])
    assert results["ours"]["compiled"] and results["ours"]["compile_error"] is None
    assert not results["hf"]["compiled"] and "simulated compile failure" in results["hf"]["compile_error"]
    assert results["hf"]["tokens_per_s"] > 0 and results["hf_class"] == "GPT2LMHeadModel"


def test_bench_finetune_runs_every_method(capsys):
    """Full / LoRA / QLoRA, ours and the transformers + PEFT + bitsandbytes peer, one step each, in-process
    (the real run starts a fresh process per case; here only the code paths are exercised)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    bench = load_script("bench_finetune")
    results = bench.main(["--presets", "gpt-tiny", "--steps", "1", "--in-process"])
    rows = {(r["stack"], r["method"]): r for r in results["presets"]["gpt-tiny"]["cases"]}
    has_load = importlib.util.find_spec("byollm.finetune.load") is not None  # loading straight into NF4
    methods = [m for m in bench.METHODS if has_load or m != "qlora-load"]
    assert set(rows) == {(s, m) for s in bench.STACKS for m in methods} - {("peer", "qlora-load")}
    for (_stack, method), r in rows.items():
        assert "error" not in r, r
        assert r["step_s_median"] > 0 and r["peak_rss"] > 0
        assert abs(r["first_loss"] - math.log(128)) < 0.5  # the same fresh model on both sides
        assert (r["trainable_frac"] == 1.0) == (method == "full")
    assert rows[("ours", "qlora")]["model_bytes"] < rows[("ours", "full")]["model_bytes"] / 2
    # Straight into NF4 or quantised after loading: the same model, the same adapters, the same first loss.
    for key in ("model_bytes", "trainable", "first_loss") if has_load else ():
        assert rows[("ours", "qlora-load")][key] == pytest.approx(rows[("ours", "qlora")][key], rel=1e-6)
    assert rows[("peer", "qlora")]["model_class"] == "GPT2LMHeadModel"
    ratios = results["presets"]["gpt-tiny"]["ratios"]
    assert set(ratios) == {f"{s}_{m}_over_full_peak_rss" for s in bench.STACKS for m in ("lora", "qlora")} | (
        {"ours_qlora-load_over_full_peak_rss"} if has_load else set())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results["summary"]


def test_bench_decode_runs_every_contender(tmp_path):
    """Ours, transformers and llama.cpp (f32/f16 GGUF) decode the same greedy tokens from the same weights."""
    pytest.importorskip("llama_cpp")
    bench = load_script("bench_decode")
    out = tmp_path / "decode.json"
    results = bench.main(["--quick", "--new-tokens", "6", "--reps", "1", "--threads", "1", "--out", str(out)])
    [row] = results["presets"]
    assert "error" not in row, row
    for name in ("ours", "hf", "llama.cpp-f32", "llama.cpp-f16"):
        assert row[f"{name} tok/s"] > 0 and len(row["tokens"][name]) == 6
    # fp32 on both sides (llama.cpp's KV cache is f16, so only the first tokens are held to agreement)
    assert row["hf same tokens"] == "6/6"
    assert row["tokens"]["llama.cpp-f32"][:3] == row["tokens"]["ours"][:3]
    assert row["ours/hf"] > 0 and row["ours/llama.cpp-f32"] > 0
    assert json.loads(out.read_text())["presets"][0]["preset"] == "llama-tiny"
