"""LoRA/DoRA (byollm.finetune.lora) against PEFT: adapter files in both directions, DoRA, merging, wrong bases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from byollm.checkpoint import build_model
from byollm.errors import ByollmError, CheckpointError
from byollm.finetune import (
    ATTENTION,
    MLP,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_and_unload,
    merge_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from byollm.interop.hf import to_hf_model
from byollm.model import GPT, preset

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def random_base(seed: int = 0, **overrides) -> GPT:
    """llama-tiny with weights large enough that every layer matters (N(0, 0.15), norms 1 + N(0, 0.2))."""
    torch.manual_seed(seed)
    model = GPT(preset("llama-tiny", **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p) if p.dim() > 1 else 1 + 0.2 * torch.randn_like(p))
    return model.eval()


def clone(model: GPT) -> GPT:
    return build_model(model.config, {k: v.clone() for k, v in model.state_dict().items()}).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Nonzero B (and a perturbed DoRA magnitude) so the adapters change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("use_dora", [False, True])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, use_dora):
    model = random_base()
    hf = to_hf_model(model)
    apply_lora(model, r=4, alpha=8, targets=ATTENTION + MLP, use_dora=use_dora)
    # A few real training steps, so A, B (and m) are all trained values.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(3):
        model(IDS[:, :-1], IDS[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(m.lora_B.abs().max() > 0 for m in lora_modules(model).values())
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(ATTENTION + MLP) and config["use_dora"] is use_dora

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, peft_model(input_ids=IDS).logits
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(input_ids=IDS).logits
    assert max_diff(ours, base) > 1e-2  # the adapter does something
    assert max_diff(ours, theirs) < 1e-4


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path, use_dora):
    base = random_base(seed=3)
    hf = to_hf_model(base)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=use_dora,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, config)
    randomize_adapters(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "peft")

    model = load_adapter(clone(base), tmp_path / "peft")
    targets = {n.rsplit(".", 1)[-1] for n in lora_modules(model)}
    assert targets == {"q_proj", "v_proj", "down_proj"} and len(lora_modules(model)) == 6
    with torch.no_grad():
        theirs = peft_model(input_ids=IDS).logits
        assert max_diff(model(IDS).logits, base(IDS).logits) > 1e-2
        assert max_diff(model(IDS).logits, theirs) < 1e-4


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_matches_unmerged_and_unmerge_restores_the_base(use_dora):
    model = random_base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, targets="all-linear", use_dora=use_dora)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(IDS).logits
        merge_lora(model)
        assert max_diff(model(IDS).logits, unmerged) < 1e-4
        unmerge_lora(model)
        for name, m in lora_modules(model).items():
            assert max_diff(m.weight, original[name + ".weight"]) < 1e-5
        assert max_diff(model(IDS).logits, unmerged) < 1e-5
        plain = merge_and_unload(model)
        assert not lora_modules(plain) and set(plain.state_dict()) == set(original)
        assert max_diff(plain(IDS).logits, unmerged) < 1e-4


def test_only_adapters_train_and_the_fraction_is_reported():
    model = random_base()
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=4, alpha=8)  # q, k, v, o
    c = model.config
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    per_layer = 4 * ((c.n_embd + q) + 2 * (c.n_embd + kv) + (q + c.n_embd))
    trainable, total = trainable_parameters(model)
    assert trainable == c.n_layer * per_layer and total == total_before + trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}
    model.train()
    model(IDS[:, :-1], IDS[:, 1:]).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    m = model.blocks[0].attn.q_proj
    assert isinstance(m, LoRALinear) and m.scaling == 2.0 and not m.lora_B.any()


def test_lora_linear_is_the_low_rank_formula():
    """A hand-written check independent of PEFT: y = W x + b + (alpha/r) B A x, and B = 0 at the start."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    lora = LoRALinear(linear, r=2, alpha=6)
    assert torch.equal(lora(x), linear(x))
    torch.nn.init.normal_(lora.lora_B)
    expected = x @ linear.weight.T + linear.bias + 3.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    assert max_diff(lora(x), expected) < 1e-5


def test_adapter_for_the_wrong_base_fails_clearly(tmp_path):
    model = apply_lora(random_base(), r=4, alpha=8)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"shape \(4, 64\) but blocks\.0\.attn\.\w_proj needs \(4, 32\).*n_embd"):
        load_adapter(random_base(n_embd=32), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"no weights for model.layers.2.*n_layer=3.*fewer layers"):
        load_adapter(random_base(n_layer=3), tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"adapts 'model.layers.1.*n_layer=1.*depth"):
        load_adapter(random_base(n_layer=1), tmp_path / "a")
    with pytest.raises(CheckpointError, match="GPT-2 fuses q, k and v"):
        load_adapter(GPT(preset("gpt-tiny")), tmp_path / "a")
    # A GPT-2 adapter as PEFT writes it, onto a Llama model: the class, or failing that the module names, differ.
    gpt2_dir = tmp_path / "gpt2"
    gpt2_dir.mkdir()
    save_file({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": torch.zeros(192, 4)},
              str(gpt2_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True,
              "auto_mapping": {"base_model_class": "GPT2LMHeadModel"}}
    (gpt2_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="made for a GPT2LMHeadModel but the model is a llama model"):
        load_adapter(random_base(), gpt2_dir)
    del config["auto_mapping"], config["fan_in_fan_out"]
    (gpt2_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"adapts 'transformer.h.0.attn.c_attn'.*different architecture"):
        load_adapter(random_base(), gpt2_dir)


def test_user_errors():
    with pytest.raises(ByollmError, match="no linear layer"):
        apply_lora(random_base(), targets=("nope",))
    with pytest.raises(ByollmError, match="tied to the token embeddings"):
        apply_lora(GPT(preset("llama-tiny", tie_embeddings=True)), targets=("q_proj", "lm_head"))
    with pytest.raises(ByollmError, match="already has LoRA"):
        apply_lora(apply_lora(random_base()))
