"""Prefix caching, chunked prefill and shared prefills in the batching engine, against single-request
generation (`byollm.generate.generate`, itself tested against transformers): a request that starts from cached
keys, or whose prompt goes in a chunk at a time, gets the tokens it gets alone; running streams keep getting a
token every step while a long prompt is prefilled; n requests with one prompt cost one prefill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from byollm.errors import ByollmError
from byollm.generate import generate
from byollm.model import GPT, preset
from byollm.sampling import SamplingParams
from byollm.serve.engine import Engine
from byollm.serve.prefix_cache import MIN_PREFIX_TOKENS, longest_prefix

SYSTEM = [(7 * i + 3) % 120 + 1 for i in range(24)]  # a 24-token "system prompt" (> MIN_PREFIX_TOKENS)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())


@pytest.fixture(scope="module", params=["gpt-tiny", "llama-tiny"])
def model(request) -> GPT:
    torch.manual_seed(0)  # init_std=0.2: at 0.02 a random model repeats its last token and every comparison passes
    return GPT(preset(request.param, init_std=0.2)).eval()


def alone(model: GPT, prompt: list[int], params: SamplingParams) -> list[int]:
    return generate(model, [prompt], params)[0].token_ids


def run(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> tuple[dict, list]:
    """Submit arrivals[step] before that step. Return id -> (prompt, params, tokens) and the events per step."""
    requests, steps, step = {}, [], 0
    while step <= max(arrivals) or engine.has_work():
        for prompt, params in arrivals.get(step, []):
            requests[engine.add_request(prompt, params)] = (prompt, params, [])
        outs = engine.step()
        for out in outs:
            requests[out.request_id][2].append(out.token_id)
        steps.append(outs)
        step += 1
    return requests, steps


def test_longest_prefix_caps_at_one_token_short_of_the_prompt():
    rows = {0: [1, 2, 3, 4], 1: [1, 2, 9], 2: []}
    assert longest_prefix([1, 2, 3, 4, 5], rows) == (0, 4)
    assert longest_prefix([1, 2, 3, 4], rows) == (0, 3)  # the whole prompt is cached: its last token still runs
    assert longest_prefix([5, 1], rows) == (-1, 0)


def test_prefix_hits_give_the_tokens_of_a_cold_engine(model):
    # Two slots for six prompts sharing a system prompt: later ones start from a running request's row (a copy)
    # or from a finished one's retained row; one prompt is a strict prefix of another, one is another's twin.
    long = SYSTEM + [50, 51, 52, 53, 54, 55]
    prompts = [SYSTEM + [9, 8, 7], long, SYSTEM + [9, 8, 7], SYSTEM + [60], long[:27], SYSTEM + [9, 8, 7, 6, 5]]
    lengths = [6, 4, 5, 7, 3, 6]
    arrivals = {0: [(prompts[0], greedy(lengths[0]))], 1: [(prompts[1], greedy(lengths[1]))],
                3: [(p, greedy(n)) for p, n in zip(prompts[2:], lengths[2:], strict=True)]}
    engine = Engine(model, max_batch_size=2)
    results, _ = run(engine, arrivals)
    for prompt, params, tokens in results.values():
        assert tokens == alone(model, prompt, params)
    stats = engine.prefill_stats
    assert stats.prefix_hits == 5 and stats.prefix_hit_tokens >= 5 * len(SYSTEM)
    assert stats.computed_tokens + stats.prefix_hit_tokens == sum(map(len, prompts))
    cold = Engine(model, max_batch_size=2, prefix_caching=False)
    assert [t for _, _, t in run(cold, arrivals)[0].values()] == [t for _, _, t in results.values()]
    assert cold.prefill_stats.prefix_hits == 0 and cold.prefill_stats.computed_tokens == sum(map(len, prompts))


def test_a_finished_requests_row_is_reused(model):
    engine = Engine(model, max_batch_size=3)
    first = SYSTEM + [3, 3]
    assert engine.generate([first], greedy(4))[0] == alone(model, first, greedy(4))
    # Its row kept prompt + the 3 tokens fed back; a conversation continuing from that reuses all of it.
    follow_up = first + alone(model, first, greedy(4)) + [11, 12]
    assert engine.generate([follow_up], greedy(5))[0] == alone(model, follow_up, greedy(5))
    assert engine.prefill_stats.prefix_hit_tokens == len(first) + 3
    # Too short a shared start is computed again.
    engine.generate([SYSTEM[:MIN_PREFIX_TOKENS - 1] + [1]], greedy(2))
    assert engine.prefill_stats.prefix_hits == 1


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_prefill_gives_the_tokens_of_whole_prefill(model, chunk):
    prompts = [SYSTEM + list(range(100, 120)), [5, 6, 7], list(range(30, 70)), [9] * 13]
    arrivals = {0: [(prompts[0], greedy(6)), (prompts[1], greedy(8))], 2: [(prompts[2], greedy(5))],
                3: [(prompts[3], greedy(7))]}
    whole, _ = run(Engine(model, max_batch_size=3, prefix_caching=False, prefill_chunk_tokens=None), arrivals)
    chunked, _ = run(Engine(model, max_batch_size=3, prefix_caching=False, prefill_chunk_tokens=chunk), arrivals)
    assert [t for _, _, t in chunked.values()] == [t for _, _, t in whole.values()]
    for prompt, params, tokens in chunked.values():
        assert tokens == alone(model, prompt, params)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_is_prefilled(model):
    long = list(range(1, 51))
    arrivals = {0: [([5, 6, 7], greedy(30)), ([8, 9], greedy(30))], 2: [(long, greedy(3))]}
    engine = Engine(model, max_batch_size=3, prefill_chunk_tokens=8)
    results, steps = run(engine, arrivals)
    long_id = next(i for i, (p, _, _) in results.items() if p == long)
    first = next(s for s, outs in enumerate(steps) if any(o.request_id == long_id for o in outs))
    assert first == 2 + 50 // 8  # 7 chunks: 6 of 8 tokens, then 2 tokens and the first token
    for outs in steps[1:first + 1]:  # every step meanwhile gave both running streams a token
        assert sorted(o.request_id for o in outs if o.request_id != long_id) == ["req-0", "req-1"]
    assert results[long_id][2] == alone(model, long, greedy(3))
    assert engine.num_running == 0 and engine.cache.lengths == [0, 0, 0]
    whole = Engine(model, max_batch_size=3, prefill_chunk_tokens=None)
    _, steps = run(whole, arrivals)
    assert any(o.request_id == "req-2" for o in steps[2])  # unchunked: the first token in the arrival step


def test_n_requests_with_one_prompt_cost_one_prefill(model):
    prompt = SYSTEM + [42, 43, 44]
    for chunk in (None, 8):
        engine = Engine(model, max_batch_size=4, prefill_chunk_tokens=chunk)
        seeded = [SamplingParams(max_new_tokens=6, temperature=1.0, seed=i, stop_token_ids=()) for i in range(4)]
        assert engine.generate([prompt] * 4, seeded) == [alone(model, prompt, p) for p in seeded]
        assert engine.prefill_stats.computed_tokens == len(prompt)  # once, not 4 times
        assert engine.prefill_stats.prefix_hit_tokens == 3 * len(prompt)


def test_cancelling_a_prefilling_request_frees_its_slot_and_keeps_its_prefix(model):
    engine = Engine(model, max_batch_size=2, prefill_chunk_tokens=8)
    prompt = SYSTEM + list(range(60, 80))
    a = engine.add_request(prompt, greedy(4))
    engine.step()
    engine.step()  # 16 of its 44 tokens are in
    assert engine.num_running == 1
    engine.cancel(a)
    assert engine.num_running == 0 and engine.cache.lengths == [0, 0]
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [(a, "cancelled")]
    assert engine.generate([prompt], greedy(4))[0] == alone(model, prompt, greedy(4))
    assert engine.prefill_stats.prefix_hit_tokens == 16


def test_settings_and_metrics_show_the_prefill_counters(model):
    from byollm.serve.guards import Metrics
    from byollm.serve.settings import ServeConfig

    for bad in (lambda: ServeConfig(prefill_chunk_tokens=0), lambda: Engine(model, prefill_chunk_tokens=0)):
        with pytest.raises(ByollmError, match="prefill_chunk_tokens"):
            bad()
    engine = Engine(model, max_batch_size=2)
    engine.generate([SYSTEM + [1], SYSTEM + [2]], greedy(2))
    text = Metrics(engine).render().decode()
    assert "byollm_prefix_cache_hits_total 1.0" in text
    assert f"byollm_prefix_cache_hit_tokens_total {float(len(SYSTEM))}" in text
    assert f"byollm_prefill_tokens_total {float(len(SYSTEM) + 2)}" in text


def test_real_model_with_a_shared_system_prompt(smollm2_ckpt: Path):
    from byollm.checkpoint import load_checkpoint

    loaded = load_checkpoint(smollm2_ckpt)
    tok = loaded.tokenizer
    system = tok.encode("You are a helpful assistant. Answer in one short sentence, be precise and do not repeat the "
                        "question.\nQuestion: ")
    prompts = [system + tok.encode(q) for q in ("What is the capital of France?", "What colour is the sky?")]
    engine = Engine(loaded.model, tok, max_batch_size=2, max_seq_len=64, prefill_chunk_tokens=16)
    expected = [alone(loaded.model, p, greedy(4)) for p in prompts]
    assert engine.generate(prompts + prompts[:1], greedy(4)) == expected + expected[:1]
    assert engine.prefill_stats.prefix_hits == 2  # the second question, and the first one again
