"""Q4_1 (llama.cpp's 4-bit block format) as a frozen QLoRA layer: byte for byte against the `gguf` library's
reference quantiser and against a real Q4_1 file, and lossless on weights that are Q4_1 values already."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from byollm.checkpoint import load_checkpoint
from byollm.errors import ByollmError
from byollm.finetune.load import load_quantized
from byollm.finetune.q4 import Q4_1_BYTES, Q4_1Linear, dequantize_q4_1, q4_1_bytes, quantize_q4_1

gguf = pytest.importorskip("gguf")


def test_quantise_and_dequantise_equal_the_gguf_library() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3  # rows of different scales
    w[0, :32] = 0.25  # a constant block: d = 0, every code 0
    layer = Q4_1Linear(96, 48, bias=False).load_weight(w)
    reference = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1)
    assert reference.shape == (48, 96 // 32 * Q4_1_BYTES)
    assert q4_1_bytes(layer) == reference.tobytes()
    ours = layer.dequantized_weight()
    theirs = gguf.quants.dequantize(reference, gguf.GGMLQuantizationType.Q4_1)
    assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs)))
    # Q4_1 is a 16-level grid from each block's min to its max: half a step from the weight at most, plus the
    # fp16 rounding of the step d (times up to 15) and of the minimum m (half an fp16 ulp each: 2^-11 relative).
    blocks = w.reshape(-1, 32)
    step, low = (blocks.amax(1) - blocks.amin(1)) / 15, blocks.amin(1)
    bound = step / 2 + (15 * step + low.abs()) * 2**-11 + 1e-7
    assert ((ours - w).abs().reshape(-1, 32).amax(1) <= bound).all()


def test_requantising_q4_1_values_is_lossless() -> None:
    torch.manual_seed(1)
    once = dequantize_q4_1(**quantize_q4_1(torch.randn(64, 128)), shape=(64, 128))
    again = quantize_q4_1(once)
    assert torch.equal(dequantize_q4_1(**again, shape=(64, 128)), once)


def test_layer_forward_backward_and_errors() -> None:
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 32)
    layer = Q4_1Linear.from_linear(linear)
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    expected = torch.nn.functional.linear(x, layer.dequantized_weight(), linear.bias)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight().sum(0).expand(3, 64))
    assert not any(p.requires_grad for p in layer.parameters())
    assert sum(b.numel() * b.element_size() for b in layer.buffers()) == 64 * 32 // 32 * Q4_1_BYTES
    with pytest.raises(ByollmError, match="multiple of 32"):
        Q4_1Linear(48, 8)


def test_the_real_model_in_q4_1_is_the_files_own_weights(smollm2_gguf: Path, smollm2_ckpt: Path) -> None:
    """Re-quantising the converted SmolLM2 (Q4_1 values, dequantised to fp32) gives back the GGUF file's blocks
    byte for byte (v_proj and the MLP: the layers whose rows the RoPE permutation leaves alone), and the model
    in Q4_1 computes the fp32 model's logits."""
    reader = gguf.GGUFReader(str(smollm2_gguf))
    raw = {t.name: t for t in reader.tensors}
    model = load_quantized(smollm2_ckpt, quant_type="q4_1").model
    checked = 0
    for ours, theirs in (("attn.v_proj", "attn_v"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                         ("mlp.down_proj", "ffn_down")):
        for i in (0, 29):
            tensor = raw[f"blk.{i}.{theirs}.weight"]
            if tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
                continue
            layer = model.get_submodule(f"blocks.{i}.{ours}")
            assert isinstance(layer, Q4_1Linear)
            assert q4_1_bytes(layer) == np.asarray(tensor.data).tobytes(), (i, ours)
            checked += 1
    assert checked >= 6
    fp32 = load_checkpoint(smollm2_ckpt).model.eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 4079, 30]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fp32(ids).logits, atol=2e-4, rtol=0)
