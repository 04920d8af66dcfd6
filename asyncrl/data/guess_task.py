"""`guess_number`: a multi-turn procedural game, the task half (prompts and the final score).

    data.task: guess_number
    rollout.workflow: guess_number

The prompt names a range, `guess:12-20=`; the secret is an integer in it (`Prompt.answer`).
Each model turn is one guess (the digits, then EOS); the environment (asyncrl.rollout.workflow.
guess_number) answers `<` (the secret is lower), `>` (higher) or `?` (not a number in the
range), and ends the episode on the right guess. Every character is in the tiny model's
vocabulary, so the game runs on the built-in model; binary search is the optimal policy.

Score of a transcript (model turns and feedback, as the reward sees it, e.g. `16<13>14`):

    value = 0.8 · (1 / guesses if the last guess is the secret else 0)
          + 0.2 · (guesses answered `<`/`>`, or found, / guesses);   correct = found

The second term is a dense format credit: a warm-started tiny model learns its first guess from
the supervised examples (prompt → secret) but not what to do after feedback, where it mostly
babbles (`?`); a reward only for finding the secret is almost always 0 there. (A guess made of
the feedback characters themselves splits into several guesses: only a malformed turn pays.)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from asyncrl.types import Reward

LOWER, HIGHER, INVALID = "<", ">", "?"  # the environment's feedback
_FEEDBACK = re.compile(f"[{re.escape(LOWER + HIGHER + INVALID)}]")
_RANGE = re.compile(r"guess:(\d+)-(\d+)=")


@dataclass(frozen=True, slots=True)
class GuessExample:
    prompt: str
    answer: str


def feedback(turn: str, low: int, high: int, secret: int) -> str | None:
    """The environment's answer to one guess: None when it is the secret."""
    guess = turn.strip()
    if not guess.isdigit() or not low <= int(guess) <= high:
        return INVALID
    if int(guess) == secret:
        return None
    return LOWER if secret < int(guess) else HIGHER


def prompt_range(prompt: str) -> tuple[int, int]:
    """(low, high) of a `guess:LOW-HIGH=` prompt; ValueError for any other text."""
    match = _RANGE.fullmatch(prompt)
    if match is None:
        raise ValueError(f"not a guess_number prompt (guess:LOW-HIGH=): {prompt!r}")
    return int(match[1]), int(match[2])


class GuessNumber:
    """Find a secret in [low, low + width] (low < max_low, width in [min_width, max_width])."""

    name = "guess_number"

    def __init__(self, max_low: int = 100, min_width: int = 4, max_width: int = 12) -> None:
        for field, value in (("max_low", max_low), ("min_width", min_width),
                             ("max_width", max_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer (got {value!r})")
        if max_width < min_width:
            raise ValueError(f"max_width must be >= min_width (got {max_width} < {min_width})")
        self.max_low, self.min_width, self.max_width = max_low, min_width, max_width

    def example(self, rng: random.Random) -> GuessExample:
        low = rng.randrange(self.max_low)
        high = low + rng.randint(self.min_width, self.max_width)
        return GuessExample(prompt=f"guess:{low}-{high}=", answer=str(rng.randint(low, high)))

    def score(self, response: str, answer: str) -> Reward:
        guesses, marks = _FEEDBACK.split(response), _FEEDBACK.findall(response)
        if len(guesses) > 1 and not guesses[-1]:  # the budget ran out after the feedback
            guesses.pop()
        found = len(guesses) > len(marks) and guesses[-1].strip() == answer.strip()
        valid = sum(mark in (LOWER, HIGHER) for mark in marks) + found
        value = 0.8 * (1.0 / len(guesses) if found else 0.0) + 0.2 * valid / len(guesses)
        return Reward(value=value, correct=found)
