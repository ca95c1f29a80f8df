"""Text generation: sampling filters against hand-computed values, KV cache == recompute, batched == alone,
stopping and streaming, and our greedy decoding == transformers' generate on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from byollm.generate import generate, generate_text, iter_generate, stream_text
from byollm.model import GPT, preset
from byollm.sampling import (
    MIN_TEMPERATURE,
    GenerationError,
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    sample_next,
    seeded_generator,
    top_k_filter,
    top_p_filter,
)
from byollm.tokenizer.bpe import BPETokenizer

ARCHS = ["gpt-tiny", "llama-tiny"]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0, stop_token_ids=())
SAMPLED = SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2,
                         seed=1234, stop_token_ids=())
PROMPTS = [[5, 17, 3, 99, 42, 7, 11], [64], [8, 9, 10, 11]]  # different lengths: the batch is left-padded


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matrices: thread start-up costs more than the math (20x on a 2-core machine).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(name: str, **overrides) -> GPT:
    # init_std=0.2 rather than 0.02: at the default scale a random tied-embedding model just repeats its
    # last token, which would make "same tokens" comparisons trivially true.
    torch.manual_seed(0)
    return GPT(preset(name, init_std=0.2, **overrides)).eval()


@pytest.fixture(scope="module", params=ARCHS)
def model(request) -> GPT:
    return tiny_model(request.param)


def byte_tokenizer() -> BPETokenizer:
    """Byte-level tokenizer without merges: id 0 = <|endoftext|> (eos), id 1 + b = byte b."""
    return BPETokenizer({i + 1: bytes([i]) for i in range(256)}, [], {"<|endoftext|>": 0})


class PrintableOnly(nn.Module):
    """Wraps a model so it only predicts printable ASCII (and eos if allowed): readable text for stop-string tests."""

    def __init__(self, model: GPT, allow_eos: bool = False) -> None:
        super().__init__()
        self.inner, self.config = model, model.config
        allowed = torch.full((model.config.vocab_size,), float("-inf"))
        allowed[[1 + b for b in range(32, 127)] + ([0] if allow_eos else [])] = 0.0
        self.register_buffer("bias", allowed)

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids, **kwargs)
        return out._replace(logits=out.logits + self.bias)


@pytest.fixture(scope="module")
def text_model() -> PrintableOnly:
    return PrintableOnly(tiny_model("llama-tiny", vocab_size=257))


# --------------------------------------------------------------------------------------------------
# The pure functions
# --------------------------------------------------------------------------------------------------


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits)).flatten().tolist()


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([1.0, 3.0, -2.0, 5.0, 0.5])
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_k_filter(logits, 1)) == [3]
    out = top_k_filter(logits, 3)
    assert torch.equal(out[[0, 1, 3]], logits[[0, 1, 3]])  # kept values are unchanged
    for k in (None, 0, 5, 100):  # no limit
        assert torch.equal(top_k_filter(logits, k), logits)
    rows = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # each row on its own
    assert torch.isfinite(top_k_filter(rows, 1)).tolist() == [[False, False, True], [True, False, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.3, 0.1, 0.5, 0.1])  # vocabulary order is not probability order
    logits = probs.log()
    assert kept(top_p_filter(logits, 0.5)) == [2]  # 0.5 alone reaches 0.5
    assert kept(top_p_filter(logits, 0.75)) == [0, 2]  # 0.5 + 0.3
    assert kept(top_p_filter(logits, 0.85)) == [0, 1, 2]  # + the first of the tied 0.1s
    assert kept(top_p_filter(logits, 1.0)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 1e-9)) == [2]  # always at least one
    assert torch.equal(top_p_filter(logits, None), logits)
    rows = torch.stack([logits, logits.flip(0)])
    out = top_p_filter(rows, 0.75)
    assert kept(out[0]) == [0, 2] and kept(out[1]) == [1, 3]


def test_min_p_keeps_tokens_near_the_best():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log()
    assert kept(min_p_filter(logits, 0.5)) == [0, 1]  # >= 0.25
    assert kept(min_p_filter(logits, 0.1)) == [0, 1, 2, 3]
    assert kept(min_p_filter(logits, 1.0)) == [0]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)  # token 1 seen twice still counts once
    assert out.tolist() == [1.0, -2.0, 0.5, -3.0]
    assert torch.equal(apply_repetition_penalty(logits, [0, 1], 1.0), logits)
    rows = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    history = torch.tensor([[-1, -1, 2], [3, 0, 0]])  # -1 is padding: ignored
    assert apply_repetition_penalty(rows, history, 2.0).tolist() == [[2.0, -1.0, 0.25, -3.0], [1.0, -1.0, 0.5, -6.0]]
    assert apply_repetition_penalty(rows, [[2], [3, 0]], 2.0).tolist() == [[2.0, -1.0, 0.25, -3.0],
                                                                          [1.0, -1.0, 0.5, -6.0]]


def test_temperature_zero_is_argmax_and_small_temperature_approaches_it():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 2.5, 0.2]])
    assert sample_next(logits, SamplingParams(temperature=0)).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    cold = SamplingParams(temperature=1e-3)
    for _ in range(20):
        assert sample_next(logits, cold, g).tolist() == [1, 0]
    assert sample_next(logits, SamplingParams(temperature=1.0, top_k=1), g).tolist() == [1, 0]


def test_sampling_frequencies_match_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20_000
    logits = probs.log().expand(n, 4)  # n independent draws in one call
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, SamplingParams(), g), minlength=4).float()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum().item()
    assert chi2 < 16.27  # the 99.9% quantile of chi-square with 3 degrees of freedom
    # Filters renormalise what they keep: top-k=2 leaves 0.5 : 0.25, i.e. 2/3 : 1/3.
    counts = torch.bincount(sample_next(logits, SamplingParams(top_k=2), g), minlength=4).float()
    assert counts[2:].sum() == 0
    assert abs(counts[0].item() / n - 2 / 3) < 0.015
    # Temperature 2 flattens: p ~ sqrt(p).
    flat = probs.sqrt() / probs.sqrt().sum()
    counts = torch.bincount(sample_next(logits, SamplingParams(temperature=2.0), g), minlength=4).float()
    assert ((counts - n * flat) ** 2 / (n * flat)).sum().item() < 16.27


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(stop_strings=[""]), "stop_strings"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_invalid_params_are_rejected_clearly(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)
    assert issubclass(GenerationError, ValueError)


def test_fields_set_after_construction_are_checked_too(model):
    params = SamplingParams()
    params.top_p = 2.0
    with pytest.raises(ValueError, match=r"top_p must be None or in \(0, 1\]"):
        generate(model, [1, 2], params)


# --------------------------------------------------------------------------------------------------
# The loop: cache, batching, stopping, streaming
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_kv_cache_matches_full_recompute(model, params):
    cached = generate(model, PROMPTS, params, use_cache=True)
    recomputed = generate(model, PROMPTS, params, use_cache=False)
    assert cached.token_ids == recomputed.token_ids
    assert all(len(ids) == params.max_new_tokens for ids in cached.token_ids)
    assert len(set(map(tuple, cached.token_ids))) == len(PROMPTS)  # a model that says something


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_each_prompt_alone(model, use_cache):
    batched = generate(model, PROMPTS, GREEDY, use_cache=use_cache)
    for prompt, completion in zip(PROMPTS, batched, strict=True):
        alone = generate(model, prompt, GREEDY, use_cache=use_cache)
        assert completion.token_ids == alone[0].token_ids
        assert completion.prompt_tokens == len(prompt)


def test_prompt_forms_are_equivalent(model):
    expected = generate(model, [PROMPTS[0]], GREEDY).token_ids
    assert generate(model, PROMPTS[0], GREEDY).token_ids == expected
    assert generate(model, torch.tensor(PROMPTS[0]), GREEDY).token_ids == expected
    assert generate(model, torch.tensor([PROMPTS[0]] * 2), GREEDY).token_ids == expected * 2


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7, stop_token_ids=())
    first = generate(model, PROMPTS, params).token_ids
    assert generate(model, PROMPTS, params).token_ids == first
    params.seed = 8
    assert generate(model, PROMPTS, params).token_ids != first


def test_greedy_matches_its_logits_and_reports_logprobs(model):
    """Each greedy token is the argmax of a plain forward pass over everything before it."""
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(), logprobs=True)
    out = generate(model, PROMPTS[0], params)[0]
    seq = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        logits = model(seq).logits[0, len(PROMPTS[0]) - 1: -1]
    assert logits.argmax(-1).tolist() == out.token_ids
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (torch.tensor(out.logprobs) - expected).abs().max() < 1e-4


def test_stop_token_ends_with_stop_and_max_new_tokens_with_length(model):
    full = generate(model, PROMPTS, GREEDY)
    assert [c.finish_reason for c in full] == ["length"] * 3
    assert all(c.completion_tokens == GREEDY.max_new_tokens for c in full)
    stop = full[0].token_ids[4]
    cut = full[0].token_ids.index(stop) + 1
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[stop])
    seen: list[tuple[int, int]] = []
    out = generate(model, PROMPTS, params, on_token=lambda i, t: seen.append((i, t)))
    assert out[0].token_ids == full[0].token_ids[:cut]  # the stop token is included, nothing after it
    assert out[0].finish_reason == "stop"
    for c, f in zip(out, full, strict=True):  # the other rows go on as before (or stop at the same token)
        assert c.token_ids == (f.token_ids[: f.token_ids.index(stop) + 1] if stop in f.token_ids else f.token_ids)
    # The callback saw exactly the returned tokens, in order, step by step.
    for i, c in enumerate(out):
        assert [t for j, t in seen if j == i] == c.token_ids
    steps = [sum(1 for c in out if len(c.token_ids) > s) for s in range(16)]
    assert [j for j, _ in seen] == [i for s, n in enumerate(steps) for i in range(3) if len(out[i].token_ids) > s]
    assert len(seen) == sum(steps)


def test_training_mode_is_restored_and_dropout_is_off():
    model = tiny_model("gpt-tiny", dropout=0.5)
    expected = generate(model, PROMPTS, GREEDY).token_ids  # in eval mode
    model.train()
    assert generate(model, PROMPTS, GREEDY).token_ids == expected
    assert generate(model, PROMPTS, GREEDY, use_cache=False).token_ids == expected
    assert model.training and all(m.training for m in model.modules())


def test_stop_strings_cut_the_text(text_model):
    tok = byte_tokenizer()
    prompt = tok.encode("Once upon a time")
    params = SamplingParams(max_new_tokens=24, temperature=0)
    full = generate(text_model, prompt, params, tokenizer=tok)[0]
    assert full.finish_reason == "length" and full.text == tok.decode(full.token_ids)
    assert full.text.isprintable() and len(full.text) == 24
    stop = full.text[9:11]
    at = full.text.index(stop)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_strings=[stop, "not in the text"])
    out = generate(text_model, prompt, params, tokenizer=tok)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:at]
    assert out.token_ids == full.token_ids[: at + len(stop)]  # the tokens that made the stop string stay
    pieces = list(stream_text(text_model, tok, "Once upon a time", params))
    assert "".join(pieces) == out.text and len(pieces) > 1
    assert generate_text(text_model, tok, "Once upon a time", params) == [out.text]
    with pytest.raises(GenerationError, match="tokenizer"):
        generate(text_model, prompt, params)


def test_stop_string_is_never_streamed_in_part(text_model):
    """With stop 'ab', a trailing 'a' is held back until we know whether 'b' follows."""
    tok = byte_tokenizer()
    full = generate(text_model, tok.encode("Hi"), SamplingParams(max_new_tokens=24, temperature=0),
                    tokenizer=tok)[0].text
    stop = full[10] + "\x7f"  # the start of the stop string appears, the rest never does
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_strings=[stop])
    events = list(iter_generate(text_model, tok.encode("Hi"), params, tokenizer=tok))
    released = ""
    for event in events:
        released += event.text
        if event.finish_reason is None:
            assert not released.endswith(full[10])  # never shown while it might begin the stop string
    assert released == full and events[-1].finish_reason == "length"


def test_eos_is_the_default_stop_token_and_is_left_out_of_the_text():
    tok = byte_tokenizer()
    prompt = tok.encode("Hey")
    # A model that prefers eos from its 4th generated token on.
    model = BoostAfter(PrintableOnly(tiny_model("gpt-tiny", vocab_size=257), allow_eos=True), token=0,
                       after=len(prompt) + 2)
    out = generate(model, prompt, SamplingParams(max_new_tokens=12, temperature=0), tokenizer=tok)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == tok.eos_id and len(out.token_ids) == 4
    assert out.text == tok.decode(out.token_ids[:-1]) and "<|endoftext|>" not in out.text
    no_stop = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(), skip_special_tokens=False)
    out = generate(model, prompt, no_stop, tokenizer=tok)[0]
    assert out.finish_reason == "length" and out.text.endswith("<|endoftext|>" * 3)


class BoostAfter(nn.Module):
    """Adds +100 to one token's logit at every position >= `after`: a model that 'wants' to stop there."""

    def __init__(self, model: nn.Module, token: int, after: int) -> None:
        super().__init__()
        self.inner, self.config, self.token, self.after = model, model.config, token, after

    def forward(self, input_ids, *, position_ids, **kwargs):
        out = self.inner(input_ids, position_ids=position_ids, **kwargs)
        logits = out.logits.clone()
        pos = position_ids[:, -logits.size(1):]
        logits[..., self.token] += 100.0 * (pos >= self.after).float()
        return out._replace(logits=logits)


def test_streamed_text_is_utf8_safe_and_joins_to_the_decoded_text():
    """A random byte-level model emits broken UTF-8; streaming must still agree with decode()."""
    tok = byte_tokenizer()
    model = tiny_model("gpt-tiny", vocab_size=257)
    tok_ids = tok.encode("héllo 🙂")
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=3, stop_token_ids=())
    out = generate(model, tok_ids, params, tokenizer=tok)[0]
    assert out.text == tok.decode(out.token_ids)
    assert "".join(stream_text(model, tok, "héllo 🙂", params)) == out.text


# --------------------------------------------------------------------------------------------------
# Limits and bad input
# --------------------------------------------------------------------------------------------------


def test_block_size_overflow_is_a_clear_error_for_learned_positions():
    gpt = tiny_model("gpt-tiny")  # block_size 64, learned positions
    prompt = list(range(1, 61))
    with pytest.raises(GenerationError, match=r"60 tokens.*10.*70 exceeds.*block_size \(64"):
        generate(gpt, prompt, SamplingParams(max_new_tokens=10))
    # The sliding window keeps the last 64 tokens as context instead, recomputing every step.
    out = generate(gpt, prompt, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=()),
                   sliding_window=True)
    assert out[0].completion_tokens == 10
    # RoPE models have no positions table: they may run past block_size.
    llama = tiny_model("llama-tiny")
    out = generate(llama, prompt, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=()))
    assert out[0].completion_tokens == 10
    assert generate(llama, prompt, GREEDY, use_cache=False).token_ids == generate(llama, prompt, GREEDY).token_ids


def test_bad_prompts_are_rejected_clearly(model):
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], GREEDY)
    with pytest.raises(GenerationError, match="token id 128, outside"):
        generate(model, [1, 128], GREEDY)
    with pytest.raises(GenerationError, match="generate_text"):
        generate(model, "hello", GREEDY)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Against transformers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_matches_transformers_generate(name):
    """Same weights, same tokens: alone, with a repetition penalty, and as a left-padded batch."""
    pytest.importorskip("transformers")
    from byollm.interop.hf import to_hf_model

    model = tiny_model(name)
    hf = to_hf_model(model)
    n = 20
    # No eos in either: both must run the full n tokens.
    hf_args = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)

    def theirs(prompts: list[list[int]], **kwargs) -> list[list[int]]:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, **hf_args, **kwargs)
        return out[:, width:].tolist()

    for penalty in (1.0, 1.3):
        params = SamplingParams(max_new_tokens=n, temperature=0, repetition_penalty=penalty, stop_token_ids=())
        for prompt in PROMPTS:
            assert generate(model, prompt, params).token_ids == theirs([prompt], repetition_penalty=penalty)
    params = SamplingParams(max_new_tokens=n, temperature=0, stop_token_ids=())
    assert generate(model, PROMPTS, params).token_ids == theirs(PROMPTS)


def test_padded_vocabulary_ids_are_never_sampled() -> None:
    # GPT-2 recipes pad the model's vocabulary past the tokenizer's (50257 -> 50304). A random model puts
    # about half its probability on the 63 padding ids here; none may come out, or decoding would fail.
    from byollm.generate import generate_text
    from byollm.tokenizer import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ,.!?'\nABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789;:-")
    assert tok.vocab_size < 128
    torch.manual_seed(0)
    model = GPT(preset("gpt-tiny", vocab_size=128))
    params = SamplingParams(max_new_tokens=60, temperature=1.0, seed=0)
    text = generate_text(model, tok, "ab", params)[0]
    assert len(text) == 60


def test_temperatures_below_min_temperature_are_greedy():
    """One rule for generate, the engine and the server: below MIN_TEMPERATURE (1e-5) a token is the argmax and
    no random number is drawn. Hand-computed: with a logit gap of 1e-6 at temperature 5e-6, sampling would pick
    the runner-up with probability 1 / (1 + e^0.2) = 45%; greedy never does."""
    logits = torch.tensor([[0.0, 1e-6, -1.0], [2.0, 2.0 - 1e-6, 0.0]])
    cold = SamplingParams(temperature=MIN_TEMPERATURE / 2, seed=1)
    assert cold.greedy and seeded_generator(cold, "cpu") is None
    for seed in range(50):
        assert sample_next(logits, cold, torch.Generator().manual_seed(seed)).tolist() == [1, 0]
    at_the_rule = SamplingParams(temperature=MIN_TEMPERATURE, seed=1)
    assert not at_the_rule.greedy and seeded_generator(at_the_rule, "cpu") is not None


def test_extreme_but_valid_sampling_values_do_not_break_sampling():
    """A temperature of 1e-300 acts as greedy, a repetition penalty of 5e-324 still yields a valid token:
    neither may raise (in a batching server one failing row would fail every request in the batch)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    greedy = logits.argmax(dim=-1)
    for t in (1e-300, 1e-30):  # below fp32's range, and representable but tiny
        assert torch.equal(sample_next(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(1)), greedy)
    seen = torch.randint(0, 50, (3, 5), generator=g)
    for penalty in (5e-324, 1e300):
        out = sample_next(logits, SamplingParams(temperature=0.7, repetition_penalty=penalty),
                          torch.Generator().manual_seed(1), token_ids=seen)
        assert out.shape == (3,) and bool(((out >= 0) & (out < 50)).all())
