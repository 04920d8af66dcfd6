"""Built-in procedural verifiable tasks: an endless seeded supply of prompts, each with a scorer.

`sort_digits` (the default): `sort:31415=` → `11345`, with exactly 5 digits by default.

Why this task: the default example must show RL working on a tiny char-level model on CPU in a
couple of minutes. Sorting is learned by a 2-layer model from a few dozen supervised steps, so a
short warm start leaves it at a low but non-zero greedy accuracy (measured 7–34 % after 25 steps
at lr 1e-3, 8 seeds) with a partly right answer on almost every prompt; GRPO then has a signal at
every difficulty and lifts held-out greedy exact match by 63–81 points in 150 steps (32 prompts
× 8 samples, temperature 0.7, lr 3e-4), about 40 s of one CPU thread (the whole `asyncrl train`
run: +70 to +86 points in about a minute on 2 cores, 5 seeds). Measured alternatives were
worse: 2-digit addition is barely learned by the tiny model at all; a varied length (4–6)
makes the answer length itself a noisy target, and the same recipe gained only 24–40 points;
reversing and counting learn slowly or plateau at guessing. With a fixed length every answer
has the same number of positions, so the partial credit below is smooth.

The reward gives partial credit: the fraction of positions right, over the longer of answer and
response (a wrong length costs every missing or extra position), so groups rarely tie. With
exact match alone as the reward, one of two seeds collapsed to 0 % accuracy. Exact match is
still the accuracy metric (`Reward.correct`), and only the exact answer scores 1.

`addition`: `47+85=` → `132`. Kept as a harder alternative; its credit is right-aligned (digits
compared by place value), so a missing carry digit does not make every digit wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from asyncrl.data.guess_task import GuessNumber
from asyncrl.data.gym_task import GymTask
from asyncrl.types import Reward


@dataclass(frozen=True, slots=True)
class TaskExample:
    prompt: str
    answer: str


def positional_credit(
    response: str, answer: str, *, align: Literal["left", "right"] = "left"
) -> Reward:
    """value = #positions equal / max(len(response), len(answer)); correct = exact match.

    Surrounding whitespace of the response is ignored. align="right" compares from the last
    character (numbers: units with units). Only an exact match reaches 1.
    """
    response = response.strip()
    if align not in ("left", "right"):
        raise ValueError(f"align must be 'left' or 'right' (got {align!r})")
    width = max(len(response), len(answer))
    if width == 0:
        return Reward(value=1.0, correct=True)
    a, b = (response, answer) if align == "left" else (response[::-1], answer[::-1])
    hits = sum(x == y for x, y in zip(a, b, strict=False))
    return Reward(value=hits / width, correct=response == answer)


def _check_int(name: str, value: object, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer (got {value!r})")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] (got {value})")
    return value


def _check_lengths(min_len: object, max_len: object, *, limit: int) -> tuple[int, int]:
    min_len = _check_int("min_len", min_len, low=1, high=limit)
    max_len = _check_int("max_len", max_len, low=1, high=limit)
    if max_len < min_len:
        raise ValueError(f"max_len must be >= min_len (got max_len={max_len}, min_len={min_len})")
    return min_len, max_len


class SortDigits:
    """Sort a string of min_len..max_len random digits ascending (default: exactly 5)."""

    name = "sort_digits"

    def __init__(self, min_len: int = 5, max_len: int = 5) -> None:
        self.min_len, self.max_len = _check_lengths(min_len, max_len, limit=32)

    def example(self, rng: random.Random) -> TaskExample:
        digits = [rng.randrange(10) for _ in range(rng.randint(self.min_len, self.max_len))]
        return TaskExample(
            prompt="sort:" + "".join(map(str, digits)) + "=",
            answer="".join(map(str, sorted(digits))),
        )

    def score(self, response: str, answer: str) -> Reward:
        return positional_credit(response, answer)


class Addition:
    """Add two non-negative integers of min_len..max_len digits each (no leading zeros)."""

    name = "addition"

    def __init__(self, min_len: int = 1, max_len: int = 2) -> None:
        self.min_len, self.max_len = _check_lengths(min_len, max_len, limit=18)

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_len, self.max_len)
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)

    def example(self, rng: random.Random) -> TaskExample:
        a, b = self._number(rng), self._number(rng)
        return TaskExample(prompt=f"{a}+{b}=", answer=str(a + b))

    def score(self, response: str, answer: str) -> Reward:
        return positional_credit(response, answer, align="right")


TASKS: dict[str, type] = {SortDigits.name: SortDigits, Addition.name: Addition,
                         GymTask.name: GymTask, GuessNumber.name: GuessNumber}
