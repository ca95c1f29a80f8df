"""Batches of token windows for training and evaluation: deterministic, resumable and sharded for DDP.

A language model learns to predict token t+1 from tokens <= t, so a training example is a window of
block_size + 1 consecutive tokens: inputs x = window[:-1], targets y = window[1:] (x shifted by one).

    >>> sampler = RandomWindowSampler(load_split(d, "train"), batch_size=12, block_size=64, seed=1337)
    >>> x, y = sampler.next_batch()          # two (12, 64) int64 tensors
    >>> state = sampler.state_dict()         # save with the checkpoint; load_state_dict continues identically

Data parallel: sampling is defined by a GLOBAL SAMPLE INDEX. Sample i is one window whose offset is a pure
function of (seed, i): the offsets come in chunks of `chunk` samples, chunk c drawn by
numpy.random.default_rng([seed, c]). Each call of next_batch consumes the next batch_size * world_size
samples, and rank r takes samples [position + r * batch_size, position + (r + 1) * batch_size). The state
to resume from is just `position` (samples consumed so far, over all ranks) and the chunk size, so:
  - 2 ranks x 6 windows see exactly the 12 windows that 1 rank x 12 sees;
  - a run saved at world size 2 resumes at 1 or at 3 (same global batch: batch_size x grad_accum x ranks)
    and consumes exactly the samples an uninterrupted run would have: none twice, none skipped. (With
    another global batch it still continues at the same sample, only the step boundaries move.)
A fresh run's chunk is its per-call global batch, so chunk c is exactly the global batch of call c.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from byollm.errors import DataError

logger = logging.getLogger("byollm.data")


def _check_tokens(tokens: np.ndarray, block_size: int) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError("tokens must be a 1-D numpy array (or memmap) of integer token ids")
    if block_size < 1:
        raise DataError(f"block_size must be at least 1, got {block_size}")
    if len(tokens) < block_size + 1:
        raise DataError(
            f"the split has {len(tokens):,} tokens, fewer than block_size + 1 = {block_size + 1}; "
            "use a smaller block_size or more data"
        )


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")


def windows(tokens: np.ndarray, offsets: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[i] = tokens[o_i : o_i + length], y[i] = tokens[o_i + 1 : o_i + length + 1], as int64 tensors."""
    idx = np.asarray(offsets, dtype=np.int64)[:, None] + np.arange(length + 1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # fancy indexing reads only these tokens
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class RandomWindowSampler:
    """Random windows of block_size + 1 tokens for pretraining (see the module docstring for the sharding)."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_tokens(tokens, block_size)
        _check_rank(batch_size, rank, world_size)
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
        self.tokens = tokens
        self.batch_size, self.block_size, self.seed = batch_size, block_size, int(seed)
        self.rank, self.world_size = rank, world_size
        self.position = 0  # global samples consumed so far (all ranks): the next call starts at this index
        self.chunk = self.global_batch_size  # samples per random draw (kept from the run's start on resume)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def step(self) -> int:
        """Calls of next_batch so far (at this global batch size)."""
        return self.position // self.global_batch_size

    def sample_offsets(self, start: int, count: int) -> np.ndarray:
        """Window start positions of global samples start, ..., start + count - 1: a pure function of
        (seed, chunk, sample index), whatever the number of ranks."""
        out = np.empty(count, dtype=np.int64)
        for j, i in enumerate(range(start, start + count)):
            c, k = divmod(i, self.chunk)
            if self._cached is None or self._cached[0] != c:
                rng = np.random.default_rng([self.seed, c])
                self._cached = (c, rng.integers(0, len(self.tokens) - self.block_size, size=self.chunk))
            out[j] = self._cached[1][k]
        return out

    def global_offsets(self, step: int) -> np.ndarray:
        """Start positions of all ranks' windows at call `step` (from a fresh start at this global batch)."""
        return self.sample_offsets(step * self.global_batch_size, self.global_batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (batch_size, block_size) int64 inputs and targets of the next samples."""
        offsets = self.sample_offsets(self.position + self.rank * self.batch_size, self.batch_size)
        self.position += self.global_batch_size
        return windows(self.tokens, offsets, self.block_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "chunk": self.chunk,
            "step": self.step,
            "seed": self.seed,
            "block_size": self.block_size,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state, on any number of ranks: at the saved global sample index, with the
        saved chunk. A different seed or block size still loads (you may change them on purpose) but the data
        then differs from an uninterrupted run, which is logged."""
        if "position" in state:  # (older states had only "step", at their global batch)
            position, chunk = state["position"], state.get("chunk", state.get("global_batch_size"))
            if not isinstance(position, int) or position < 0 or not isinstance(chunk, int) or chunk < 1:
                raise DataError(f"sampler state has an invalid position/chunk ({position!r}, {chunk!r})")
            self.position, self.chunk, self._cached = position, chunk, None
            for key in ("seed", "block_size"):
                if key in state and state[key] != getattr(self, key):
                    logger.warning("resuming the data sampler with %s=%s (saved: %s): batches differ from an "
                                   "uninterrupted run", key, getattr(self, key), state[key])
            return
        for key in ("seed", "block_size", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                logger.warning(
                    "resuming the data sampler with %s=%s (saved: %s): batches differ from an uninterrupted run",
                    key,
                    getattr(self, key),
                    state[key],
                )
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise DataError(f"sampler state has no valid 'step' (got {step!r}); is it from another kind of sampler?")
        self.position = step * self.global_batch_size


def eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    max_batches: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A FIXED set of max_batches random batches (the same on every call), for a cheap, comparable val loss.

    The offsets come from numpy.random.default_rng(seed), independent of training. With world_size > 1, rank
    r gets batches r, r + world_size, ...: average the per-batch losses over all ranks' batches.
    """
    _check_tokens(tokens, block_size)
    _check_rank(batch_size, rank, world_size)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, len(tokens) - block_size, size=(max_batches, batch_size))
    for b in range(rank, max_batches, world_size):
        yield windows(tokens, offsets[b], block_size)


class SequentialSampler:
    """Non-overlapping windows in order, covering every target exactly once: exact full-split evaluation.

    Window i holds x = tokens[i*T : i*T + T] and y = tokens[i*T + 1 : i*T + T + 1]. The (len - 1) // T full
    windows come in batches of batch_size (the last may be smaller); the remaining (len - 1) % T targets, if
    any, come last as a batch of one shorter window. Sum the token losses and divide by num_targets. With
    world_size > 1, rank r takes batches r, r + world_size, ...; sum the losses and counts over ranks.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, rank: int = 0, world_size: int = 1):
        _check_tokens(tokens, 1)
        _check_rank(batch_size, rank, world_size)
        if block_size < 1:
            raise DataError(f"block_size must be at least 1, got {block_size}")
        self.tokens = tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size = rank, world_size
        self.n_windows, self.tail = divmod(len(tokens) - 1, block_size)

    @property
    def num_targets(self) -> int:
        """Targets over all ranks: every token but the first."""
        return len(self.tokens) - 1

    def _batches(self) -> list[tuple[np.ndarray, int]]:
        starts = np.arange(self.n_windows, dtype=np.int64) * self.block_size
        out = [(starts[i : i + self.batch_size], self.block_size) for i in range(0, self.n_windows, self.batch_size)]
        if self.tail:
            out.append((np.array([self.n_windows * self.block_size]), self.tail))
        return out

    def __len__(self) -> int:
        return len(self._batches()[self.rank :: self.world_size])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for offsets, length in self._batches()[self.rank :: self.world_size]:
            yield windows(self.tokens, offsets, length)
