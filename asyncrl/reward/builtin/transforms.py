"""Reward transforms: penalties applied, in order, on top of any reward function.

A transform maps `(prompt, response, reward) -> reward`. It changes `value` only: `correct` is
the task's accuracy and stays as the inner reward said. A failed reward passes through untouched
(a failure is never turned into a number).

Config (a list under `reward.transforms`, each entry a `type` plus its kwargs):

    reward:
      fn: math
      transforms:
        - {type: overlong_penalty, max_length: 512, cache: 128}
        - {type: format_penalty, pattern: '\\\\boxed\\{', mode: zero}

Formulas (L is the response length in `unit`s, r the reward value before the transform):

- `length_penalty` (linear over a budget B, coefficient c, cap m):
  r' = r - min(m, c · max(0, L - B) / B). No penalty within the budget; one budget over costs c.
- `overlong_penalty` (DAPO's overlong soft punishment, Yu et al. 2025, eq. 13; with
  L_max = max_length, L_cache = cache, coefficient c):
  p = 0 for L ≤ L_max - L_cache; p = ((L_max - L_cache) - L) / L_cache for
  L_max - L_cache < L ≤ L_max; p = -1 for L > L_max; r' = r + c · p.
  DAPO counts tokens and uses it together with overlong filtering; here the unit is chosen
  (`chars` by default, `tokens` with a tokenizer), and filtering is the DataManager's business.
- `format_penalty` (a regex that the response must match, `re.search` unless `fullmatch`):
  on a miss, mode `subtract`: r' = r - penalty; mode `zero`: r' = 0. On a match r' = r.
- `truncation_penalty` (DLER's truncation penalty, Liu et al. 2025, "Doing Length pEnalty
  Right"): r' = value (default 0) for L > max_length, else r' = r. A hard cut-off, where
  DAPO's overlong penalty ramps. To zero the answers the engine cut at rollout.max_new_tokens,
  use `unit: tokens` and max_length = max_new_tokens − 1. DLER pairs it with batch-wise reward
  normalisation: that is `algorithm.advantage=reinforce_pp` (group-centred, batch std).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, Literal, Protocol

from asyncrl.errors import PluginError
from asyncrl.reward.builtin.kwargs import construct
from asyncrl.types import Prompt, Reward


class RewardTransform(Protocol):
    def apply(self, prompt: Prompt, response: str, reward: Reward) -> Reward: ...


def _with_value(reward: Reward, value: float) -> Reward:
    return Reward(value=value, status=reward.status, error=reward.error, correct=reward.correct)


class _Length:
    """Measures a response in characters, or in tokens of a tokenizer (an HF path)."""

    def __init__(self, unit: str, tokenizer: str | None) -> None:
        if unit not in ("chars", "tokens"):
            raise ValueError(f"unit: must be 'chars' or 'tokens' (got {unit!r})")
        if (unit == "tokens") != (tokenizer is not None):
            raise ValueError("tokenizer: give an HF tokenizer path exactly when unit is 'tokens'")
        self._unit, self._tokenizer_path = unit, tokenizer

    @cached_property
    def _tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self._tokenizer_path)

    def __call__(self, response: str) -> int:
        if self._unit == "chars":
            return len(response)
        return len(self._tokenizer(response, add_special_tokens=False).input_ids)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}: must be a positive number (got {value!r})")
    return float(value)


class LengthPenalty:
    """Linear penalty past a length budget: r - min(max_penalty, coef · max(0, L - B) / B)."""

    def __init__(self, budget: int, coef: float = 1.0, max_penalty: float | None = None,
                 unit: Literal["chars", "tokens"] = "chars", tokenizer: str | None = None) -> None:
        self.budget = _positive("budget", budget)
        self.coef = _positive("coef", coef)
        self.max_penalty = math.inf if max_penalty is None else _positive("max_penalty",
                                                                           max_penalty)
        self._length = _Length(unit, tokenizer)

    def penalty(self, length: int) -> float:
        return min(self.max_penalty, self.coef * max(0.0, length - self.budget) / self.budget)

    def apply(self, prompt: Prompt, response: str, reward: Reward) -> Reward:
        if not reward.ok:
            return reward
        return _with_value(reward, reward.value - self.penalty(self._length(response)))


class OverlongPenalty:
    """DAPO's overlong soft punishment: r + coef · p(L), p from 0 down to -1 over the cache."""

    def __init__(self, max_length: int, cache: int, coef: float = 1.0,
                 unit: Literal["chars", "tokens"] = "chars", tokenizer: str | None = None) -> None:
        self.max_length = _positive("max_length", max_length)
        self.cache = _positive("cache", cache)
        if self.cache > self.max_length:
            raise ValueError(f"cache: must be at most max_length ({max_length}), got {cache}")
        self.coef = _positive("coef", coef)
        self._length = _Length(unit, tokenizer)

    def penalty(self, length: int) -> float:
        """p(L) in [-1, 0] as in the module docstring."""
        soft_start = self.max_length - self.cache
        if length <= soft_start:
            return 0.0
        if length <= self.max_length:
            return (soft_start - length) / self.cache
        return -1.0

    def apply(self, prompt: Prompt, response: str, reward: Reward) -> Reward:
        if not reward.ok:
            return reward
        return _with_value(reward, reward.value + self.coef * self.penalty(self._length(response)))


class FormatPenalty:
    """The response must match `pattern`; on a miss subtract `penalty` (or set the value to 0)."""

    def __init__(self, pattern: str, mode: Literal["subtract", "zero"] = "subtract",
                 penalty: float = 1.0, fullmatch: bool = False) -> None:
        try:
            self._regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern: {pattern!r} is not a valid regular expression ({exc})"
                             ) from None
        if mode not in ("subtract", "zero"):
            raise ValueError(f"mode: must be 'subtract' or 'zero' (got {mode!r})")
        self.mode, self.penalty = mode, _positive("penalty", penalty)
        self._fullmatch = fullmatch

    def matches(self, response: str) -> bool:
        find = self._regex.fullmatch if self._fullmatch else self._regex.search
        return find(response) is not None

    def apply(self, prompt: Prompt, response: str, reward: Reward) -> Reward:
        if not reward.ok or self.matches(response):
            return reward
        return _with_value(reward, 0.0 if self.mode == "zero" else reward.value - self.penalty)


class TruncationPenalty:
    """DLER's truncation penalty: a response longer than `max_length` gets reward `value`."""

    def __init__(self, max_length: int, value: float = 0.0,
                 unit: Literal["chars", "tokens"] = "chars", tokenizer: str | None = None) -> None:
        self.max_length = _positive("max_length", max_length)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
                value):
            raise ValueError(f"value: must be a finite number (got {value!r})")
        self.value = float(value)
        self._length = _Length(unit, tokenizer)

    def apply(self, prompt: Prompt, response: str, reward: Reward) -> Reward:
        if not reward.ok or self._length(response) <= self.max_length:
            return reward
        return _with_value(reward, self.value)


TRANSFORMS: dict[str, type] = {
    "length_penalty": LengthPenalty,
    "overlong_penalty": OverlongPenalty,
    "format_penalty": FormatPenalty,
    "truncation_penalty": TruncationPenalty,
}


def build_transforms(specs: Sequence[Mapping[str, Any]], field: str = "reward.transforms"
                     ) -> list[RewardTransform]:
    """Build `[{type: name, **kwargs}, ...]`; errors name `reward.transforms[i].<kwarg>`."""
    transforms = []
    for i, spec in enumerate(specs):
        where = f"{field}[{i}]"
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise PluginError(f"{where}: expected a mapping with a 'type' key, one of: "
                              f"{', '.join(TRANSFORMS)} (got {spec!r})")
        kwargs = {k: v for k, v in spec.items() if k != "type"}
        cls = TRANSFORMS.get(spec["type"])
        if cls is None:
            raise PluginError(f"{where}.type: unknown transform {spec['type']!r}; known: "
                              f"{', '.join(TRANSFORMS)}")
        transforms.append(construct(where, cls, kwargs, what=f"transform {spec['type']!r}"))
    return transforms


class TransformedReward:
    """A reward function followed by transforms; forwards `score_batch`, `check`, `close`."""

    def __init__(self, inner: Any, transforms: Sequence[RewardTransform]) -> None:
        self.inner, self.transforms = inner, list(transforms)
        if hasattr(inner, "score_batch"):
            self.score_batch = self._score_batch
        if hasattr(inner, "check"):
            self.check = inner.check

    def _apply(self, prompt: Prompt, response: str, reward: Reward) -> Reward:
        for transform in self.transforms:
            reward = transform.apply(prompt, response, reward)
        return reward

    async def score(self, prompt: Prompt, response: str) -> Reward:
        return self._apply(prompt, response, await self.inner.score(prompt, response))

    async def _score_batch(self, prompts: list[Prompt], responses: list[str]) -> list[Reward]:
        rewards = await self.inner.score_batch(prompts, responses)
        return [self._apply(p, r, w) for p, r, w in zip(prompts, responses, rewards, strict=True)]

    async def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            out = close()
            if hasattr(out, "__await__"):
                await out
