"""Prefix caching for the slot engine: a prompt that starts like an earlier one reuses that part's keys and values.

Chat requests repeat themselves: the same system prompt, the same RAG instruction block, a conversation sent
again with one more turn. The keys and values of a position depend only on the tokens up to it (causal
attention), so two prompts that share their first n tokens have the same first n rows of KV cache, in every
layer. Whoever computed them once can hand them over, and the new request prefills only its own tail.

Where the cached tokens live. The engine's cache is a few rows (slots) of max_seq_len positions
(byollm.serve.slot_cache). A row being decoded holds its request's prompt and the tokens generated so far.
A free row is not wiped when its request finishes: it keeps those keys, and the cache remembers which token ids
they belong to (`SlotKVCache.retained`), until the row is given to someone else. So on admission we look at
every row, busy or free, and take the one whose tokens share the longest prefix with the new prompt:

- a free row: the new request takes that row itself; its first n positions are already right (no copy);
- a busy row (a request decoding, or one just prefilled in this step): the new request takes a free row and
  copies the first n positions into it (`SlotKVCache.copy_prefix`, one tensor copy per layer);
- no row shares at least `MIN_PREFIX_TOKENS` tokens: the request takes the free row used longest ago (so the
  most recent prefixes survive longest) and prefills from position 0.

The shared length is capped at len(prompt) - 1: the model must still run the prompt's last token, since its
logits give the first generated token. Prefilling from position n > 0 needs nothing new from the model: the
slot's length is n, so the new tokens get positions n, n+1, ... (RoPE) and a causal mask over the n cached
keys plus themselves, exactly as the model's own KVCache continues a sequence.

Why rows, not blocks. vLLM's automatic prefix caching splits every sequence into blocks of 16 tokens and
names each block by a hash of its tokens chained with its parent block's hash, so equal prefixes find the same
blocks in a paged cache, shared in place by any number of sequences. That needs paged attention (a block table
per sequence). With slots a prefix cannot be shared in place, only copied, and a direct comparison of token
lists (a few rows of at most max_seq_len ids) is cheap and exact, so there is no hash to get wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from byollm.serve.slot_cache import SlotKVCache
from byollm.token_ids import shared_prefix_length

MIN_PREFIX_TOKENS = 16
"""Shorter shared prefixes are not worth a copy (one block in vLLM's terms): they are prefilled again."""


def longest_prefix(prompt: Sequence[int], rows: Mapping[int, Sequence[int]]) -> tuple[int, int]:
    """(row, n): the row whose tokens share the most leading tokens with `prompt`, at most len(prompt) - 1 of
    them (the last prompt token must run to give logits). (-1, 0) when no row shares any."""
    best_row, best = -1, 0
    for row, tokens in rows.items():
        n = min(shared_prefix_length(prompt, tokens), len(prompt) - 1)
        if n > best:
            best_row, best = row, n
    return best_row, best


def place(prompt: Sequence[int], cache: SlotKVCache, held: Mapping[int, Sequence[int]], free: Sequence[int],
          min_tokens: int = MIN_PREFIX_TOKENS) -> tuple[int, int]:
    """Choose the row for a new request and fill in its cached prefix; return (row, cached positions).

    held: the token ids in each busy row's cache positions; free: the rows nobody holds (they may retain a
    finished request's tokens, `cache.retained`). The module docstring says how the row is chosen.
    """
    rows = dict(held) | {row: cache.retained[row] for row in free}
    source, n = longest_prefix(prompt, rows)
    if n < min_tokens:
        source, n = -1, 0
    if source in free:
        row = source  # its first n positions are already this prompt's
    else:
        row = min(free, key=lambda r: cache.last_used[r])  # overwrite the oldest retained prefix
        if n:
            cache.copy_prefix(source, row, n)
    cache.take(row, n)
    return row, n


__all__ = ["MIN_PREFIX_TOKENS", "longest_prefix", "place"]
