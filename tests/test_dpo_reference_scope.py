"""DPO computes the frozen reference's log-probs only for the train pairs its run reads (`drawn_indices`), and that
changes nothing: the same batches, the same reference log-probs and the same losses as a run that precomputes
them for every pair. Checked against what `ExampleSource` actually serves and against a full precompute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_chat_base

import byollm.train.align as align_module
from byollm.train.align import dpo, drawn_indices, load_align_config
from byollm.train.examples import ExampleSource


@pytest.mark.parametrize(("n", "batch", "draws", "world"), [(37, 4, 3, 1), (37, 4, 12, 1), (40, 3, 5, 2)])
def test_drawn_indices_are_the_examples_the_source_serves(n: int, batch: int, draws: int, world: int) -> None:
    for rank in range(world):
        source = ExampleSource(list(range(n)), batch, list, seed=7, rank=rank, world_size=world)
        served = sorted({i for _ in range(draws) for i in source.next_batch()})
        assert drawn_indices(n, batch, draws, seed=7, rank=rank, world_size=world) == served
    # 3 batches of 4 read 12 of 37; 12 batches (past one epoch of 9) read them all but one epoch's leftover at most
    assert len(drawn_indices(37, 4, 3, seed=7)) == 12 and len(drawn_indices(37, 4, 12, seed=7)) > 33


def test_dpo_reads_the_same_pairs_and_losses_as_with_a_full_reference_precompute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_chat_base(tmp_path)
    pairs = [{"prompt": f"How do I bake bread {i}?" + " Please." * (i % 4),
              "chosen": "Mix flour and water, then bake it." + " Knead it well." * (i % 3),
              "rejected": "I will not tell you." + " No." * (i % 5)} for i in range(48)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    served: dict[str, list[dict]] = {}  # run name -> the train examples the run's source holds

    class Recording(ExampleSource):
        def __init__(self, examples, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
            served[name] = list(examples)
            super().__init__(examples, *args, **kwargs)

    monkeypatch.setattr(align_module, "ExampleSource", Recording)

    def run(run_name: str) -> tuple[list[float], dict, dict]:
        cfg = load_align_config(None, {
            "name": run_name, "max_steps": 3, "batch_size": 4, "device": "cpu", "dtype": "fp32",
            "out_dir": str(tmp_path), "lr": 3e-3, "min_lr": 0.0, "warmup_steps": 1, "eval_interval": 0,
            "log_interval": 1, "sample_tokens": 4, "align.base": str(base), "align.dataset": str(data),
            "align.max_len": 96, "align.eval_batch_size": 8, "align.sample_prompts": [], "align.beta": 0.5})
        result = dpo(cfg, progress=False)
        events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in events if e.get("event") == "train"], result.before, result.after

    name = "scoped"
    losses, before, after = run(name)
    name = "full"  # the previous behaviour: every train pair's reference log-probs, drawn or not
    monkeypatch.setattr(align_module, "drawn_indices", lambda n, *args, **kwargs: list(range(n)))
    full_losses, full_before, full_after = run(name)

    scoped, full = served["scoped"], served["full"]
    assert len(scoped) == len(full) == 43  # 48 records, 5 held out: the source's length (and so its order) is kept
    drawn = [i for i, e in enumerate(scoped) if "ref_chosen_logp" in e]
    assert len(drawn) == 12 and all("ref_chosen_logp" in e for e in full)  # 3 steps x 4 pairs: 12 of 43 scored
    for i in drawn:  # the same numbers as the full precompute's, bit for bit
        assert (scoped[i]["ref_chosen_logp"], scoped[i]["ref_rejected_logp"]) == \
            (full[i]["ref_chosen_logp"], full[i]["ref_rejected_logp"])
    assert len(losses) == 3 and losses == full_losses  # identical training
    assert before == full_before and after == full_after


def test_dpo_held_out_ranking_accuracy_comes_from_the_same_pass() -> None:
    """held_out_metrics reads the reference-free ranking from DPO's metrics (one pass over the held-out pairs);
    it equals the separate measurement, which scores every pair against a zero reference."""
    import random
    from functools import partial

    import torch

    from byollm.model import GPT, preset
    from byollm.train.align import held_out_metrics
    from byollm.train.examples import example_batches
    from byollm.train.objectives import evaluate_pairs

    def ranking_accuracy(model, pairs, collate, batch_size, device):  # noqa: ANN001, ANN202 - the old separate pass
        zeroed = [{**e, "ref_chosen_logp": 0.0, "ref_rejected_logp": 0.0} for e in pairs]  # a uniform reference
        return evaluate_pairs(model, DPO(1.0), example_batches(zeroed, batch_size, collate), device=device)["accuracy"]
    from byollm.train.examples import collate_preference
    from byollm.train.objectives import DPO, precompute_reference_logprobs

    torch.manual_seed(0)
    reference, policy = GPT(preset("llama-tiny")), GPT(preset("llama-tiny"))
    rng = random.Random(0)
    ids = lambda k: [rng.randrange(policy.config.vocab_size) for _ in range(rng.randint(1, k))]  # noqa: E731
    pairs = [{"prompt_ids": ids(20), "chosen_ids": ids(12), "rejected_ids": ids(12)} for _ in range(20)]
    val = precompute_reference_logprobs(reference, pairs, batch_size=8)
    collate, cpu = partial(collate_preference, pad_id=0), torch.device("cpu")
    got = held_out_metrics("dpo", policy, DPO(0.1), val, collate, 8, cpu, None)
    assert got["ranking_accuracy"] == ranking_accuracy(policy, val, collate, 8, cpu)
    assert 0 < got["ranking_accuracy"] < 1 and got["pairs"] == 20
