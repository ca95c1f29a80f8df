"""SFT, reward model (Bradley-Terry), DPO and ORPO: every loss against numbers worked out by hand on tiny
tensors (with `math`, from the papers' formulas), masking and padding edge cases, collators and the example
source, DPO against TRL, a gradient property, and short end-to-end runs of the one Trainer."""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from byollm.checkpoint import load_checkpoint, save_checkpoint
from byollm.errors import CheckpointError, ConfigError, DataError
from byollm.model import GPT, RewardModel, preset
from byollm.tokenizer.chat_template import IGNORE_INDEX
from byollm.train import Run, Trainer, evaluate
from byollm.train.examples import ExampleSource, collate_preference, collate_sft, example_batches, pack_sft_examples
from byollm.train.objectives import (
    DPO,
    ORPO,
    SFT,
    RewardBT,
    bradley_terry_loss,
    dpo_loss,
    evaluate_pairs,
    log1mexp,
    log_odds,
    odds_ratio_loss,
    precompute_reference_logprobs,
    sequence_logprobs,
    shift_labels,
    token_logprobs,
)

X = IGNORE_INDEX
CPU = torch.device("cpu")

# A bigram "model" whose logits at a position depend only on the token there: a table written by hand, so
# every log-probability below is arithmetic on these nine numbers.
TABLE = [[1.0, 2.0, 0.5],
         [0.0, -1.0, 3.0],
         [2.0, 0.0, 0.0]]


def logp(prev: int, nxt: int) -> float:
    """log softmax(TABLE[prev])[nxt], by hand."""
    row = TABLE[prev]
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class Bigram(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(TABLE))

    def forward(self, input_ids, targets=None, *, attention_mask=None, position_ids=None):  # noqa: ANN001, ANN201
        return SimpleNamespace(logits=self.table[input_ids])


class FixedRewards(nn.Module):
    """Returns given rewards, whatever the batch: for checking the loss arithmetic alone."""

    def __init__(self, rewards: list[float]) -> None:
        super().__init__()
        self.rewards = nn.Parameter(torch.tensor(rewards))

    def forward(self, input_ids, attention_mask=None, position_ids=None):  # noqa: ANN001, ANN201
        return self.rewards


def tiny_model(name: str = "gpt-tiny", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset(name, dropout=0.0)).eval()


def trainer_config(steps: int) -> SimpleNamespace:
    return SimpleNamespace(max_steps=steps, grad_accum=1, grad_clip=1.0, log_interval=steps, eval_interval=0,
                           sample_interval=0, checkpoint_interval=0, keep_last=1, compile=False, seed=0,
                           time_budget_s=None, time_budget_probe=20)


# --------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------


def test_collate_sft_right_pads_with_masked_labels() -> None:
    batch = collate_sft([{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8, 4], "labels": [8, 4]}],
                        pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 4, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [8, 4, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_collate_preference_puts_chosen_then_rejected_and_masks_the_prompt() -> None:
    examples = [{"prompt_ids": [1, 2], "chosen_ids": [3, 9], "rejected_ids": [4]},
                {"prompt_ids": [5], "chosen_ids": [6], "rejected_ids": [7, 8, 9]}]
    batch = collate_preference(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [5, 6, 0, 0], [1, 2, 4, 0], [5, 7, 8, 9]]
    assert batch["labels"].tolist() == [[X, X, 3, 9], [X, 6, X, X], [X, X, 4, X], [X, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert "ref_chosen_logps" not in batch
    cached = [{**e, "ref_chosen_logp": -1.5 - i, "ref_rejected_logp": -2.5 - i} for i, e in enumerate(examples)]
    batch = collate_preference(cached)
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -2.5]
    assert batch["ref_rejected_logps"].tolist() == [-2.5, -3.5]
    with pytest.raises(DataError, match="some preference examples have cached"):
        collate_preference([cached[0], examples[1]])


def test_packing_restarts_positions_and_blocks_attention_between_examples() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8, 9], "labels": [X, 9]},
                {"input_ids": [10, 11, 12, 13], "labels": [10, 11, 12, 13]}]
    rows = pack_sft_examples(examples, max_length=6)
    assert [r["input_ids"] for r in rows] == [[5, 6, 7, 8, 9], [10, 11, 12, 13]]
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[0]["segment_ids"] == [0, 0, 0, 1, 1]
    # The first token of each packed example is never a target: it would be "predicted" from the one before.
    assert [r["labels"] for r in rows] == [[X, 6, 7, X, 9], [X, 11, 12, 13]]
    batch = collate_sft(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["attention_mask"].shape == (2, 1, 5, 5)
    assert batch["attention_mask"][0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                                            [1, 1, 0, 0, 0],
                                                            [1, 1, 1, 0, 0],
                                                            [0, 0, 0, 1, 0],
                                                            [0, 0, 0, 1, 1]]
    assert batch["attention_mask"][1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]  # padding sees only itself


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": [1, 2]}, "no 'labels'"),
    ({"input_ids": [1, 2], "labels": [X]}, "2 input_ids but 1 labels"),
    ({"input_ids": [1, 2, 3], "labels": [1, X, X]}, "no trained token"),
    ({"input_ids": list(range(9)), "labels": list(range(9))}, "more than max_length=8"),
])
def test_bad_sft_examples_are_errors(bad: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        collate_sft([bad], max_length=8)


@pytest.mark.parametrize("bad, message", [
    ({"prompt_ids": [1], "chosen_ids": [2]}, "no 'rejected_ids'"),
    ({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": []}, "empty rejected response"),
    ({"prompt_ids": [], "chosen_ids": [2], "rejected_ids": [3]}, "empty prompt"),
    ({"prompt_ids": [1, 2, 3], "chosen_ids": [2] * 6, "rejected_ids": [3]}, "prompt \\+ chosen is 9 tokens"),
    ({"prompt_ids": "hello", "chosen_ids": [2], "rejected_ids": [3]}, "list of token ids"),
])
def test_bad_preference_examples_are_errors(bad: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        collate_preference([bad], max_length=8)


# --------------------------------------------------------------------------------------------------
# The example source: shuffled epochs, exact resume, sharding
# --------------------------------------------------------------------------------------------------


def _ids(source: ExampleSource, steps: int) -> list[list[int]]:
    return [source.next_batch() for _ in range(steps)]


def test_example_source_epochs_resume_and_ranks() -> None:
    examples = list(range(10))
    one = ExampleSource(examples, 4, list, seed=3)  # global batch 4: 2 steps per epoch, 2 examples left out
    assert one.steps_per_epoch == 2
    first = _ids(one, 6)
    for epoch in range(3):  # each epoch: 8 distinct examples, and the epochs are shuffled differently
        seen = first[2 * epoch] + first[2 * epoch + 1]
        assert len(set(seen)) == 8
    assert first[:2] != first[2:4]
    assert _ids(ExampleSource(examples, 4, list, seed=3), 6) == first  # deterministic in the seed
    assert _ids(ExampleSource(examples, 4, list, seed=4), 6) != first

    resumed = ExampleSource(examples, 4, list, seed=3)
    _ids(resumed, 3)
    state = json.loads(json.dumps(resumed.state_dict()))  # (it must survive a checkpoint)
    again = ExampleSource(examples, 4, list, seed=3)
    again.load_state_dict(state)
    assert _ids(again, 3) == first[3:]

    ranks = [ExampleSource(examples, 2, list, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [ranks[0].next_batch() + ranks[1].next_batch() for _ in range(6)] == first

    with pytest.raises(DataError, match="fewer than one global batch"):
        ExampleSource(examples, 4, list, world_size=3)
    assert [b for b in example_batches(examples, 4, list)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(example_batches(examples, 4, list, rank=1, world_size=2)) == [[4, 5, 6, 7]]


# --------------------------------------------------------------------------------------------------
# Log-probabilities and SFT: by hand
# --------------------------------------------------------------------------------------------------


def test_sequence_logprobs_by_hand_with_masking_and_padding() -> None:
    examples = [{"input_ids": [0, 1, 2, 1], "labels": [X, X, 2, 1]},  # prompt [0, 1], response [2, 1]
                {"input_ids": [2, 0], "labels": [X, 0]}]
    batch = collate_sft(examples, pad_id=2)
    sums, counts = sequence_logprobs(Bigram(), batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert counts.tolist() == [2, 1]
    # Position i predicts token i + 1: the response token 2 comes after token 1, and 1 after 2.
    assert sums.tolist() == pytest.approx([logp(1, 2) + logp(2, 1), logp(2, 0)], abs=1e-6)
    single = collate_sft(examples[1:])
    alone, _ = sequence_logprobs(Bigram(), single["input_ids"], single["attention_mask"], single["labels"])
    assert alone.item() == pytest.approx(sums[1].item(), abs=1e-6)  # padding changed nothing


def test_sft_loss_by_hand_ignores_prompt_and_padding() -> None:
    examples = [{"input_ids": [0, 1, 2, 1], "labels": [X, X, 2, 1]}, {"input_ids": [2, 0], "labels": [X, 0]}]
    loss, metrics = SFT().loss(Bigram(), collate_sft(examples, pad_id=1))
    # The mean over the three trained tokens of the batch, each weighing the same.
    assert loss.item() == pytest.approx(-(logp(1, 2) + logp(2, 1) + logp(2, 0)) / 3, abs=1e-6)
    assert metrics["tokens"] == 3
    # A label set to -100 drops out of the mean; the tokens themselves still condition what follows.
    masked = [{"input_ids": [0, 1, 2, 1], "labels": [X, X, X, 1]}, examples[1]]
    loss, metrics = SFT().loss(Bigram(), collate_sft(masked))
    assert loss.item() == pytest.approx(-(logp(2, 1) + logp(2, 0)) / 2, abs=1e-6)
    assert metrics["tokens"] == 2


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_padding_and_packing_do_not_change_a_real_model(name: str) -> None:
    """The same examples alone, right-padded, left-padded and packed give the same log-probs and SFT loss
    (learned positions for gpt-tiny, RoPE for llama-tiny: the position ids must restart in a packed row)."""
    model = tiny_model(name)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3, 7):
        ids = torch.randint(4, 128, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [X] * (n // 2) + ids[n // 2:]})
    alone = torch.cat([sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])[0]
                       for b in (collate_sft([e]) for e in examples)])
    padded = collate_sft(examples, pad_id=1)
    right, _ = sequence_logprobs(model, padded["input_ids"], padded["attention_mask"], padded["labels"])
    torch.testing.assert_close(right, alone, atol=2e-5, rtol=1e-5)

    # Left padding: the mask must reach the model and positions must count real tokens only.
    t = padded["input_ids"].shape[1]
    lengths = padded["attention_mask"].sum(1)
    left = {k: torch.stack([row.roll(t - int(n)) for row, n in zip(padded[k], lengths, strict=True)])
            for k in ("input_ids", "labels", "attention_mask")}
    left_lp, _ = sequence_logprobs(model, left["input_ids"], left["attention_mask"], left["labels"])
    torch.testing.assert_close(left_lp, alone, atol=2e-5, rtol=1e-5)

    packed = collate_sft(pack_sft_examples(examples, max_length=16), pad_id=1)
    assert packed["input_ids"].shape[0] < len(examples)  # (it did pack)
    packed_lp, _ = sequence_logprobs(model, packed["input_ids"], packed["attention_mask"], packed["labels"],
                                     packed["position_ids"])
    torch.testing.assert_close(packed_lp.sum(), alone.sum(), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the batch's position_ids"):
        sequence_logprobs(model, packed["input_ids"], packed["attention_mask"], packed["labels"])
    sft = SFT()
    loss_padded, m_padded = sft.loss(model, padded)
    loss_packed, m_packed = sft.loss(model, packed)
    assert m_padded["tokens"] == m_packed["tokens"]
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Reward model: Bradley-Terry by hand, the head reads the last real token, checkpoints
# --------------------------------------------------------------------------------------------------


def test_bradley_terry_loss_by_hand() -> None:
    r_c, r_r = [2.0, -1.0, 0.3], [0.5, 1.0, 0.3]
    # The paper's form: P(chosen preferred) = exp(r_c) / (exp(r_c) + exp(r_r)); the loss is -log P.
    expected = [-math.log(math.exp(c) / (math.exp(c) + math.exp(r))) for c, r in zip(r_c, r_r, strict=True)]
    got = bradley_terry_loss(torch.tensor(r_c), torch.tensor(r_r))
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    loss, metrics = RewardBT().loss(FixedRewards(r_c + r_r), collate_preference(
        [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}] * 3))
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert metrics["margin"] == pytest.approx((1.5 - 2.0 + 0.0) / 3, abs=1e-6)
    # Stable far out: a margin of 200 costs exp(-200), a margin of -200 costs 200.
    assert bradley_terry_loss(torch.tensor([100.0, -100.0]), torch.tensor([-100.0, 100.0])).tolist() == \
        pytest.approx([0.0, 200.0], abs=1e-6)


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_reward_model_reads_the_last_real_token_and_round_trips(name: str, tmp_path) -> None:
    rm = RewardModel(tiny_model(name)).eval()
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8, 9], "rejected_ids": [10]},
                {"prompt_ids": [11], "chosen_ids": [12], "rejected_ids": [13, 14, 15, 16]}]
    batch = collate_preference(examples, pad_id=0)
    with torch.no_grad():
        rewards = rm(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        seqs = [[5, 6, 7, 8, 9], [11, 12], [5, 6, 10], [11, 13, 14, 15, 16]]
        w = rm.score.weight[0]
        by_hand = [float(rm.backbone.hidden_states(torch.tensor([s]))[0, -1] @ w) for s in seqs]
    assert rewards.tolist() == pytest.approx(by_hand, abs=1e-5)
    assert rm.backbone.lm_head.weight.requires_grad == rm.config.tie_embeddings  # an untied LM head is frozen

    save_checkpoint(rm, tmp_path / "rm", meta={"run": "test"})
    assert json.loads((tmp_path / "rm" / "meta.json").read_text())["kind"] == "reward"
    loaded = load_checkpoint(tmp_path / "rm", reward=True).model
    assert isinstance(loaded, RewardModel)
    with torch.no_grad():
        again = loaded(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    torch.testing.assert_close(again, rewards)
    with pytest.raises(CheckpointError, match="is a reward model"):
        load_checkpoint(tmp_path / "rm")
    save_checkpoint(rm.backbone, tmp_path / "lm")
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_checkpoint(tmp_path / "lm", reward=True)
    assert isinstance(load_checkpoint(tmp_path / "lm").model, GPT)


# --------------------------------------------------------------------------------------------------
# DPO: by hand, against the paper's gradient, against TRL
# --------------------------------------------------------------------------------------------------


def test_dpo_loss_by_hand() -> None:
    beta = 0.1
    pi_c, pi_r, ref_c, ref_r = [-5.0, -9.0], [-7.0, -4.0], [-6.0, -8.0], [-6.5, -4.5]
    losses, rewards_c, rewards_r = dpo_loss(*map(torch.tensor, (pi_c, pi_r, ref_c, ref_r)), beta=beta)
    # Rafailov et al. eq. 7: -log sigma(beta log pi(y_w)/ref(y_w) - beta log pi(y_l)/ref(y_l)).
    expected = [-math.log(sigmoid(beta * (a - c) - beta * (b - d))) for a, b, c, d in zip(pi_c, pi_r, ref_c, ref_r,
                                                                                           strict=True)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)  # 1.5 * 0.1 -> log(1 + e^-0.15); -1.5 * 0.1 -> ...
    assert rewards_c.tolist() == pytest.approx([0.1, -0.1])
    assert rewards_r.tolist() == pytest.approx([-0.05, 0.05])


def test_dpo_objective_by_hand_on_the_bigram_model() -> None:
    examples = [{"prompt_ids": [0], "chosen_ids": [1, 2], "rejected_ids": [2, 2],
                 "ref_chosen_logp": -3.0, "ref_rejected_logp": -2.5},
                {"prompt_ids": [2, 1], "chosen_ids": [0], "rejected_ids": [1, 0, 1],
                 "ref_chosen_logp": -1.0, "ref_rejected_logp": -4.0}]
    beta = 0.5
    pi = [(logp(0, 1) + logp(1, 2), logp(0, 2) + logp(2, 2)),
          (logp(1, 0), logp(1, 1) + logp(1, 0) + logp(0, 1))]
    ref = [(-3.0, -2.5), (-1.0, -4.0)]
    rewards = [(beta * (pc - rc), beta * (pr - rr)) for (pc, pr), (rc, rr) in zip(pi, ref, strict=True)]
    expected = sum(-math.log(sigmoid(c - r)) for c, r in rewards) / 2
    loss, metrics = DPO(beta=beta).loss(Bigram(), collate_preference(examples, pad_id=2))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx((rewards[0][0] + rewards[1][0]) / 2, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx((rewards[0][1] + rewards[1][1]) / 2, abs=1e-6)
    assert metrics["margin"] == pytest.approx(sum(c - r for c, r in rewards) / 2, abs=1e-6)
    assert metrics["accuracy"] == sum(c > r for c, r in rewards) / 2
    with pytest.raises(ConfigError, match="reference log-probs"):
        DPO().loss(Bigram(), collate_preference([{k: v for k, v in e.items() if "ref" not in k} for e in examples]))


def _pairs(n: int, seed: int) -> list[dict]:
    """Prompt: 4 random tokens and a separator (3); chosen: the prompt reversed, then eos (2); rejected:
    4 other random tokens, then eos. Something a tiny model can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(10, 60, (4,), generator=g).tolist()
        out.append({"prompt_ids": prompt + [3], "chosen_ids": prompt[::-1] + [2],
                    "rejected_ids": torch.randint(60, 120, (4,), generator=g).tolist() + [2]})
    return out


def test_dpo_reference_model_equals_cached_logprobs() -> None:
    policy = tiny_model()
    examples = _pairs(4, seed=1)
    with torch.no_grad():  # move the policy away from the reference, so the loss is not just log 2
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference = tiny_model()
    cached = precompute_reference_logprobs(reference, examples, batch_size=3)
    on_the_fly, m1 = DPO(beta=0.2, reference=reference).loss(policy, collate_preference(examples))
    from_cache, m2 = DPO(beta=0.2).loss(policy, collate_preference(cached))
    torch.testing.assert_close(on_the_fly, from_cache)
    assert m1 == pytest.approx(m2)
    assert on_the_fly.item() != pytest.approx(math.log(2), abs=1e-4)


def test_dpo_gradient_at_the_reference_is_half_beta_times_the_logprob_gradient_difference() -> None:
    """At pi = ref every margin is 0 and sigma(0) = 1/2, so the DPO gradient is
    -(beta / 2) * mean over pairs of [grad log pi(y_c) - grad log pi(y_r)] (Rafailov et al., section 4)."""
    beta = 0.3
    model = tiny_model()
    examples = precompute_reference_logprobs(model, _pairs(3, seed=2))
    batch = collate_preference(examples)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = DPO(beta=beta).loss(model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    grad_dpo = torch.autograd.grad(loss, params)
    logps, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = len(examples)
    grad_c = torch.autograd.grad(logps[:b].sum(), params, retain_graph=True)
    grad_r = torch.autograd.grad(logps[b:].sum(), params)
    for g, gc, gr in zip(grad_dpo, grad_c, grad_r, strict=True):
        torch.testing.assert_close(g, -(beta / 2) * (gc - gr) / b, atol=1e-6, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # inside DPOConfig
def test_dpo_matches_trl(tmp_path) -> None:
    """TRL's DPOTrainer loss and logged rewards on the per-token log-probs of our model equal our DPO's.
    (TRL 1.x computes the loss inside _compute_loss from its model's outputs, so a stand-in model hands it
    our per-token log-probs; the rest of the trainer is set up from a DPOConfig as its __init__ does.)"""
    trl = pytest.importorskip("trl")
    from collections import defaultdict

    from trl import DPOConfig, DPOTrainer

    if int(trl.__version__.split(".")[0]) < 1 or not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip(f"written against TRL 1.x's DPOTrainer._compute_loss; this is trl {trl.__version__}")

    beta = 0.2
    model = tiny_model()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # move the policy away from the reference
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = collate_preference(precompute_reference_logprobs(reference, _pairs(4, seed=5)))
    ours, metrics = DPO(beta=beta).loss(model, batch)

    args = DPOConfig(output_dir=str(tmp_path), beta=beta, precompute_ref_log_probs=True, use_cpu=True, report_to=[])
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.args, trainer.beta = args, args.beta
    trainer.precompute_ref_logps, trainer.loss_types = True, args.loss_type
    trainer.loss_weights = args.loss_weights or [1.0] * len(args.loss_type)
    trainer.ld_alpha, trainer.f_divergence_type = args.ld_alpha, args.f_divergence_type
    trainer.label_smoothing, trainer.use_weighting = args.label_smoothing, args.use_weighting
    trainer.aux_loss_enabled, trainer._tp_size, trainer._total_train_tokens = False, 1, 0
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = SimpleNamespace(device=CPU, gather=lambda t: t, gather_for_metrics=lambda t: t)

    def stand_in(**kwargs):  # noqa: ANN003, ANN202 - what TRL reads of a model's output
        logits = model(kwargs["input_ids"]).logits
        lp = token_logprobs(logits, shift_labels(batch["labels"]))
        zeros = torch.zeros_like(lp[:, :-1])
        return SimpleNamespace(log_probs=lp[:, :-1], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != X).long(), "ref_chosen_logps": batch["ref_chosen_logps"],
              "ref_rejected_logps": batch["ref_rejected_logps"]}
    theirs = DPOTrainer._compute_loss(trainer, stand_in, inputs, return_outputs=False)
    torch.testing.assert_close(ours, theirs.to(ours))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["rewards/chosen"] == pytest.approx(logged["rewards/chosen"], abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(logged["rewards/rejected"], abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(logged["rewards/accuracies"])
    assert metrics["margin"] == pytest.approx(logged["rewards/margins"], abs=1e-6)
    assert ours.item() != pytest.approx(math.log(2), abs=1e-3)  # (a real difference between the models)


# --------------------------------------------------------------------------------------------------
# ORPO: by hand
# --------------------------------------------------------------------------------------------------


def test_log1mexp_and_log_odds_are_accurate_where_the_naive_formula_is_not() -> None:
    xs = [-1e-5, -1e-3, -0.5, -0.7, -3.0, -40.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32)).tolist()
    # float64 math: log(1 - e^x) for the large |x|, and log(-expm1(x)) (the same quantity) where 1 - e^x cancels.
    expected = [math.log(-math.expm1(x)) for x in xs]
    assert got == pytest.approx(expected, rel=1e-5)
    x = torch.tensor(-1e-7, dtype=torch.float32)
    naive = torch.log1p(-torch.exp(x)).item()  # exp(-1e-7) rounds to 1 - 1.19e-7 in fp32: 19% off before the log
    assert naive != pytest.approx(math.log(1e-7), rel=5e-3)
    assert log1mexp(x).item() == pytest.approx(math.log(-math.expm1(-1e-7)), rel=1e-6)  # what the careful one keeps
    p = 0.3
    assert log_odds(torch.tensor([math.log(p)])).item() == pytest.approx(math.log(p / (1 - p)), rel=1e-6)
    assert math.isfinite(log_odds(torch.tensor([0.0])).item())  # p = 1 is capped, not infinite


def test_orpo_by_hand_on_the_bigram_model() -> None:
    examples = [{"prompt_ids": [0], "chosen_ids": [1, 2], "rejected_ids": [2]},
                {"prompt_ids": [2, 1], "chosen_ids": [0], "rejected_ids": [1, 0, 1]}]
    lam = 0.25
    chosen = [[logp(0, 1), logp(1, 2)], [logp(1, 0)]]
    rejected = [[logp(0, 2)], [logp(1, 1), logp(1, 0), logp(0, 1)]]
    nll = -sum(sum(c) for c in chosen) / 3  # the SFT loss: a mean over the 3 chosen tokens

    def odds(token_logps: list[float]) -> float:
        p = math.exp(sum(token_logps) / len(token_logps))  # the length-normalised likelihood
        return p / (1 - p)

    ratios = [math.log(odds(c) / odds(r)) for c, r in zip(chosen, rejected, strict=True)]
    l_or = sum(-math.log(sigmoid(x)) for x in ratios) / 2
    loss, metrics = ORPO(lam=lam).loss(Bigram(), collate_preference(examples, pad_id=1))
    assert loss.item() == pytest.approx(nll + lam * l_or, abs=1e-6)
    assert metrics["nll"] == pytest.approx(nll, abs=1e-6)
    assert metrics["or_loss"] == pytest.approx(l_or, abs=1e-6)
    assert metrics["log_odds_ratio"] == pytest.approx(sum(ratios) / 2, abs=1e-6)
    losses, r = odds_ratio_loss(torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.2)]))
    assert r.item() == pytest.approx(math.log((0.6 / 0.4) / (0.2 / 0.8)), rel=1e-6)  # log(1.5 / 0.25) = log 6
    assert losses.item() == pytest.approx(math.log(1 + 1 / 6), rel=1e-6)


def test_orpo_matches_trl_odds_ratio_loss() -> None:
    pytest.importorskip("trl")
    orpo = pytest.importorskip("trl.experimental.orpo") if _has("trl.experimental.orpo") else pytest.importorskip(
        "trl")
    cls = getattr(orpo, "ORPOTrainer", None)
    if cls is None or not hasattr(cls, "odds_ratio_loss"):
        pytest.skip("this trl has no ORPOTrainer.odds_ratio_loss")
    g = torch.Generator().manual_seed(1)
    mean_c, mean_r = (-torch.rand(5, generator=g, dtype=torch.float64) * 3 - 0.01 for _ in range(2))
    trainer = cls.__new__(cls)
    trainer.beta = 0.1
    trainer.accelerator = SimpleNamespace(device=CPU)
    theirs = cls.odds_ratio_loss(trainer, mean_c, mean_r)
    losses, ratio = odds_ratio_loss(mean_c, mean_r)
    # TRL returns beta * log sigmoid(ratio) (subtracted from the NLL), ours -log sigmoid(ratio) (added, x lambda).
    torch.testing.assert_close(-0.1 * losses, theirs[0].to(losses))
    torch.testing.assert_close(ratio.mean(), torch.as_tensor(theirs[4]).to(ratio))


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------
# End to end through the one Trainer
# --------------------------------------------------------------------------------------------------


def _sft_examples(pairs: list[dict]) -> list[dict]:
    return [{"input_ids": p["prompt_ids"] + p["chosen_ids"],
             "labels": [X] * len(p["prompt_ids"]) + p["chosen_ids"]} for p in pairs]


def _train(model: nn.Module, objective, examples: list, collate, steps: int, lr: float, run: Run | None = None):
    torch.manual_seed(0)
    source = ExampleSource(examples, 8, collate, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(model, objective, source, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), None,
                      trainer_config(steps), device=CPU, run=run, progress=False)
    trainer.fit()
    return trainer


def test_sft_then_dpo_end_to_end() -> None:
    """SFT lowers the loss on the response tokens; DPO from the SFT model then raises the implicit-reward
    accuracy on its pairs (0 at the start: every margin is exactly 0 when policy = reference)."""
    pairs = _pairs(32, seed=3)
    sft_data = _sft_examples(pairs)
    model = tiny_model()
    collate = partial(collate_sft, pad_id=0)

    def sft_loss() -> float:
        return evaluate(model, SFT(), example_batches(sft_data, 16, collate), device=CPU)["loss"]

    before = sft_loss()
    _train(model, SFT(), pack_sft_examples(sft_data, 32), collate, steps=40, lr=3e-3)
    after = sft_loss()
    assert after < before - 1.0, (before, after)

    cached = precompute_reference_logprobs(model, pairs)
    dpo = DPO(beta=0.5)

    def pair_metrics() -> dict:
        return evaluate_pairs(model, dpo, example_batches(cached, 16, collate_preference), device=CPU)

    start = pair_metrics()
    assert start["accuracy"] == 0.0 and start["margin"] == pytest.approx(0.0, abs=1e-6)
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-5)
    _train(model, dpo, cached, collate_preference, steps=15, lr=1e-3)
    end = pair_metrics()
    assert end["accuracy"] >= 0.9 and end["margin"] > 0 and end["loss"] < math.log(2), end
    assert end["pairs"] == 32


def test_reward_model_end_to_end_with_a_checkpoint(tmp_path) -> None:
    pairs = _pairs(32, seed=4)
    rm = RewardModel(tiny_model("llama-tiny"))
    objective = RewardBT()

    def metrics() -> dict:
        return evaluate_pairs(rm, objective, example_batches(pairs, 16, collate_preference), device=CPU)

    before = metrics()
    run = Run(tmp_path / "run")
    trainer = _train(rm, objective, pairs, collate_preference, steps=20, lr=3e-3, run=run)
    after = metrics()
    assert after["accuracy"] >= 0.9 and after["loss"] < before["loss"], (before, after)
    loaded = load_checkpoint(trainer.last_checkpoint, reward=True)
    assert loaded.path.name == "step-20"
    reloaded = evaluate_pairs(loaded.model, objective, example_batches(pairs, 16, collate_preference), device=CPU)
    assert reloaded["accuracy"] == after["accuracy"]
    assert reloaded["loss"] == pytest.approx(after["loss"], abs=1e-6)
    assert np.isfinite(reloaded["margin"])
