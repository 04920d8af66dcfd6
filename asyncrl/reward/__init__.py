"""Rewards: the `RewardFn` protocol, the built-ins, and the resolver used by the controller.

A reward function scores one finished answer to one prompt. A failure is a `Reward` with a
failed status and a reason (a short prefix first: "timeout: ...", "crash: ...", "error: ..."),
never a silent 0.

`reward.fn` is a built-in name (below; each takes its own `reward.kwargs`, see its class) or a
user path 'package.module:function' with the signature `fn(prompt: Prompt, response: str) ->
float | Reward` (plain or async; a float is wrapped as an OK reward; extra keyword parameters may
be set through `reward.kwargs`). A path to a class is constructed with `reward.kwargs` and must
have `async score(prompt, response) -> Reward`.

Optional methods the RewardPool uses when present: `score_batch(prompts, responses)` (one call
for a chunk, e.g. a reward model's forward), `check()` (async; run once in the driver before any
actor starts) and `close()` (release processes or models).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from asyncrl.errors import PluginError
from asyncrl.plugins import resolve
from asyncrl.reward.builtin.code import CodeReward
from asyncrl.reward.builtin.gym import GymReward
from asyncrl.reward.builtin.kwargs import check_kwargs, construct
from asyncrl.reward.builtin.match import ExactMatchReward, RegexReward
from asyncrl.reward.builtin.math import MathReward
from asyncrl.reward.builtin.model import RewardModel
from asyncrl.reward.builtin.transforms import TransformedReward, build_transforms
from asyncrl.types import Prompt, Reward

__all__ = [
    "BUILTIN_REWARDS", "CodeReward", "ExactMatchReward", "FunctionReward", "GymReward",
    "MathReward", "RegexReward", "RewardFn", "RewardModel", "TaskReward", "TransformedReward",
    "build_reward", "build_transforms",
]


class RewardFn(Protocol):
    async def score(self, prompt: Prompt, response: str) -> Reward: ...


class TaskReward:
    """Scores with the procedural task's own scorer (partial credit and exact match).

    A task that needs more than the answer (a reasoning-gym entry in `Prompt.metadata`) provides
    `score_prompt(prompt, response)`; otherwise `score(response, answer)` is used.
    """

    def __init__(self, task: Any) -> None:
        self._task = task

    async def score(self, prompt: Prompt, response: str) -> Reward:
        score_prompt = getattr(self._task, "score_prompt", None)
        if score_prompt is not None:
            return score_prompt(prompt, response)
        return self._task.score(response, prompt.answer or "")


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
            return Reward.failed(f"error: {self._spec} raised {type(exc).__name__}: {exc}")
        if isinstance(out, Reward):
            return out
        if isinstance(out, int | float) and not isinstance(out, bool) and math.isfinite(out):
            return Reward(value=float(out))
        return Reward.failed(f"error: {self._spec} returned {out!r}; expected a finite float "
                             "or Reward")


BUILTIN_REWARDS: dict[str, type] = {
    "task": TaskReward,
    "exact_match": ExactMatchReward,
    "regex": RegexReward,
    "math": MathReward,
    "code": CodeReward,
    "gym": GymReward,
    "reward_model": RewardModel,
}
# what each built-in needs installed (module → pip extra), checked when it is built
_REQUIRES = {MathReward: ("math_verify", "rewards"), GymReward: ("reasoning_gym", "rewards")}


def build_reward(spec: str, task: Any, kwargs: Mapping[str, Any] | None = None,
                 transforms: Sequence[Mapping[str, Any]] | None = None) -> RewardFn:
    """Resolve `reward.fn` with `reward.kwargs` (checked in the driver before any actor starts),
    followed by `reward.transforms` (a list of `{type: name, **kwargs}`; see transforms.py).

    Raises:
        PluginError: unknown name or path, a wrong signature, or a kwarg that is unknown,
            missing or invalid (named `reward.kwargs.<name>` or `reward.transforms[i].<name>`,
            with the accepted ones).
    """
    fn = _build_fn(spec, task, dict(kwargs or {}))
    if transforms:
        return TransformedReward(fn, build_transforms(transforms))
    return fn


def _build_fn(spec: str, task: Any, kwargs: dict[str, Any]) -> RewardFn:
    target = resolve("reward.fn", spec, BUILTIN_REWARDS)
    what = f"reward {spec!r}"
    if inspect.isclass(target):
        if not callable(getattr(target, "score", None)):
            raise PluginError(f"reward.fn: class {spec!r} has no score(prompt, response) method")
        if target in _REQUIRES:
            module, extra = _REQUIRES[target]
            if importlib.util.find_spec(module) is None:
                raise PluginError(f"reward.fn: {spec!r} needs {module}: "
                                  f"pip install 'asyncrl[{extra}]'")
        return construct("reward.kwargs", target, kwargs, what=what, inject={"task": task})
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
    if kwargs:
        named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)  # prompt, response
        check_kwargs("reward.kwargs", target, kwargs, what=what, skip=named)
        target = functools.partial(target, **kwargs)
    return FunctionReward(target, spec)
