"""`byollm finetune` (full, LoRA, DoRA, QLoRA on the SFT recipe), `byollm merge`, and `load_quantized` (a checkpoint
read straight into NF4) on a tiny Llama-style model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_chat_base

from byollm.checkpoint import load_checkpoint, save_checkpoint
from byollm.cli import main
from byollm.finetune import load_adapter, quantize_model
from byollm.finetune.load import load_quantized
from byollm.finetune.recipe import FinetuneTrainConfig, finetune
from byollm.interop.hf import export_hf
from byollm.model import GPT, resize_token_embeddings
from byollm.tokenizer import chat_format, load_tokenizer


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama-style checkpoint whose tokenizer has no chat tokens yet, and an Alpaca-style file."""
    d = tmp_path_factory.mktemp("finetune")
    records = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"Word {i} is bread."}
               for i in range(40)]
    (d / "sft.json").write_text(json.dumps(records))
    return tiny_chat_base(d)


def _args(out: Path, name: str) -> list[str]:
    return ["--max_steps", "2", "--batch_size", "4", "--device", "cpu", "--dtype", "fp32", "--out_dir", str(out),
            "--name", name, "--lr", "1e-2", "--warmup_steps", "1", "--eval_interval", "0", "--log_interval", "1",
            "--align.max_len", "96", "--align.eval_batch_size", "8", "--align.max_val", "4",
            "--align.sample_prompts", "[]"]


def test_load_quantized_equals_quantize_model(base: Path, tmp_path: Path) -> None:
    x = torch.randint(0, 300, (2, 12))
    expected = _logits(quantize_model(load_checkpoint(base).model), x)
    loaded = load_quantized(base)
    assert loaded.tokenizer is not None and not any(p.requires_grad for p in loaded.model.parameters())
    assert torch.equal(_logits(loaded.model, x), expected)  # the same NF4 codes and fp32 weights, bit for bit
    hf = export_hf(load_checkpoint(base).model, tmp_path / "hf", load_checkpoint(base).tokenizer)
    assert torch.equal(_logits(load_quantized(hf).model, x), expected)  # an imported HF directory too


def test_safetensors_reader_matches_the_library_and_refuses_damaged_files(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from byollm.errors import CheckpointError
    from byollm.finetune.load import SafetensorsReader

    tensors = {"w": torch.randn(3, 5), "h": torch.randn(4).to(torch.bfloat16), "i": torch.arange(6).view(2, 3),
               "e": torch.zeros(0, 2), "s": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "t.safetensors")
    reference = load_file(tmp_path / "t.safetensors")
    with SafetensorsReader(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k in tensors:
            got = f.get_tensor(k)
            assert got.dtype == reference[k].dtype and torch.equal(got, reference[k])
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with SafetensorsReader(tmp_path / "cut.safetensors") as f, pytest.raises(CheckpointError, match="truncated"):
        for k in f.keys():
            f.get_tensor(k)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        SafetensorsReader(tmp_path / "junk.safetensors")


def test_lora_finetune_merge_export(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = base.parent / "sft.json"
    assert main(["finetune", str(base), "--method", "lora", "--data", str(data), "--lora.r", "4",
                 *_args(tmp_path, "lora")]) == 0
    err = capsys.readouterr().err
    assert "finetune lora: training" in err and "%)" in err
    adapter = tmp_path / "lora" / "adapter"
    meta = json.loads((adapter / "finetune.json").read_text())
    assert meta["method"] == "lora" and meta["lora"]["r"] == 4 and 0 < meta["trainable_fraction"] < 0.2
    assert (adapter / "adapter_config.json").is_file() and not list((tmp_path / "lora").glob("checkpoints/step-*"))

    assert main(["merge", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    merged = load_checkpoint(tmp_path / "merged").model
    # The reference: the base with the run's vocabulary and the adapter on top, unmerged.
    model = load_checkpoint(base).model
    resize_token_embeddings(model, load_tokenizer(adapter / "tokenizer").vocab_size)
    load_adapter(model, adapter)
    assert any(m.lora_B.abs().sum() > 0 for n, m in model.named_modules() if n.endswith("q_proj"))  # it trained
    x = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(_logits(merged, x), _logits(model.eval(), x), atol=1e-5, rtol=1e-5)
    assert main(["export", "hf", str(tmp_path / "merged"), str(tmp_path / "merged-hf")]) == 0


@pytest.mark.parametrize("variant", ["qlora", "qlora-bitsandbytes", "dora", "full"])
def test_other_methods(variant: str, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    method, _, backend = variant.partition("-")
    a = _args(tmp_path, method)
    overrides = {k.removeprefix("--"): v for k, v in zip(a[::2], a[1::2], strict=True)}
    overrides["align.sample_prompts"] = []
    if method == "full":
        overrides["lr"] = "1e-3"  # every weight moves: a smaller step
    lora = {"r": 4, "quant_backend": backend} if backend else {"r": 4}
    if backend == "bitsandbytes":  # not down_proj (160 inputs): bitsandbytes' AVX-512 kernel refuses it (test_nf4)
        lora["targets"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]
    cfg = FinetuneTrainConfig.from_dict({**_nested(overrides), "method": method, "lora": lora,
                                         "align": {**_nested(overrides)["align"], "base": str(base),
                                                   "dataset": str(base.parent / "sft.json")}})
    result = finetune(cfg, progress=False)
    assert result.steps == 2 and result.after["loss"] < result.before["loss"]
    err = capsys.readouterr().err
    assert f"finetune {method}: training" in err
    if method == "full":
        assert "(100.00%)" in err and load_checkpoint(result.run_dir).model.num_params() > 0
    else:
        meta = json.loads((result.checkpoint / "finetune.json").read_text())
        assert result.checkpoint == result.run_dir / "adapter" and meta["trainable_fraction"] < 0.2
        # The total is the base model's parameter count (resized to the chat vocabulary) plus the adapters,
        # however the base is stored (fp32, our NF4, bitsandbytes' packed Linear4bit).
        vocab = load_tokenizer(result.checkpoint / "tokenizer").vocab_size
        base_model = resize_token_embeddings(load_checkpoint(base).model, vocab)
        assert meta["total_params"] == base_model.num_params() + meta["trainable_params"]
        config = json.loads((result.checkpoint / "adapter_config.json").read_text())
        assert config["use_dora"] == (method == "dora") and config["r"] == 4


def _nested(flat: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})  # type: ignore[assignment]
        node[leaf] = value  # type: ignore[index]
    return out


def test_merge_onto_the_wrong_base_is_one_clear_line(base: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = base.parent / "sft.json"
    assert main(["finetune", str(base), "--method", "lora", "--data", str(data), *_args(tmp_path, "run")]) == 0
    loaded = load_checkpoint(base)
    small = GPT(dataclasses.replace(loaded.model.config, n_layer=1))
    other = save_checkpoint(small, tmp_path / "other", loaded.tokenizer)
    capsys.readouterr()
    assert main(["merge", str(other), str(tmp_path / "run" / "adapter"), str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not have" in err and "n_layer=1" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora"])
def test_the_shipped_finetune_recipe_parses_for_every_method(method: str) -> None:
    from byollm.cli import build_parser

    repo = Path(__file__).resolve().parents[1]
    ns = build_parser().parse_args(["finetune", "base/ckpt", "--config", str(repo / "configs/finetune-alpaca-cpu.yaml"),
                                    "--method", method])
    assert ns.finetune.method == method


# --------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (the packaged GGUF, converted once per session in conftest)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret_word_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 Alpaca-style records with one answer the real model cannot know before training."""
    path = tmp_path_factory.mktemp("real") / "secret.json"
    records = [{"instruction": f"Question {i}: what is the secret word?", "input": "",
                "output": "The secret word is zanzibar-quartz."} for i in range(40)]
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_the_real_model(method: str, smollm2_ckpt: Path, secret_word_data: Path, tmp_path: Path) -> None:
    """LoRA / QLoRA (base in Q4_1) on the real SmolLM2 in its own ChatML template: no token is added (the
    vocabulary and the embedding stay 49,152) and a few steps teach the held-out records' answer (their loss
    falls by over 0.5)."""
    a = _args(tmp_path, method)
    overrides = _nested({k.removeprefix("--"): v for k, v in zip(a[::2], a[1::2], strict=True)})
    overrides.update(lr="2e-3", max_steps="4")
    align = {**overrides.pop("align"), "base": str(smollm2_ckpt), "dataset": str(secret_word_data)}
    lora = {"r": 8, "quant_type": "q4_1"} if method == "qlora" else {"r": 8}
    cfg = FinetuneTrainConfig.from_dict({**overrides, "method": method, "lora": lora, "align": align})
    result = finetune(cfg, progress=False)
    assert result.after["loss"] < result.before["loss"] - 0.5, (result.before, result.after)
    tok = load_tokenizer(result.checkpoint / "tokenizer")
    assert tok.vocab_size == 49152 and "<|user|>" not in tok.special_tokens and chat_format(tok).name == "ChatML"
    meta = json.loads((result.checkpoint / "finetune.json").read_text())
    assert meta["total_params"] == load_checkpoint(smollm2_ckpt).model.num_params() + meta["trainable_params"]


def test_q4_1_keeps_the_real_model_and_nf4_does_not(smollm2_ckpt: Path) -> None:
    """QLoRA's base for a model imported from a Q4_1 GGUF: in Q4_1 (`lora.quant_type q4_1`) it is the fp32 model
    (the same loss on a real chat, to 1e-4), while NF4 rounds the Q4_1 values a second time and costs real loss
    (measured 3.28 -> 4.05 nats): why the real-model recipe uses q4_1."""
    loaded = load_checkpoint(smollm2_ckpt)
    chat = [{"role": "user", "content": "Give three tips for staying healthy."},
            {"role": "assistant", "content": "1. Eat a balanced diet with fruit and vegetables. 2. Exercise "
                                             "regularly. 3. Get enough sleep every night."}]
    ids = torch.tensor([chat_format(loaded.tokenizer).encode_chat(chat)[0]])

    def loss(model: torch.nn.Module) -> float:
        logits = _logits(model, ids[:, :-1])
        logits = logits.logits if hasattr(logits, "logits") else logits
        return torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()

    fp32 = loss(loaded.model.eval())
    del loaded
    q4_1 = loss(load_quantized(smollm2_ckpt, quant_type="q4_1").model)
    nf4 = loss(load_quantized(smollm2_ckpt).model)
    assert abs(q4_1 - fp32) < 1e-4, (fp32, q4_1)
    assert nf4 > fp32 + 0.2, (fp32, nf4)
