"""Helpers on token-id sequences for parts that may not import each other (the serving engine, the safety suite).

Depends on nothing else in byollm.
"""

from __future__ import annotations

from collections.abc import Sequence


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


__all__ = ["shared_prefix_length"]
