"""Procedural tasks: scorers on hand-worked cases, determinism, argument errors."""

from __future__ import annotations

import random

import pytest

from asyncrl.data.tasks import TASKS, Addition, SortDigits, positional_credit


@pytest.mark.parametrize(
    "response, answer, value, correct",
    [
        ("11345", "11345", 1.0, True),
        (" 11345 ", "11345", 1.0, True),  # surrounding whitespace is not the model's answer
        ("11354", "11345", 3 / 5, False),
        ("113", "11345", 3 / 5, False),  # too short: missing positions are wrong
        ("1134599", "11345", 5 / 7, False),  # too long: extra positions count against it
        ("", "11345", 0.0, False),
        ("x", "11345", 0.0, False),
    ],
)
def test_positional_credit_hand_worked(response, answer, value, correct):
    reward = positional_credit(response, answer)
    assert reward.value == pytest.approx(value)
    assert reward.correct is correct and reward.ok


def test_sort_digits_examples_are_sorted_and_deterministic():
    task = SortDigits(min_len=3, max_len=5)
    a = [task.example(random.Random(7)) for _ in range(3)]
    b = [task.example(random.Random(7)) for _ in range(3)]
    assert a == b
    ex = task.example(random.Random(1))
    digits = ex.prompt.removeprefix("sort:").removesuffix("=")
    assert 3 <= len(digits) <= 5 and ex.answer == "".join(sorted(digits))


def test_addition_answer_is_the_sum():
    ex = Addition(min_len=2, max_len=2).example(random.Random(3))
    a, b = ex.prompt.removesuffix("=").split("+")
    assert len(a) == 2 and len(b) == 2 and int(ex.answer) == int(a) + int(b)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_len": 0}, "min_len must be >= 1"),
    ({"min_len": 5, "max_len": 3}, "max_len must be >= min_len"),
])
def test_bad_task_arguments_name_the_argument(kwargs, message):
    for task in TASKS.values():
        with pytest.raises(ValueError, match=message):
            task(**kwargs)
