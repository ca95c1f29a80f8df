"""Section 1: the Transformer. `GPT` is the model, `ModelConfig` describes it, presets name common shapes;
`RewardModel` puts a scalar head on it; `build_model` fills a model from a state dict."""

from byollm.model.build import build_model
from byollm.model.config import PRESETS, ModelConfig, list_presets, preset
from byollm.model.heads import RewardModel
from byollm.model.model import GPT, KVCache, ModelOutput, position_ids_from_mask, resize_token_embeddings

__all__ = ["GPT", "KVCache", "ModelConfig", "ModelOutput", "PRESETS", "RewardModel", "build_model", "list_presets",
           "preset", "position_ids_from_mask", "resize_token_embeddings"]
