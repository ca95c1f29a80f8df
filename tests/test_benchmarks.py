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
