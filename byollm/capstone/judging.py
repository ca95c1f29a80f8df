"""Held-out figures of a preference-tuned model that mean something: pairs and prompts it never trained on.

- **Preference accuracy** on the held-out pairs (byollm.capstone.data: their first human turns occur in no
  training pair): the *implicit-reward* accuracy of DPO, share of pairs with
  beta * [(log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))] > 0, which is what DPO
  optimises (the starting model scores exactly 0 on every pair: a tie, counted as half), and the *ranking*
  accuracy log pi(chosen) > log pi(rejected), which needs no reference, for both models.
- **Win rate** of the tuned model's greedy answers over its starting model's on held-out prompts, judged by a
  reward model trained on the *judge* pairs, which are disjoint from the policy's pairs, so the judge has not
  learnt the exact preferences the policy was fitted to. Its own held-out accuracy says how far to trust it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from byollm.checkpoint import load_checkpoint
from byollm.data.instruct import PreferencePair, preference_examples, to_pairs
from byollm.data.readers import read_jsonl_file
from byollm.train.examples import collate_preference
from byollm.train.objectives import sequence_logprobs


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, examples: list[dict], pad_id: int, batch_size: int = 8
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of each pair's chosen and rejected replies (prompt tokens excluded)."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(examples), batch_size):
        batch = collate_preference(examples[start:start + batch_size], pad_id)
        logps, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     batch["position_ids"])
        c, r = logps.double().chunk(2)
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


def load_heldout(policy: Path, reference: Path, heldout: Path) -> tuple[Any, Any, list[PreferencePair]]:
    """The two checkpoints (loaded once for both measurements below) and the held-out pairs."""
    pairs, _ = to_pairs(read_jsonl_file(heldout), source=heldout.name)
    return load_checkpoint(policy), load_checkpoint(reference), pairs


def heldout_preferences(pol: Any, ref: Any, pairs: list[PreferencePair], max_len: int, beta: float = 0.1
                        ) -> dict[str, Any]:
    """Implicit-reward and ranking accuracy of the loaded `pol` (and ranking accuracy of `ref`) on `pairs`."""
    tok = pol.tokenizer
    examples, report = preference_examples(tok, pairs, max_len)
    pad = tok.pad_id or 0
    pc, pr = pair_logprobs(pol.model, examples, pad)
    rc, rr = pair_logprobs(ref.model, examples, pad)
    margin = beta * ((pc - rc) - (pr - rr))
    n = len(examples)

    def share(x: torch.Tensor) -> float:
        return float(((x > 0).double() + 0.5 * (x == 0).double()).mean())  # ties count half

    return {"pairs": n, "data": str(report), "implicit_reward_accuracy": share(margin),
            "implicit_reward_margin": float(margin.mean()), "ranking_accuracy": share(pc - pr),
            "ranking_accuracy_reference": share(rc - rr)}


def win_rate(pol: Any, ref: Any, judge: Path, pairs: list[PreferencePair], *, prompts: int, tokens: int,
             max_len: int, seed: int = 0) -> dict[str, Any]:
    """The judge's verdict on greedy answers of the loaded `pol` vs `ref` to the first `prompts` held-out prompts."""
    from byollm.tokenizer.chat_format import chat_format
    from byollm.train.align import answer_prompts
    from byollm.train.rewards import RewardModelScorer, load_reward_model

    tok = pol.tokenizer
    fmt = chat_format(tok)
    seen: set[str] = set()
    chosen_prompts = []
    for p in pairs:  # one answer per distinct prompt that leaves room for the answer
        key = repr(p.prompt)
        if key not in seen and len(fmt.encode_prompt(p.prompt)) <= max_len - tokens:
            seen.add(key)
            chosen_prompts.append(p.prompt)
    chosen_prompts = chosen_prompts[:prompts]
    a = answer_prompts(pol.model, tok, chosen_prompts, tokens, 0.0, seed)
    b = answer_prompts(ref.model, tok, chosen_prompts, tokens, 0.0, seed)
    scorer = RewardModelScorer(load_reward_model(judge, tokenizer=tok), pad_id=tok.pad_id or 0)
    ids = [fmt.encode_prompt(p) for p in chosen_prompts]
    end = list(fmt.stop_ids[:1])
    sa = scorer(ids, [tok.encode(x) + end for x in a])
    sb = scorer(ids, [tok.encode(x) + end for x in b])
    wins, ties = int((sa > sb).sum()), int((sa == sb).sum())
    n = len(chosen_prompts)
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": (wins + 0.5 * ties) / n if n else None, "identical_answers": same,
            "example": {"prompt": chosen_prompts[0][-1]["content"][:200], "tuned": a[0][:200], "start": b[0][:200]}
            if n else None}
