"""User reward functions that tests name by 'module:function' path, as a user's config would."""

from __future__ import annotations

import asyncio
import os
import time

from asyncrl.types import Prompt, Reward


def answer_prefix(prompt: Prompt, response: str) -> float:
    """Fraction of the answer's leading characters the response gets right; raises on a
    response that starts with '9' (a reward crash the pool must count, never score as 0)."""
    if response.startswith("9"):
        raise ValueError("responses starting with 9 crash this reward")
    answer = prompt.answer or ""
    hits = 0
    for a, b in zip(response, answer, strict=False):
        if a != b:
            break
        hits += 1
    return hits / max(len(answer), 1)


async def slow_on_marker(prompt: Prompt, response: str) -> Reward:
    """Sleeps past any sane timeout when the prompt text contains 'slow'."""
    if "slow" in prompt.text:
        await asyncio.sleep(60)
    return Reward(value=1.0, correct=True)


async def sleep_then_pid(prompt: Prompt, response: str) -> Reward:
    """Takes a moment, then reports which process scored it (value = pid)."""
    await asyncio.sleep(float(prompt.metadata.get("sleep", 0.0)))
    return Reward(value=float(os.getpid()))


def blocking_hang(prompt: Prompt, response: str) -> float:
    """Blocks its process's event loop (a synchronous hang) when asked to."""
    if prompt.metadata.get("hang"):
        time.sleep(60)
    return 1.0


def three_args(prompt: Prompt, response: str, extra: int) -> float:
    """A wrong signature: the pool would not know what to pass as `extra`."""
    return 0.0


NOT_CALLABLE = 0.5
