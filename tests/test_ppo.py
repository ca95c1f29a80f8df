"""RLHF with PPO (byollm.train.ppo): each piece of arithmetic against numbers worked out by hand, masking and
alignment against our generator's own log-probs, and tiny end-to-end runs where PPO raises a programmatic
reward while the KL to the reference stays bounded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from byollm.checkpoint import load_checkpoint, save_checkpoint
from byollm.errors import CheckpointError, ConfigError, DataError
from byollm.generate import generate
from byollm.model import GPT, RewardModel, preset
from byollm.sampling import SamplingParams
from byollm.tokenizer import CharTokenizer
from byollm.train.loop import Trainer, seed_everything
from byollm.train.optim import build_optimizer
from byollm.train.policy import PolicyWithValue, disable_dropout, pack_sequences, response_forward
from byollm.train.ppo import PPOConfig, plot_ppo_curves, ppo, prompt_encoder, read_prompts
from byollm.train.rewards import RewardModelScorer, token_fraction_reward
from byollm.train.rl_objectives import (
    PPOObjective,
    gae,
    grpo_advantages,
    kl_penalized_rewards,
    masked_whiten,
    ppo_losses,
    response_mask,
    rloo_advantages,
)
from byollm.train.rollout import RolloutConfig, RolloutSource

# --------------------------------------------------------------------------------------------------
# The arithmetic, by hand
# --------------------------------------------------------------------------------------------------


def test_gae_matches_hand_computed_example() -> None:
    # 3 real tokens and one padded position (garbage reward and value, mask 0); gamma 1, lam 0.95.
    #   delta_2 = 1.0 + 0 - 0.3 = 0.7                 A_2 = 0.7
    #   delta_1 = -0.2 + 0.3 - 0.4 = -0.3             A_1 = -0.3 + 0.95 * 0.7 = 0.365
    #   delta_0 = 0.1 + 0.4 - 0.5 = 0.0               A_0 = 0.0 + 0.95 * 0.365 = 0.34675
    #   returns = A + V = [0.84675, 0.765, 1.0]
    rewards = torch.tensor([[0.1, -0.2, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.34675, 0.365, 0.7, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.84675, 0.765, 1.0, 0.0]]))
    # gamma 0.5, lam 1 (Monte Carlo): A_0 = 0.5 * 1 - 0.2 = 0.3, A_1 = 1 - 0.4 = 0.6; returns [0.5, 1.0].
    adv, ret = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]]), torch.tensor([[1, 1]]), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.5, 1.0]]))


def test_clipped_surrogate_matches_hand_arithmetic_on_both_sides() -> None:
    # eps = 0.2. Per token: ratio, advantage -> max(-A r, -A clip(r)):
    #   a 1.5, +1: max(-1.5, -1.2) = -1.2  clipped above (gradient 0)
    #   b 0.5, -1: max( 0.5,  0.8) =  0.8  clipped below (gradient 0)
    #   c 1.1, +2: max(-2.2, -2.2) = -2.2  inside the range
    #   d 0.5, +1: max(-0.5, -0.8) = -0.5  outside, but the pessimistic term is the unclipped one
    #   e 1.5, -1: max( 1.5,  1.2) =  1.5  same on the other side
    # mean = (-1.2 + 0.8 - 2.2 - 0.5 + 1.5) / 5 = -0.32; the clipped term was taken for a and b: clipfrac 0.4.
    # A sixth, padded token (mask 0) carries garbage.
    ratios = torch.tensor([[1.5, 0.5, 1.1, 0.5, 1.5, 3.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, 1.0, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.full_like(ratios, -2.0)
    logprobs = (old + ratios.log()).requires_grad_()
    zeros = torch.zeros_like(ratios)
    out = ppo_losses(logprobs, old, adv, zeros, zeros, zeros, mask, clip_range=0.2)
    torch.testing.assert_close(out.policy_loss, torch.tensor(-0.32))
    torch.testing.assert_close(out.clipfrac, torch.tensor(0.4))
    expected_kl = 0.5 * sum(math.log(r) ** 2 for r in (1.5, 0.5, 1.1, 0.5, 1.5)) / 5
    torch.testing.assert_close(out.approx_kl, torch.tensor(expected_kl))
    out.policy_loss.backward()
    # d/dlogp of -A r / 5 is -A r / 5 where the unclipped term is taken, 0 where the clipped one is.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -0.44, -0.1, 0.3, 0.0]]))


def test_clipped_value_loss_matches_hand_arithmetic() -> None:
    # old values 0, eps_v 0.2, returns 1:
    #   V = 0.5: unclipped (0.5 - 1)^2 = 0.25; clipped V 0.2 -> 0.64; max 0.64 (clipped)
    #   V = -0.1: inside the range: 1.21 both ways
    # value loss = 0.5 * (0.64 + 1.21) / 2 = 0.4625; value clipfrac 0.5.
    values = torch.tensor([[0.5, -0.1, 4.0]])
    zeros, ones = torch.zeros_like(values), torch.ones_like(values)
    out = ppo_losses(zeros, zeros, zeros, values, zeros, ones, torch.tensor([[1, 1, 0]]), clip_range_value=0.2)
    torch.testing.assert_close(out.value_loss, torch.tensor(0.4625))
    torch.testing.assert_close(out.value_clipfrac, torch.tensor(0.5))


def test_kl_penalty_on_every_token_and_score_on_the_last_real_token() -> None:
    # kl_t = logp - ref_logp; r_t = -0.1 kl_t, + score on the last unmasked token.
    #   row 0: kl [0.5, 0, -1]  -> [-0.05, 0, 0.1 + 2] ; row 1 (2 tokens): kl [0, 1, -] -> [0, -0.1 - 1, 0]
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -5.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 2.1], [0.0, -1.1, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))


def test_response_mask_drops_padding_and_tokens_after_the_stop_token() -> None:
    ids = torch.tensor([[5, 6, 0, 7, 8], [5, 0, 0, 0, 0], [5, 6, 7, 8, 9]])
    lengths = torch.tensor([5, 2, 4])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(response_mask(ids, lengths, stop_token_ids=(0,)), expected)


def test_whitening_over_masked_positions() -> None:
    # mean 4, unbiased variance ((-2)^2 + 0 + 2^2) / 2 = 4, std 2 -> [-1, 0, 1]; the masked 100 plays no part.
    x, mask = torch.tensor([[2.0, 4.0], [6.0, 100.0]]), torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0], [5.0, 0.0]]))


def test_rloo_and_grpo_advantages_by_hand() -> None:
    # Two prompts, k = 3 answers each. Group 1 rewards [1, 3, 2]:
    #   RLOO: baseline = mean of the other two: [2.5, 1.5, 2] -> advantages [-1.5, 1.5, 0]
    #   GRPO: mean 2, sample std 1 -> [-1, 1, 0]
    # Group 2 [5, 5, 8]: RLOO [5 - 6.5, 5 - 6.5, 8 - 5] = [-1.5, -1.5, 3]; GRPO: mean 6, std sqrt(3).
    r = torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0, 8.0])
    torch.testing.assert_close(rloo_advantages(r, 3), torch.tensor([-1.5, 1.5, 0.0, -1.5, -1.5, 3.0]))
    s3 = math.sqrt(3)
    torch.testing.assert_close(grpo_advantages(r, 3, eps=0.0), torch.tensor([-1.0, 1.0, 0.0, -1 / s3, -1 / s3, 2 / s3]))


# --------------------------------------------------------------------------------------------------
# Alignment and masking on a real (tiny) model
# --------------------------------------------------------------------------------------------------


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("gpt-tiny", **overrides)).eval()


def test_rollout_logprobs_match_the_generators_own() -> None:
    # Prompts of different lengths (left-padded) and answers of different lengths (right-padded, one stopping
    # early): the log-prob of every answer token recomputed in one packed pass must equal what generation
    # (KV cache, one token at a time) reported when it sampled it.
    model = tiny_gpt()
    prompts = [[3, 4, 5, 6, 7], [9], [10, 11, 12]]
    result = generate(model, prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=1, logprobs=True,
                                                     stop_token_ids=(2,)))
    batch = pack_sequences(prompts, result.token_ids, pad_id=0)
    mask = response_mask(batch["response_ids"], batch["response_lengths"], (2,))
    logprobs, _, values = response_forward(model, batch)
    assert values is None  # a plain GPT has no value head
    for i, c in enumerate(result):
        torch.testing.assert_close(logprobs[i, :len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-5, rtol=0)
        assert mask[i].sum() == len(c.token_ids)
    _, _, values = response_forward(PolicyWithValue(model), batch)
    assert values.shape == logprobs.shape and not values.any()  # the value head starts at zero


def test_padding_and_tokens_after_eos_contribute_nothing_to_the_loss() -> None:
    model = PolicyWithValue(tiny_gpt())
    torch.nn.init.normal_(model.value_head.weight, std=0.1)
    prompts, responses = [[3, 4, 5], [6]], [[7, 8, 0, 9, 9], [10, 11]]  # row 0 stops (id 0) then has junk
    batch = pack_sequences(prompts, responses)
    mask = response_mask(batch["response_ids"], batch["response_lengths"], (0,))
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    g = torch.Generator().manual_seed(0)
    fields = {k: torch.randn(mask.shape, generator=g) for k in ("old_logprobs", "old_values", "advantages",
                                                                 "returns")}
    base = {**batch, **fields, "mask": mask}
    objective = PPOObjective(vf_coef=0.5, ent_coef=0.01)
    loss, metrics = objective.loss(model, base)
    assert metrics["tokens"] == 5
    # Garbage where the mask is 0: other per-token values there, other token ids after the stop token / in
    # the padding (they come after every counted position, so causality keeps them out of the forward too).
    junk = {k: torch.where(mask.bool(), v, torch.full_like(v, 1e3)) for k, v in fields.items()}
    ids = batch["input_ids"].clone()
    p = batch["prompt_width"]
    ids[0, p + 3:] = torch.tensor([50, 60])
    ids[1, p + 2:] = torch.tensor([70, 80, 90])
    loss2, metrics2 = objective.loss(model, {**base, **junk, "input_ids": ids})
    torch.testing.assert_close(loss2, loss)
    assert metrics2 == metrics


def test_reward_model_scorer_matches_scoring_each_sequence_alone() -> None:
    # Batched and padded (either side) must give each sequence the score it gets alone, unpadded.
    reward_model = RewardModel(tiny_gpt(seed=1)).eval()
    prompts, responses = [[1, 2], [3], [4, 5, 6]], [[7], [8, 9, 10], [11]]
    alone = torch.stack([reward_model(torch.tensor([p + r]))[0] for p, r in zip(prompts, responses, strict=True)])
    for side in ("right", "left"):
        scores = RewardModelScorer(reward_model, padding_side=side, batch_size=2)(prompts, responses)
        torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# End to end: PPO raises a programmatic reward, KL bounded
# --------------------------------------------------------------------------------------------------

TARGET = list(range(16))  # reward: the fraction of answer tokens among ids 0..15 (about 16/128 at the start)


def random_prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(16, 128, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run_ppo(kl_coef: float, iterations: int, **rollout) -> tuple[list[dict[str, float]], PolicyWithValue]:
    seed_everything(0)
    model = PolicyWithValue(disable_dropout(tiny_gpt(seed=0)))
    reference = disable_dropout(tiny_gpt(seed=0)).requires_grad_(False)
    cfg = RolloutConfig(**{**dict(rollout_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=8,
                                  kl_coef=kl_coef, seed=0), **rollout})
    source = RolloutSource(model, reference, token_fraction_reward(TARGET), random_prompts(64, 1), cfg,
                           stop_token_ids=(127,))
    stats: list[dict[str, float]] = []
    source.on_rollout = stats.append
    loop_cfg = dict(max_steps=iterations * source.minibatches_per_rollout, grad_accum=1, grad_clip=1.0,
                    log_interval=1000, eval_interval=0, sample_interval=0, checkpoint_interval=0, keep_last=1,
                    compile=False, seed=0, time_budget_s=None, time_budget_probe=20)
    import types

    optimizer = build_optimizer(model, 3e-3, 0.0, (0.9, 0.95))
    objective = PPOObjective(vf_coef=0.1, kl_loss_coef=kl_coef if cfg.advantage == "grpo" else 0.0)
    trainer = Trainer(model, objective, source, optimizer, None, types.SimpleNamespace(**loop_cfg),
                      device=torch.device("cpu"), progress=False)
    trainer.fit()
    return stats, model


def test_ppo_raises_the_reward_while_kl_stays_bounded() -> None:
    # 30 rollouts of 16 prompts, 8-token answers. Measured (seeded): with kl_coef 0.05 the reward goes
    # 0.12 -> 0.45 while the KL levels off near 4 nats per answer; without the penalty the policy runs to
    # reward 1.0 and KL 30 (8 ln 128/16 = 16.6 for uniform over the targets, it is sharper than that).
    stats, _ = run_ppo(kl_coef=0.05, iterations=30)
    free, _ = run_ppo(kl_coef=0.0, iterations=30)

    def mean(xs: list[dict[str, float]], key: str) -> float:
        return sum(x[key] for x in xs) / len(xs)

    first, last = mean(stats[:3], "score"), mean(stats[-3:], "score")
    print(f"reward {first:.3f} -> {last:.3f}; KL per answer {[round(s['kl'], 2) for s in stats[::5]]}; "
          f"without the penalty: reward {mean(free[-3:], 'score'):.3f}, KL {mean(free[-3:], 'kl'):.2f}")
    assert first < 0.2 and last > first + 0.2  # the reward rises ...
    assert max(s["kl"] for s in stats) < 8  # ... while the KL stays bounded,
    assert mean(free[-3:], "kl") > 2 * mean(stats[-3:], "kl")  # which is the penalty's doing


@pytest.mark.parametrize("advantage", ["rloo", "grpo"])
def test_critic_free_variants_raise_the_reward(advantage: str) -> None:
    # 4 answers per prompt, 15 rollouts. Measured: reward 0.09 -> ~0.5 (rloo) / ~0.6 (grpo) by rollout 15.
    stats, model = run_ppo(kl_coef=0.05, iterations=15, advantage=advantage, samples_per_prompt=4)
    first = sum(s["score"] for s in stats[:3]) / 3
    last = sum(s["score"] for s in stats[-3:]) / 3
    assert last > first + 0.15
    assert not model.value_head.weight.any()  # no critic: the value head never moved


# --------------------------------------------------------------------------------------------------
# The recipe: checkpoints, resume, plot
# --------------------------------------------------------------------------------------------------


def tiny_checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tiny_gpt(seed=0), tmp_path / "policy")


def recipe(tmp_path: Path, **overrides) -> PPOConfig:
    values = dict(policy=str(tiny_checkpoint(tmp_path)), rollout=RolloutConfig(rollout_size=8, mini_batch_size=4,
                  ppo_epochs=2, max_new_tokens=6), stop_token_ids=[127], lr=3e-3, max_steps=6, device="cpu",
                  dtype="fp32", checkpoint_interval=100, eval_interval=3, out_dir=str(tmp_path / "runs"), seed=3)
    return PPOConfig(**{**values, **overrides})


def test_recipe_writes_a_gpt_checkpoint_and_resumes_bit_identically(tmp_path: Path) -> None:
    prompts, held = random_prompts(24, 1), random_prompts(8, 2)
    reward = token_fraction_reward(TARGET)
    full = ppo(recipe(tmp_path, name="full"), reward_fn=reward, prompts=prompts, eval_prompts=held, progress=False)
    # The same run stopped after 3 steps (in the middle of its first rollout's 4 steps), then resumed.
    ppo(recipe(tmp_path, name="split", max_steps=3), reward_fn=reward, prompts=prompts, eval_prompts=held,
        progress=False)
    resumed = ppo(recipe(tmp_path, name="split", resume=True), reward_fn=reward, prompts=prompts, eval_prompts=held,
                  progress=False)
    a, b = load_checkpoint(full.checkpoint).model, load_checkpoint(resumed.checkpoint).model  # plain GPTs
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))

    def train_events(run_dir: Path) -> list[dict]:
        events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in e.items() if "second" not in k and "per_s" not in k} for e in events
                if e["event"] == "train"]

    assert train_events(full.run_dir) == train_events(resumed.run_dir)
    assert full.before["prompts"] == 8 and set(full.after) == {"score", "kl", "response_len", "prompts"}
    assert full.plot is not None and full.plot.stat().st_size > 0
    state = torch.load(full.checkpoint / "train_state.pt", weights_only=True)
    assert set(state["value_head"]) == {"weight", "bias"}
    assert plot_ppo_curves(full.run_dir, tmp_path / "again.png").is_file()


def test_recipe_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of mini_batch_size"):
        ppo(recipe(tmp_path, rollout=RolloutConfig(rollout_size=6, mini_batch_size=4)),
            reward_fn=token_fraction_reward(TARGET), prompts=[[1, 2]])
    with pytest.raises(ConfigError, match="needs a reward"):
        ppo(recipe(tmp_path), prompts=[[1, 2]], progress=False)
    with pytest.raises(CheckpointError, match="not a reward model"):
        ppo(recipe(tmp_path, reward_model=str(tiny_checkpoint(tmp_path))), prompts=[[1, 2]], progress=False)
    with pytest.raises(DataError, match="no usable training prompts"):
        ppo(recipe(tmp_path), reward_fn=token_fraction_reward(TARGET), prompts=[list(range(1, 63))], progress=False)


def test_recipe_with_a_reward_model_checkpoint(tmp_path: Path) -> None:
    rm_path = save_checkpoint(RewardModel(tiny_gpt(seed=1)), tmp_path / "reward")
    result = ppo(recipe(tmp_path, name="rm", reward_model=str(rm_path), max_steps=4), prompts=random_prompts(8, 1),
                 eval_prompts=random_prompts(4, 2), progress=False)
    events = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert all(math.isfinite(e["score"]) and math.isfinite(e["kl"]) for e in events if e["event"] == "train")
    assert load_checkpoint(result.checkpoint).model.config.n_layer == 2


def test_recipe_with_text_prompts_a_tokenizer_and_held_out_prompts(tmp_path: Path) -> None:
    # A character tokenizer of 27 ids under a 128-id model: ids past the tokenizer's are never sampled and are
    # left out of the log-probs; prompts are strings; val_prompts holds some out for the evaluations.
    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ", special_tokens=["<|endoftext|>"])
    policy = save_checkpoint(tiny_gpt(seed=0), tmp_path / "policy", tokenizer=tok)
    seen: list[list[int]] = []

    def reward(prompt_ids: list[list[int]], response_ids: list[list[int]]) -> torch.Tensor:
        seen.extend(response_ids)
        return torch.tensor([tok.decode(r).count("a") / max(len(r), 1) for r in response_ids])

    prompts = [" ".join(["hello", "world", "ppo", "reward"][i % 4:]) + f" {chr(97 + i)}" for i in range(12)]
    result = ppo(PPOConfig(policy=str(policy), rollout=RolloutConfig(rollout_size=4, mini_batch_size=4,
                 ppo_epochs=1, max_new_tokens=5), val_prompts=4, max_steps=2, device="cpu", dtype="fp32",
                 out_dir=str(tmp_path / "runs"), name="text"), reward_fn=reward, prompts=prompts, progress=False)
    assert seen and max(max(r) for r in seen) < tok.vocab_size
    assert result.before["prompts"] == 4 and result.after["prompts"] == 4
    assert "=== step 2 ===" in (result.run_dir / "samples.txt").read_text()
    assert load_checkpoint(result.checkpoint).tokenizer.vocab_size == tok.vocab_size


def test_prompts_from_files_and_the_chat_template(tmp_path: Path) -> None:
    from byollm.tokenizer.chat_template import add_chat_tokens, encode_prompt

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ?\n")
    plain = prompt_encoder(tok)
    assert plain("hi there") == tok.encode("hi there") and plain([1, 2, 3]) == [1, 2, 3]
    add_chat_tokens(tok)  # after SFT: strings become a user turn + the assistant header
    encode = prompt_encoder(tok)
    user = [{"role": "user", "content": "hi there?"}]
    assert encode("hi there?") == encode_prompt(tok, user)
    assert encode([*user, {"role": "assistant", "content": "hello"}]) == encode_prompt(tok, user)  # reply dropped
    assert prompt_encoder(tok, chat=False)("hi") == tok.encode("hi")
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a b"}\n"c d"\n{"messages": [{"role": "user", "content": "e"}]}\n')
    assert read_prompts(path) == ["a b", "c d", [{"role": "user", "content": "e"}]]
    path.write_text('{"prompt": ""}\n')
    with pytest.raises(DataError, match="record 0"):
        read_prompts(path)
