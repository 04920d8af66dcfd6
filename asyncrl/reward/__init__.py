"""Rewards: the `RewardFn` protocol, the built-ins, and the resolver used by the controller.

A reward function scores one finished answer to one prompt. A failure is a `Reward` with a
failed status and a reason, never a silent 0. User functions may be given as
'package.module:function' with the signature `fn(prompt: Prompt, response: str) -> float | Reward`
(plain or async); a float is wrapped as an OK reward.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

from asyncrl.errors import PluginError
from asyncrl.plugins import resolve
from asyncrl.types import Prompt, Reward


class RewardFn(Protocol):
    async def score(self, prompt: Prompt, response: str) -> Reward: ...


class TaskReward:
    """Scores with the procedural task's own scorer (partial credit and exact match)."""

    def __init__(self, task: Any) -> None:
        self._task = task

    async def score(self, prompt: Prompt, response: str) -> Reward:
        return self._task.score(response, prompt.answer or "")


class ExactMatchReward:
    """1 if the stripped response equals the prompt's answer, else 0."""

    async def score(self, prompt: Prompt, response: str) -> Reward:
        correct = response.strip() == (prompt.answer or "").strip()
        return Reward(value=float(correct), correct=correct)


class FunctionReward:
    """Adapts a user function `fn(prompt, response) -> float | Reward` (sync or async)."""

    def __init__(self, fn: Callable[..., Any], spec: str) -> None:
        self._fn, self._spec = fn, spec

    async def score(self, prompt: Prompt, response: str) -> Reward:
        try:
            out = self._fn(prompt, response)
            if inspect.isawaitable(out):
                out = await out
        except Exception as exc:  # a user reward crash is a typed failure, counted, never a 0
            return Reward.failed(f"{self._spec} raised {type(exc).__name__}: {exc}")
        if isinstance(out, Reward):
            return out
        if isinstance(out, int | float) and not isinstance(out, bool) and math.isfinite(out):
            return Reward(value=float(out))
        return Reward.failed(f"{self._spec} returned {out!r}; expected a finite float or Reward")


BUILTIN_REWARDS = {"task": TaskReward, "exact_match": ExactMatchReward}


def build_reward(spec: str, task: Any, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """Resolve `reward.fn` (checked in the driver before any actor starts)."""
    target = resolve("reward.fn", spec, BUILTIN_REWARDS)
    if kwargs:
        raise PluginError(f"reward.kwargs: {spec!r} takes no keyword arguments "
                          f"(got {', '.join(sorted(kwargs))}); remove reward.kwargs")
    if target is TaskReward:
        return TaskReward(task)
    if target is ExactMatchReward:
        return ExactMatchReward()
    if not callable(target):
        raise PluginError(f"reward.fn: {spec!r} is not callable")
    params = [
        p for p in inspect.signature(target).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(params) != 2:
        raise PluginError(
            f"reward.fn: {spec!r} must take exactly (prompt, response), "
            f"but its signature is {inspect.signature(target)}"
        )
    return FunctionReward(target, spec)
