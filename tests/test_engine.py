"""The batching engine against single-request generation (`byollm.generate.generate`, itself tested against
transformers): requests joining and leaving mid-run get the same tokens as alone; per-request parameters,
cancellation, the bounded queue, the asyncio front end, and weight-only int8 against the fp32 layer."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn as nn

from byollm.errors import ByollmError
from byollm.generate import generate
from byollm.model import GPT, preset
from byollm.sampling import GenerationError, SamplingParams
from byollm.serve.engine import AsyncEngine, Engine, QueueFull
from byollm.serve.int8 import Int8Linear
from byollm.tokenizer.bpe import BPETokenizer

PROMPTS = [[5, 17, 3, 99, 42, 7, 11], [64], [8, 9, 10, 11], [1, 2], [120, 3, 44, 9, 9, 31, 2, 6, 70, 71, 5]]


def tiny_model(name: str, **overrides) -> GPT:
    # init_std=0.2 as in test_generate: at 0.02 a random model repeats its last token and every comparison passes.
    torch.manual_seed(0)
    return GPT(preset(name, init_std=0.2, **overrides)).eval()


@pytest.fixture(scope="module", params=["gpt-tiny", "llama-tiny"])
def model(request) -> GPT:
    return tiny_model(request.param)


def byte_tokenizer() -> BPETokenizer:
    """id 0 = <|endoftext|> (eos), id 1 + b = byte b."""
    return BPETokenizer({i + 1: bytes([i]) for i in range(256)}, [], {"<|endoftext|>": 0})


def alone(model: GPT, prompt: list[int], params: SamplingParams, tokenizer=None):
    return generate(model, [prompt], params, tokenizer=tokenizer)[0]


def run_staggered(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict:
    """Submit arrivals[step] before that step; return request id -> (prompt, params, tokens, finish_reason)."""
    requests, step = {}, 0
    while step <= max(arrivals) or engine.has_work():
        for prompt, params in arrivals.get(step, []):
            requests[engine.add_request(prompt, params)] = [prompt, params, [], None]
        for out in engine.step():
            requests[out.request_id][2].append(out.token_id)
            requests[out.request_id][3] = out.finish_reason
        step += 1
    return requests


def test_greedy_requests_joining_at_different_steps_equal_each_alone(model):
    # 3 slots for 5 requests of different prompt lengths and lengths: some wait, join as others leave.
    engine = Engine(model, max_batch_size=3)
    arrivals = {0: [(PROMPTS[0], SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=())),
                    (PROMPTS[1], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=()))],
                2: [(PROMPTS[2], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=())),
                    (PROMPTS[3], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=()))],
                5: [(PROMPTS[4], SamplingParams(max_new_tokens=7, temperature=0, stop_token_ids=()))]}
    results = run_staggered(engine, arrivals)
    assert len(results) == 5
    for prompt, params, tokens, reason in results.values():
        assert tokens == alone(model, prompt, params).token_ids
        assert reason == "length"
    assert engine.num_running == 0 and engine.num_waiting == 0 and engine.cache.lengths == [0, 0, 0]


def test_offline_generate_matches_and_respects_the_queue(model):
    params = SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=())
    engine = Engine(model, max_batch_size=2, max_waiting=1)  # 5 prompts through a queue of 1
    assert engine.generate(PROMPTS, params) == [alone(model, p, params).token_ids for p in PROMPTS]


def test_seeded_sampling_is_per_request_and_matches_generate(model):
    sampled = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.3,
                             seed=1234, stop_token_ids=())
    other = SamplingParams(max_new_tokens=6, temperature=1.2, seed=7, stop_token_ids=())
    reference = alone(model, PROMPTS[0], sampled).token_ids
    # Alone, and sharing the batch with other sampled requests that arrive later: same tokens as generate.
    for arrivals in ({0: [(PROMPTS[0], sampled)]}, {0: [(PROMPTS[2], other)], 1: [(PROMPTS[0], sampled)],
                                                     3: [(PROMPTS[4], other)]}):
        results = run_staggered(Engine(model, max_batch_size=4), arrivals)
        assert [r[2] for r in results.values() if r[1] is sampled] == [reference]
    different_seed = SamplingParams(**{**sampled.__dict__, "seed": 99})
    assert Engine(model).generate([PROMPTS[0]], different_seed)[0] != reference


def test_per_request_stop_token_max_new_tokens_and_logprobs(model):
    greedy = alone(model, PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=())).token_ids
    stop_at = greedy[3]  # the 4th greedy token becomes a stop token
    engine = Engine(model, max_batch_size=4)
    stop = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[stop_at]))
    short = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=(),
                                                          logprobs=True))
    events: dict[str, list] = {stop: [], short: []}
    while engine.has_work():
        for out in engine.step():
            events[out.request_id].append(out)
    assert [o.token_id for o in events[stop]] == greedy[:greedy.index(stop_at) + 1]
    assert events[stop][-1].finish_reason == "stop"
    assert [o.token_id for o in events[short]] == greedy[:2] and events[short][-1].finish_reason == "length"
    assert [o.completion_tokens for o in events[short]] == [1, 2] and events[short][0].prompt_tokens == len(PROMPTS[0])
    # logprob of a greedy token = log-softmax of the model's own logits, computed here directly.
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert events[short][0].logprob == pytest.approx(torch.log_softmax(logits, -1)[greedy[0]].item(), abs=1e-4)


def test_stop_strings_and_text_match_generate():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", vocab_size=tok.vocab_size, init_std=0.2)).eval()
    prompt = tok.encode("Hello")
    free = alone(model, prompt, SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=()), tok)
    stop_string = free.text[4:6]  # something the model will produce
    engine = Engine(model, tok)
    for params in (SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=(), stop_strings=[stop_string]),
                   SamplingParams(max_new_tokens=20, temperature=0)):  # default stop: the tokenizer's eos
        rid = engine.add_request(prompt, params)
        outs = []
        while engine.has_work():
            outs += engine.step()
        expected = alone(model, prompt, params, tok)
        assert "".join(o.text for o in outs) == expected.text
        assert [o.token_id for o in outs] == expected.token_ids and outs[-1].finish_reason == expected.finish_reason
        assert all(o.request_id == rid for o in outs)


def test_cancel_frees_the_slot_immediately_and_the_next_request_gets_it(model):
    engine = Engine(model, max_batch_size=2)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=())
    a, b, c = (engine.add_request(p, params) for p in PROMPTS[:3])
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    engine.cancel(a)
    assert engine.num_running == 1  # freed before the next step
    engine.cancel("no-such-request")  # unknown ids are ignored
    outs = engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 0)  # c took a's slot
    assert {(o.request_id, o.finish_reason) for o in outs} == {(a, "cancelled"), (b, None), (c, None)}
    # b moved rows when a left; its tokens are still those of b alone.
    engine.cancel(c)
    tokens = [o.token_id for _ in range(30) for o in engine.step() if o.request_id == b]
    assert [engine.cancel(b), engine.num_running] == [None, 0]
    assert tokens == alone(model, PROMPTS[1], params).token_ids[2:]


def test_cancel_during_a_step_frees_the_slot_when_the_step_ends(model):
    engine = Engine(model, max_batch_size=2)
    params = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=())
    a, b = (engine.add_request(p, params) for p in PROMPTS[:2])
    engine.step()
    with engine._step_lock:  # as if another thread were inside step(): the cache must not change under it
        engine.cancel(a)
        assert engine.num_running == 1 and engine.cache.lengths[:2] == [len(PROMPTS[0]), len(PROMPTS[1])]
    outs = engine.step()
    assert (a, "cancelled") in {(o.request_id, o.finish_reason) for o in outs}
    assert engine.num_running == 1 and engine.cache.lengths[1] == 0
    assert [o.request_id for o in outs if o.token_id >= 0] == [b]


def test_bf16_model_runs_and_matches_generate_alone():
    model = tiny_model("llama-tiny").to(torch.bfloat16)
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=())
    engine = Engine(model)
    assert engine.cache.k[0].dtype == torch.bfloat16
    assert engine.generate([PROMPTS[0]], params) == [alone(model, PROMPTS[0], params).token_ids]


def test_full_queue_and_bad_requests_are_clear_errors(model):
    engine = Engine(model, max_batch_size=1, max_waiting=2, max_seq_len=32)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    engine.add_request([1], params)
    engine.add_request([2], params)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add_request([3], params)
    assert issubclass(QueueFull, ByollmError)
    with pytest.raises(GenerationError, match=r"prompt \(30 tokens\) \+ max_new_tokens \(4\) = 34 exceeds the "
                                              r"engine's max_seq_len \(32\)"):
        engine.check_request([1] * 30, params)
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        engine.check_request([10_000], params)
    with pytest.raises(GenerationError, match="empty"):
        engine.check_request([], params)
    with pytest.raises(GenerationError, match="stop_strings need a tokenizer"):
        engine.check_request([1], SamplingParams(max_new_tokens=4, stop_strings=["x"]))
    other = Engine(model)
    other.add_request([1], params, request_id="same")
    with pytest.raises(GenerationError, match="already in use"):
        other.add_request([1], params, request_id="same")


def test_async_engine_streams_and_leaving_early_cancels(model):
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=())

    async def main():
        engine = AsyncEngine(Engine(model, max_batch_size=2))
        await engine.start()

        async def collect(prompt):
            return [out.token_id async for out in engine.generate(prompt, params)]

        full = await asyncio.gather(collect(PROMPTS[0]), collect(PROMPTS[2]), collect(PROMPTS[3]))
        stream = engine.generate(PROMPTS[1], params)
        first = [await stream.__anext__(), await stream.__anext__()]
        assert engine.num_running == 1
        await stream.aclose()  # the client went away
        assert engine.num_running == 0
        # A task cancelled mid-stream (how a server sees a disconnect) cancels its request too.
        task = asyncio.create_task(collect(PROMPTS[4]))
        while engine.num_running == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.num_running == 0 and engine.num_waiting == 0
        with pytest.raises(GenerationError):
            engine.generate([], params)  # checked at once
        await engine.shutdown()
        return full, first

    full, first = asyncio.run(main())
    assert full == [alone(model, p, params).token_ids for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3])]
    assert [o.token_id for o in first] == alone(model, PROMPTS[1], params).token_ids[:2]


def test_async_shutdown_cancels_what_is_left_and_refuses_new_requests(model):
    long = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=())

    async def main():
        engine = AsyncEngine(Engine(model, max_batch_size=1))

        async def last(prompt):
            return [out async for out in engine.generate(prompt, long)][-1]

        tasks = [asyncio.create_task(last(p)) for p in PROMPTS[:2]]
        while engine.num_running == 0:
            await asyncio.sleep(0.001)
        await engine.shutdown(timeout=0.0)
        ends = await asyncio.gather(*tasks)
        with pytest.raises(QueueFull, match="shutting down"):
            await engine.generate([1], long).__anext__()
        return ends

    assert [e.finish_reason for e in asyncio.run(main())] == ["cancelled", "cancelled"]


def test_int8_linear_is_within_its_rounding_bound_of_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    q = Int8Linear.from_linear(linear)
    # Each weight moves by at most half a step (its row's max |w| / 254); codes stay in -127..127.
    row_max = linear.weight.abs().amax(dim=1, keepdim=True)
    assert ((q.dequantized_weight() - linear.weight).abs() <= row_max / 254 + 1e-7).all()
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() == 127
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = linear(x)
        rel = (q(x) - expected).norm() / expected.norm()
        assert rel < 0.01
        q.backend = "int8pack"
        assert torch.allclose(q(x), x @ q.dequantized_weight().T + linear.bias, atol=1e-5)
        # fbgemm also rounds the activations (7 bits): a looser bound.
        fast = Int8Linear.from_linear(linear, "fbgemm")
        assert (fast(x) - expected).norm() / expected.norm() < 0.03
    with pytest.raises(ByollmError, match="unknown int8 backend"):
        Int8Linear.from_linear(linear, "int4")


def test_engine_runs_int8_and_matches_generate_on_the_same_int8_model():
    model = tiny_model("llama-tiny")
    params = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=())
    engine = Engine(model, int8=True)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert engine.generate(PROMPTS[:3], params) == [alone(model, p, params).token_ids for p in PROMPTS[:3]]
    # The fast CPU backend: runs, every request gets its tokens (batched output may differ from alone: the rows
    # of a batch share one activation scale).
    fast = Engine(tiny_model("llama-tiny"), int8="fbgemm")
    assert [len(t) for t in fast.generate(PROMPTS[:3], params)] == [8, 8, 8]


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_transposed_weight_layout_gives_the_same_logits_and_greedy_tokens(name):
    """transpose_weights=True stores every linear weight as W^T (byollm.serve.layout): the same products summed
    in another order, so logits agree to float rounding and greedy tokens are the plain model's."""
    from byollm.serve.layout import TransposedLinear

    reference = tiny_model(name, tie_embeddings=True) if name == "gpt-tiny" else tiny_model(name)
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        expected = reference(x).logits
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=())
    greedy = [alone(reference, p, params).token_ids for p in PROMPTS[:3]]
    model = tiny_model(name, tie_embeddings=True) if name == "gpt-tiny" else tiny_model(name)
    engine = Engine(model, max_batch_size=2, transpose_weights=True)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, TransposedLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert engine.generate(PROMPTS[:3], params) == greedy
