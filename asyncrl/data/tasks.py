"""Built-in procedural verifiable tasks: an endless seeded supply of prompts, each with a scorer.

`sort_digits` (the default): `sort:31415=` → `11345`. A 2-layer model learns it from a few dozen
supervised steps, so a short warm start leaves it at a low but non-zero accuracy and RL has room
to show. The reward gives partial credit (the fraction of positions right, over the longer of
answer and response), so groups rarely tie and GRPO gets a signal at every difficulty; exact
match, reported as `correct`, is the accuracy metric.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from asyncrl.types import Reward


@dataclass(frozen=True, slots=True)
class TaskExample:
    prompt: str
    answer: str


def positional_credit(response: str, answer: str) -> Reward:
    """value = #positions equal / max(len(response), len(answer)); correct = exact match."""
    response = response.strip()
    width = max(len(response), len(answer))
    if width == 0:
        return Reward(value=1.0, correct=True)
    hits = sum(a == b for a, b in zip(response, answer, strict=False))
    return Reward(value=hits / width, correct=response == answer)


def _check_lengths(min_len: int, max_len: int) -> None:
    if min_len < 1:
        raise ValueError(f"min_len must be >= 1 (got {min_len})")
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len (got max_len={max_len}, min_len={min_len})")


class SortDigits:
    """Sort a string of digits ascending."""

    name = "sort_digits"

    def __init__(self, min_len: int = 3, max_len: int = 6) -> None:
        _check_lengths(min_len, max_len)
        self.min_len, self.max_len = min_len, max_len

    def example(self, rng: random.Random) -> TaskExample:
        digits = [rng.randrange(10) for _ in range(rng.randint(self.min_len, self.max_len))]
        return TaskExample(
            prompt="sort:" + "".join(map(str, digits)) + "=",
            answer="".join(map(str, sorted(digits))),
        )

    def score(self, response: str, answer: str) -> Reward:
        return positional_credit(response, answer)


class Addition:
    """Add two non-negative integers of min_len..max_len digits."""

    name = "addition"

    def __init__(self, min_len: int = 1, max_len: int = 2) -> None:
        _check_lengths(min_len, max_len)
        self.min_len, self.max_len = min_len, max_len

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_len, self.max_len)
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def example(self, rng: random.Random) -> TaskExample:
        a, b = self._number(rng), self._number(rng)
        return TaskExample(prompt=f"{a}+{b}=", answer=str(a + b))

    def score(self, response: str, answer: str) -> Reward:
        return positional_credit(response, answer)


TASKS: dict[str, type] = {SortDigits.name: SortDigits, Addition.name: Addition}
