"""The slot KV cache of the batching engine: one row of keys and values per running request.

`byollm.model.KVCache` holds one batch that grows together: every row has the same length. The engine's
requests join and leave between steps, so each row here has a length of its own. A request owns one row
(slot) from admission to finish; `bind` says which rows the next forward pass reads and writes, and the
cache then speaks the model's KVCache interface (`update`, `length`, `advance`) for those rows, each
writing at its own length. The engine keeps its decoding requests in rows 0..n-1 (`swap` fills the gap a
finished one leaves), so a batched decode reads a plain slice, never a gather of scattered rows.

A free row is not wiped: it keeps the keys and values of its last request, and `retained` the token ids
they belong to, until the row is given out again. That is what prefix caching reuses
(byollm.serve.prefix_cache): a new prompt that starts like a retained one takes that row, or copies the shared
positions from a busy one (`copy_prefix`), and only computes the rest.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    """Keys and values for `n_slots` independent sequences: per layer (n_slots, G, max_len, D), and a length
    per slot. It speaks the model's KVCache interface (`update`, `length`, `advance`) for the rows chosen by
    `bind(start, stop)` before each forward pass; each bound row writes at its own length."""

    def __init__(self, n_layer: int, n_slots: int, max_len: int, n_kv_head: int, head_dim: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        shape = (n_slots, n_kv_head, max_len, head_dim)
        # Zeros, not empty: positions past a row's length are read (and masked out) by batched decode steps;
        # masked garbage that happened to be NaN would still poison the output (0 * NaN = NaN).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.lengths = [0] * n_slots  # positions filled in each slot
        self._rows = slice(0, 0)  # the rows the next forward pass reads and writes
        self._write_at: int | tuple[torch.Tensor, torch.Tensor] = 0
        self._read_len = 0
        # Prefix caching (byollm.serve.prefix_cache): a free row keeps its keys until it is given out again, and
        # `retained` says which token ids they belong to; `last_used` picks the row to overwrite (the oldest).
        self.retained: list[list[int]] = [[] for _ in range(n_slots)]
        self.last_used = [0] * n_slots
        self._clock = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def length(self) -> int:
        """The longest bound row. The model only uses it when not given position_ids and a mask, i.e. for a
        prefill into one slot: 0 for an empty slot, or the positions already there (a cached prefix, earlier
        chunks), which the new tokens then follow and attend to."""
        return max(self.lengths[self._rows], default=0)

    def bind(self, start: int, stop: int, new_tokens: int) -> None:
        """Make the next forward pass (of `new_tokens` per row) use slots start..stop-1."""
        self._rows = slice(start, stop)
        lengths = self.lengths[self._rows]
        if max(lengths) + new_tokens > self.max_len:
            raise ValueError(f"KV cache slots hold {self.max_len} positions; cannot add {new_tokens} "
                             f"at {max(lengths)}")
        if min(lengths) == max(lengths):  # every row writes at the same position: a plain slice
            self._write_at = lengths[0]
        else:  # one new token per row, each at its own position: indexed writes (rows, positions)
            assert new_tokens == 1, "rows of different lengths take one token each"
            device = self.k[0].device
            self._write_at = (torch.arange(start, stop, device=device), torch.tensor(lengths, device=device))
        self._read_len = max(lengths) + new_tokens  # keys beyond the longest row are never read

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self._write_at, int):
            at = self._write_at
            self.k[layer][self._rows, :, at:at + k.size(2)] = k
            self.v[layer][self._rows, :, at:at + k.size(2)] = v
        else:
            rows, positions = self._write_at
            self.k[layer][rows, :, positions] = k[:, :, 0]  # row i writes its (G, D) at positions[i]
            self.v[layer][rows, :, positions] = v[:, :, 0]
        # A view, no copy: the bound rows are contiguous and only the first _read_len positions are needed.
        return self.k[layer][self._rows, :, :self._read_len], self.v[layer][self._rows, :, :self._read_len]

    def advance(self, n: int) -> None:
        for i in range(self._rows.start, self._rows.stop):
            self.lengths[i] += n

    # ---- rows: what they hold, moving them, reusing them -----------------------------------------
    def filled(self, slot: int) -> int:
        """Positions of `slot` that hold real keys: its length, or for a free row what it retains."""
        return self.lengths[slot] or len(self.retained[slot])

    def swap(self, a: int, b: int) -> None:
        """Exchange rows `a` and `b`: their keys and values, lengths, retained tokens and last use."""
        if a == b:
            return
        n = max(self.filled(a), self.filled(b))
        for cache in self.k + self.v:
            cache[[a, b], :, :n] = cache[[b, a], :, :n]  # advanced indexing on the right: a copy, then the write
        for values in (self.lengths, self.retained, self.last_used):
            values[a], values[b] = values[b], values[a]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make row `dst` hold the first `n` positions of row `src` (one copy per layer): a shared prefix."""
        for cache in self.k + self.v:
            cache[dst, :, :n] = cache[src, :, :n]
        self.touch(src)

    def take(self, slot: int, length: int = 0) -> None:
        """Give `slot` to a new request whose first `length` positions are already in it."""
        self.lengths[slot], self.retained[slot] = length, []
        self.touch(slot)

    def free(self, slot: int, tokens: list[int] | None = None) -> None:
        """Empty `slot`. `tokens`: the ids whose keys and values it holds, kept for reuse until overwritten."""
        self.lengths[slot] = 0
        self.retained[slot] = list(tokens or [])[:self.max_len]
        self.touch(slot)

    def touch(self, slot: int) -> None:
        self._clock += 1
        self.last_used[slot] = self._clock


__all__ = ["SlotKVCache"]
