"""The engine's fast decode path (byollm.serve.fast_decode) against `byollm.generate.generate` (itself tested
against transformers) on the real SmolLM2-135M-Instruct: the same greedy tokens, and the same tokens for a
request alone or in a batch of three; on a tiny Llama the same logits as the model's forward; the engine's
decode counters and weight bytes against a hand count."""

from __future__ import annotations

import copy

import pytest
import torch

from byollm.generate import generate
from byollm.model import GPT, preset
from byollm.sampling import SamplingParams
from byollm.serve.engine import Engine
from byollm.serve.fast_decode import FastDecodeError, decode_weight_bytes, fast_decoder
from byollm.serve.slot_cache import SlotKVCache

GREEDY = SamplingParams(max_new_tokens=32, temperature=0, stop_token_ids=())
QUESTIONS = ["Explain in a few sentences why the sky is blue.", "Write a haiku about the sea.",
             "What is 17 times 3? Answer briefly."]


@pytest.fixture(scope="module")
def smollm2(smollm2_ckpt):
    from byollm.checkpoint import load_checkpoint
    from byollm.tokenizer import chat_format

    loaded = load_checkpoint(smollm2_ckpt)
    chat = chat_format(loaded.tokenizer)
    prompts = [chat.encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    return loaded.model.eval(), prompts


@pytest.fixture(scope="module")
def fast_engine(smollm2):
    model, _ = smollm2
    return Engine(copy.deepcopy(model), max_batch_size=3, fast_decode=True)


@pytest.fixture(scope="module")
def fast_alone(smollm2, fast_engine):
    _, prompts = smollm2
    return [fast_engine.generate([p], GREEDY)[0] for p in prompts]


def test_fast_decode_gives_the_greedy_tokens_of_generate_on_the_real_model(smollm2, fast_alone):
    model, prompts = smollm2
    for prompt, tokens in zip(prompts[:2], fast_alone[:2], strict=True):
        assert tokens == generate(model, [prompt], GREEDY)[0].token_ids


def test_fast_decode_is_batch_invariant_on_the_real_model(smollm2, fast_engine, fast_alone):
    _, prompts = smollm2
    assert len({len(p) for p in prompts}) == 3  # rows of different lengths: the masked decode path
    assert fast_engine.generate(prompts, GREEDY) == fast_alone


def test_engine_counts_decode_steps_and_reads_every_weight_once(smollm2, fast_engine, fast_alone):
    model, _ = smollm2
    assert fast_engine.decode_steps >= 3 * (GREEDY.max_new_tokens - 1)
    assert fast_engine.decode_seconds > 0
    c = model.config
    layer = (c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.n_embd
             + 3 * c.n_embd * c.intermediate_size + 2 * c.n_embd)
    by_hand = 4 * (c.n_layer * layer + c.n_embd + c.vocab_size * c.n_embd + c.n_embd)  # + LM head + one table row
    assert fast_engine.weight_bytes == by_hand
    # The default path reads the same weights, the tied table once (the row looked up is part of what the head reads).
    assert decode_weight_bytes(model) == by_hand - 4 * c.n_embd


def test_fast_decode_logits_match_the_model_with_ragged_rows():
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", init_std=0.2, qkv_bias=True)).eval()
    c = model.config
    fast_model = copy.deepcopy(model)
    fast = fast_decoder(fast_model)
    caches = [SlotKVCache(c.n_layer, 2, 32, c.n_kv_head, c.head_dim) for _ in range(2)]
    with torch.inference_mode():
        for m, cache in zip((model, fast_model), caches, strict=True):  # prefill rows of 5 and 3 tokens
            for row, prompt in enumerate(([5, 7, 9, 11, 2], [3, 1, 4])):
                cache.bind(row, row + 1, len(prompt))
                m(torch.tensor([prompt]), kv_cache=cache)
        ids, positions = torch.tensor([8, 6]), torch.tensor(caches[0].lengths[:2])
        mask = (torch.arange(6)[None, :] <= positions[:, None])[:, None, None, :]
        for cache in caches:
            cache.bind(0, 2, 1)
        expected = model(ids[:, None], attention_mask=mask, position_ids=positions[:, None],
                         kv_cache=caches[0]).logits[:, -1]
        got = fast(ids, positions, caches[1], mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert caches[1].lengths[:2] == caches[0].lengths[:2] == [6, 4]


def test_fast_decode_refuses_a_gpt2_style_model():
    with pytest.raises(FastDecodeError, match="Llama-style"):
        fast_decoder(GPT(preset("gpt-tiny")))


def test_metrics_report_the_decode_weight_bandwidth():
    from byollm.serve.guards import Metrics

    torch.manual_seed(0)
    engine = Engine(GPT(preset("llama-tiny")).eval(), fast_decode=True)
    metrics = Metrics(engine)
    assert b"byollm_decode_weight_bytes_per_second 0.0" in metrics.render()
    engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=()))
    line = next(x for x in metrics.render().decode().splitlines() if x.startswith("byollm_decode_weight_bytes"))
    assert float(line.split()[1]) == pytest.approx(
        engine.weight_bytes * engine.decode_steps / engine.decode_seconds, rel=1e-6)
