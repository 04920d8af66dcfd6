"""User reward functions that tests name by 'module:function' path, as a user's config would."""

from __future__ import annotations

import asyncio
import os
import time
import zlib

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


def crash_on_every_third_prompt(prompt: Prompt, response: str) -> float:
    """`answer_prefix`, but raises for every answer to train-1, train-4, train-7, ... (ids
    `train-N` with N % 3 == 1): a run certainly has such failures, since its first batch draws
    train-0 to train-3, whatever the model samples."""
    number = prompt.prompt_id.removeprefix("train-")
    if number.isdigit() and int(number) % 3 == 1:
        raise RuntimeError(f"{prompt.prompt_id} is one of the prompts this reward fails")
    return answer_prefix(prompt, response)


IN_FLIGHT = 0  # rewards of `count_in_flight` being scored now, in this process


async def count_in_flight(prompt: Prompt, response: str) -> Reward:
    """Holds its slot for metadata['sleep'] seconds (default 0.05); value = how many of these
    rewards were in flight in this process when it started, itself included (so the largest
    value is the peak: the count only grows when one starts)."""
    global IN_FLIGHT
    IN_FLIGHT += 1
    try:
        started_with = IN_FLIGHT
        await asyncio.sleep(float(prompt.metadata.get("sleep", 0.05)))
    finally:
        IN_FLIGHT -= 1
    return Reward(value=float(started_with))


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


def by_level(prompt: Prompt, response: str) -> Reward:
    """A difficulty set by the prompt's metadata['level']: 'easy' is always solved, 'hard'
    never, 'mid' by a checksum bit of the response (so a mid group's answers differ)."""
    level = prompt.metadata["level"]
    solved = level == "easy" or (level == "mid" and zlib.crc32(response.encode()) % 2 == 1)
    return Reward(value=float(solved), correct=solved)
