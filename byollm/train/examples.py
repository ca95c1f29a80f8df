"""Examples -> batches: the data side of instruction tuning and preference learning.

The objectives (`byollm.train.objectives`) read batches that the collators here build from lists of examples,
served by `ExampleSource` (a `BatchSource`) for training and by `example_batches` for evaluation.

Examples (what the data converters produce; lists of token ids):

    SFT          {"input_ids": [...], "labels": [...]}   labels[i] = input_ids[i] where trained, -100 elsewhere;
                                                          same length, NOT shifted (Hugging Face's convention)
    preference   {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}   responses end with their
                                                          end token, so the model also learns where to stop

Batches are right-padded:

    input_ids       [ A  B  C  D  pad pad ]   labels    [-100 -100  C  D -100 -100]   (the prompt A B masked)
    attention_mask  [ 1  1  1  1   0   0  ]   positions [ 0  1  2  3  4  5 ]

With right padding every real token comes before every pad, so causal attention alone already keeps real
tokens from seeing padding, and positions 0, 1, 2, ... are right for every row: padding cannot change a loss.

Packed SFT (`pack_sft_examples`): several examples share one row; position ids restart at each example and
a block-diagonal (B, 1, T, T) mask keeps attention inside each example, so a packed row computes exactly
what the examples would alone, with no compute wasted on padding.

A preference batch puts the B chosen sequences (prompt + chosen) in rows 0..B-1 and the B rejected ones in
rows B..2B-1, so one forward pass scores both (as TRL's "concatenated forward" does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from byollm.errors import DataError
from byollm.tokenizer.chat_template import IGNORE_INDEX

logger = logging.getLogger("byollm.train")

Example = dict[str, Any]
Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Checking examples: bad data is an error that names the example, never a silent drop
# --------------------------------------------------------------------------------------------------


def _ids(example: Example, key: str, what: str) -> list[int]:
    if not isinstance(example, dict) or key not in example:
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise DataError(f"{what} example has no '{key}' (it has {keys}); convert the data with byollm.data first")
    ids = example[key]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
        raise DataError(f"{what} example's '{key}' must be a list of token ids (ints)")
    return list(ids)


def check_sft_example(example: Example, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of an SFT example, or a DataError saying what is wrong with it."""
    ids, labels = _ids(example, "input_ids", "SFT"), _ids(example, "labels", "SFT")
    if len(ids) != len(labels):
        raise DataError(f"SFT example has {len(ids)} input_ids but {len(labels)} labels; they must align")
    if max_length is not None and len(ids) > max_length:
        raise DataError(f"SFT example has {len(ids)} tokens, more than max_length={max_length}; drop or "
                        "truncate such examples when preparing the data")
    if all(label == IGNORE_INDEX for label in labels[1:]):  # (labels[0] is never predicted: nothing comes before)
        raise DataError(f"SFT example of {len(ids)} tokens has no trained token (every label after the first is "
                        f"{IGNORE_INDEX}); an empty response? drop it when preparing the data")
    return ids, labels


def check_preference_example(example: Example, max_length: int | None = None) -> tuple[list[int], ...]:
    """(prompt_ids, chosen_ids, rejected_ids), or a DataError saying what is wrong with the example."""
    prompt = _ids(example, "prompt_ids", "preference")
    chosen, rejected = _ids(example, "chosen_ids", "preference"), _ids(example, "rejected_ids", "preference")
    if not prompt:
        raise DataError("preference example has an empty prompt: the first response token needs a token before it")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response:
            raise DataError(f"preference example has an empty {name} response; drop it when preparing the data")
        if max_length is not None and len(prompt) + len(response) > max_length:
            raise DataError(f"preference example's prompt + {name} is {len(prompt) + len(response)} tokens, more "
                            f"than max_length={max_length}; drop or truncate such pairs when preparing the data")
    return prompt, chosen, rejected


# --------------------------------------------------------------------------------------------------
# Collators: examples -> one padded batch
# --------------------------------------------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], fill: int, length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _padded_batch(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> Batch:
    t = max(len(r) for r in ids)
    lengths = torch.tensor([len(r) for r in ids])
    return {
        "input_ids": _pad(ids, pad_id, t),
        "labels": _pad(labels, IGNORE_INDEX, t),  # padding is never trained
        "attention_mask": (torch.arange(t)[None, :] < lengths[:, None]).long(),
        "position_ids": torch.arange(t)[None, :].expand(len(ids), t).contiguous(),  # right padding: 0, 1, 2, ...
    }


def collate_sft(examples: Sequence[Example], pad_id: int = 0, max_length: int | None = None) -> Batch:
    """SFT examples (or packed rows from `pack_sft_examples`) -> {input_ids, labels, attention_mask,
    position_ids}, right-padded to the longest. Packed rows get a (B, 1, T, T) block-diagonal mask."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    if "segment_ids" in examples[0]:
        return _collate_packed(examples, pad_id, max_length)
    pairs = [check_sft_example(e, max_length) for e in examples]
    return _padded_batch([p[0] for p in pairs], [p[1] for p in pairs], pad_id)


def pack_sft_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Greedily pack consecutive SFT examples into rows of at most max_length tokens.

    Each row holds input_ids, labels, position_ids (restarting at 0 for each example) and segment_ids (which
    example a token belongs to, 0, 1, ...). The first token of each example gets label -100: in a packed row
    it would be predicted from the end of the previous example, which it has nothing to do with (alone, it
    is never predicted either). Greedy in order keeps it simple and deterministic; rows are shuffled later."""
    rows: list[Example] = []
    row: Example | None = None
    for example in examples:
        ids, labels = check_sft_example(example, max_length)
        if row is None or len(row["input_ids"]) + len(ids) > max_length:
            row = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
            rows.append(row)
        segment = row["segment_ids"][-1] + 1 if row["segment_ids"] else 0
        row["input_ids"] += ids
        row["labels"] += [IGNORE_INDEX] + labels[1:]
        row["position_ids"] += list(range(len(ids)))
        row["segment_ids"] += [segment] * len(ids)
    return rows


def _collate_packed(rows: Sequence[Example], pad_id: int, max_length: int | None) -> Batch:
    for row in rows:
        if "segment_ids" not in row or "position_ids" not in row:
            raise DataError("a batch mixes packed rows and plain SFT examples; pack all of them or none")
        if max_length is not None and len(row["input_ids"]) > max_length:
            raise DataError(f"packed row has {len(row['input_ids'])} tokens, more than max_length={max_length}")
    t = max(len(r["input_ids"]) for r in rows)
    segments = _pad([r["segment_ids"] for r in rows], -1, t)  # padding is segment -1
    # Query i may see key j when both are in the same example and j <= i. Padding positions only see
    # padding (themselves included, so no softmax row is empty); real tokens never see padding.
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return {
        "input_ids": _pad([r["input_ids"] for r in rows], pad_id, t),
        "labels": _pad([r["labels"] for r in rows], IGNORE_INDEX, t),
        "attention_mask": (same & causal)[:, None],  # (B, 1, T, T)
        "position_ids": _pad([r["position_ids"] for r in rows], 0, t),
    }


def collate_preference(examples: Sequence[Example], pad_id: int = 0, max_length: int | None = None) -> Batch:
    """Preference examples -> one batch of 2B rows: prompt + chosen in rows 0..B-1, prompt + rejected in rows
    B..2B-1, with the prompt's labels -100. When the examples carry cached reference log-probabilities
    (`precompute_reference_logprobs`), the batch has them as ref_chosen_logps / ref_rejected_logps (B,)."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    checked = [check_preference_example(e, max_length) for e in examples]
    ids = [p + c for p, c, _ in checked] + [p + r for p, _, r in checked]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c, _ in checked] + [[IGNORE_INDEX] * len(p) + r for p, _, r in checked]
    batch = _padded_batch(ids, labels, pad_id)
    cached = ["ref_chosen_logp" in e for e in examples]
    if all(cached):
        batch["ref_chosen_logps"] = torch.tensor([e["ref_chosen_logp"] for e in examples], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([e["ref_rejected_logp"] for e in examples], dtype=torch.float32)
    elif any(cached):
        raise DataError("some preference examples have cached reference log-probs and some do not; "
                        "run precompute_reference_logprobs over all of them")
    return batch


# --------------------------------------------------------------------------------------------------
# Serving batches: shuffled epochs, exact resume, sharded over ranks
# --------------------------------------------------------------------------------------------------


class ExampleSource:
    """A `BatchSource` over a list of examples (or packed rows): shuffled epochs, resumable, sharded.

    Like `RandomWindowSampler`, the GLOBAL batch of step s is a pure function of (seed, s, global batch):
    epoch e is the permutation numpy.random.default_rng([seed, e]) draws, cut into global batches of
    batch_size * world_size examples (the last len % global of each epoch are left out of that epoch; another
    permutation leaves out others), and rank r takes its slice [r * batch_size, (r + 1) * batch_size). So a
    resumed run sees exactly the batches it would have, and 2 ranks x 4 see what 1 rank x 8 sees.
    `collate` turns a list of examples into a batch (e.g. functools.partial(collate_sft, pad_id=...))."""

    def __init__(self, examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], *,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
        if len(examples) < batch_size * world_size:
            raise DataError(f"{len(examples)} examples are fewer than one global batch ({batch_size} x "
                            f"{world_size} ranks); use a smaller batch_size or more data")
        self.examples, self.collate = examples, collate
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, int(seed), rank, world_size
        self.step = 0  # batches drawn so far

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch_size

    @property
    def epoch(self) -> float:
        """Passes over the data so far (fractional)."""
        return self.step / self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """This rank's example indices at `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        start = i * self.global_batch_size + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def next_batch(self) -> Any:
        batch = self.collate([self.examples[int(j)] for j in self.indices(self.step)])
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Any]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. Another seed, global batch or data size still loads (you may change
        them on purpose), but the batches then differ from an uninterrupted run, which is logged."""
        now = {"seed": self.seed, "global_batch_size": self.global_batch_size, "num_examples": len(self.examples)}
        for key, value in now.items():
            if key in state and state[key] != value:
                logger.warning("resuming the example source with %s=%s (saved: %s): batches differ from an "
                               "uninterrupted run", key, value, state[key])
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"example source state has no valid 'step' (got {step!r}); is it from another source?")
        self.step = step


def example_batches(examples: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Any], *,
                    rank: int = 0, world_size: int = 1) -> Iterator[Any]:
    """Every example once, in order, for evaluation: batch k is examples[k*B : (k+1)*B] (the last may be
    smaller); rank r takes batches r, r + world_size, ... Call again for a fresh pass."""
    starts = range(0, len(examples), batch_size)
    for k, start in enumerate(starts):
        if k % world_size == rank:
            yield collate(list(examples[start : start + batch_size]))


__all__ = ["Batch", "Example", "ExampleSource", "check_preference_example", "check_sft_example", "collate_preference",
           "collate_sft", "example_batches", "pack_sft_examples"]
