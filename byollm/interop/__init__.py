"""Interoperability with other ecosystems. `byollm.interop.hf`: Hugging Face checkpoints and transformers models;
`byollm.interop.trl`: TRL's SFTTrainer and DPOTrainer on an exported model (the `align` extra);
`byollm.interop.gguf`: one GGUF file for llama.cpp / Ollama (the `gguf` extra).

Nothing here is imported by the rest of byollm at import time, so `transformers` stays optional: reading and
writing Hugging Face *directories* needs only torch and safetensors; converting in-memory `transformers` models
(`from_hf_model`, `to_hf_model`) needs the `hf` extra.
"""
