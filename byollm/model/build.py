"""Build a `GPT` from a config and a state dict, without paying for a random initialisation first.

Used wherever weights come from somewhere else: a byollm checkpoint (`byollm.checkpoint`), a Hugging Face
directory or an in-memory transformers model (`byollm.interop.hf`). It needs only the model and torch, so
both can import it without importing each other.
"""

from __future__ import annotations

import torch

from byollm.errors import CheckpointError
from byollm.model.config import ModelConfig
from byollm.model.model import GPT, rope_inverse_frequencies


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> GPT:
    """A model with the given weights, without paying for a random initialisation first.

    Built on the meta device (no memory), materialised empty, then filled from `state_dict`
    (or randomly initialised when there is none)."""
    with torch.device("meta"):
        model = GPT(config)
    if state_dict is None:
        model = model.to_empty(device=device)
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        model.reset_parameters()
    else:
        state_dict = dict(state_dict)
        if config.tie_embeddings:
            # The same tensor as tok_emb.weight. safetensors' save_model stores a shared tensor under one
            # name only, the alphabetically first: lm_head.weight. So it may be the one that is there.
            lm_head = state_dict.pop("lm_head.weight", None)
            if lm_head is not None and "tok_emb.weight" not in state_dict:
                state_dict["tok_emb.weight"] = lm_head
        expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_embeddings else set())
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise CheckpointError(
                "weights do not fit the config: "
                + (f"missing {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
                + (f"unexpected {sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}" if unexpected else "")
                + "; is config.json from the same model as the weights?")
        for name, tensor in model.state_dict().items():
            if name in state_dict and state_dict[name].shape != tensor.shape:
                raise CheckpointError(f"weight {name} has shape {tuple(state_dict[name].shape)} but the config "
                                      f"needs {tuple(tensor.shape)}; is config.json from the same model?")
        # assign=True: the loaded tensors BECOME the parameters (no second copy of the weights in memory),
        # in the model's dtype (fp32 unless asked) as a plain model would hold them.
        want = dtype or torch.float32
        state_dict = {k: _own_storage(v.to(device=device, dtype=want) if v.is_floating_point() else v.to(device))
                      for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=False, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_emb.weight
        if config.pos_embedding == "rope":  # a non-persistent buffer, still on the meta device
            model.rope_inv_freq = rope_inverse_frequencies(config).to(device)
        still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if still_meta:
            raise CheckpointError(f"weights do not fit the config: no values for {still_meta[:5]}")
    if dtype is not None:
        model = model.to(dtype=dtype)
    return model


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when it is a whole, contiguous tensor; else a compact copy. Converted HF weights can be
    transposed views or slices of a fused tensor (GPT-2's c_attn); as parameters those would break .view()
    and safetensors' shared-storage check."""
    whole = t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole else t.clone(memory_format=torch.contiguous_format)


__all__ = ["build_model"]
