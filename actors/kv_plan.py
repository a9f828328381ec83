"""KV-cache planning for the static decoder: memory planned from the prompts a call holds, not discovered.

The static decoder (actors/slot_decoder.py) reserves, for every slot, a cache as long as the longest
sequence it may hold. One cache sized for the longest item of a call makes every slot pay for it: a
call of many 500-token prompts and one 30,000-token transcript got a handful of slots, or a cache so
large that the prefill next to it ran out of memory. So a call is planned first:

- each item needs `prompt + max_new` cache positions; items are grouped into length classes (powers of
  two), and each class gets its own cache, as long as its longest item (rounded up to 128);
- a class gets as many slots as the memory budget holds at that length (at most `max_slots`);
- an item longer than the model's context, or whose cache alone would not fit the budget in one slot,
  is refused with its token count and the limit, before anything runs.

Pure arithmetic, so it is tested on CPU (tests/test_kv_plan.py) with the real model's sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

ROUND = 128  # cache lengths are multiples of this (CUDA graphs and kernels like aligned sizes)
SMALLEST_CLASS = 1024


@dataclass(frozen=True)
class CacheGroup:
    """Items that share one static cache: `slots` sequences of up to `max_len` positions each."""
    max_len: int
    slots: int
    items: tuple[int, ...]


@dataclass(frozen=True)
class KvPlan:
    groups: tuple[CacheGroup, ...]
    refused: dict[int, str]  # item index -> why it cannot run (token count and the limit)


def length_class(need: int) -> int:
    """The power of two at or above `need` (at least SMALLEST_CLASS)."""
    size = SMALLEST_CLASS
    while size < need:
        size *= 2
    return size


def plan_kv(prompt_tokens: list[int], max_new: list[int], *, bytes_per_token: int, budget_bytes: int,
            max_slots: int, context: int) -> KvPlan:
    """Group the items of one call into caches that fit `budget_bytes` (see the module docstring).

    `bytes_per_token`: the cache's bytes per position of one sequence (2 x layers x kv heads x head dim x
    dtype size); `context`: the model's longest sequence (max_position_embeddings).
    """
    refused: dict[int, str] = {}
    classes: dict[int, list[int]] = {}
    fit_tokens = budget_bytes // max(1, bytes_per_token)
    for i, (prompt, new) in enumerate(zip(prompt_tokens, max_new)):
        need = prompt + new
        if need > context:
            refused[i] = (f"prompt of {prompt} tokens + {new} new tokens exceeds the model's context of "
                          f"{context} tokens")
        elif _rounded(need) > fit_tokens:
            refused[i] = (f"prompt of {prompt} tokens + {new} new tokens needs {_gb(_rounded(need) * bytes_per_token)}"
                          f" of KV cache; {_gb(budget_bytes)} is available on this replica")
        else:
            classes.setdefault(length_class(need), []).append(i)
    groups = []
    for size in sorted(classes):
        items = classes[size]
        max_len = min(_rounded(max(prompt_tokens[i] + max_new[i] for i in items)), _rounded(context))
        slots = max(1, min(max_slots, len(items), fit_tokens // max_len))
        groups.append(CacheGroup(max_len, slots, tuple(items)))
    return KvPlan(tuple(groups), refused)


def _rounded(n: int) -> int:
    return ROUND * -(-n // ROUND)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
