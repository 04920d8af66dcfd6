"""Procedural tasks: scorers on hand-worked cases, determinism, argument errors."""

from __future__ import annotations

import random

import pytest

from asyncrl.data.tasks import TASKS, Addition, SortDigits, TaskExample, positional_credit

# The built-in procedural tasks (reasoning_gym needs a dataset; tests/unit/test_reward_builtins)
# The digit tasks, which share min_len/max_len (guess_number has its own tests: test_workflow).
BUILT_IN = {name: cls for name, cls in TASKS.items()
            if name not in ("reasoning_gym", "guess_number")}


@pytest.mark.parametrize(
    "response, answer, value, correct",
    [
        ("11345", "11345", 1.0, True),  # exact
        (" 11345 ", "11345", 1.0, True),  # surrounding whitespace is not the model's answer
        ("11354", "11345", 3 / 5, False),  # partial: last two swapped
        ("21345", "11345", 4 / 5, False),  # partial: one digit wrong
        ("113", "11345", 3 / 5, False),  # too short: missing positions are wrong
        ("1134599", "11345", 5 / 7, False),  # too long: extra positions count against it
        ("012345", "12345", 0 / 6, False),  # one extra char in front shifts every position
        ("", "11345", 0.0, False),  # empty
        ("x", "11345", 0.0, False),
        ("", "", 1.0, True),
    ],
)
def test_positional_credit_hand_worked(response, answer, value, correct):
    reward = positional_credit(response, answer)
    assert reward.value == pytest.approx(value)
    assert reward.correct is correct and reward.ok


@pytest.mark.parametrize(
    "response, answer, value, correct",
    [
        ("132", "132", 1.0, True),
        ("32", "132", 2 / 3, False),  # missing carry digit: units and tens still right
        ("122", "132", 2 / 3, False),
        ("1320", "132", 0.0, False),  # an extra trailing digit misaligns every place
        ("", "132", 0.0, False),
    ],
)
def test_right_aligned_credit_hand_worked(response, answer, value, correct):
    reward = positional_credit(response, answer, align="right")
    assert reward.value == pytest.approx(value)
    assert reward.correct is correct


def test_only_exact_match_scores_one():
    rng = random.Random(0)
    for name, task_cls in BUILT_IN.items():
        task = task_cls()
        for _ in range(50):
            ex = task.example(rng)
            assert task.score(ex.answer, ex.answer).value == 1.0, name
            assert task.score(ex.answer, ex.answer).correct is True
            for wrong in (ex.answer + "1", ex.answer[:-1], "", "x" + ex.answer[1:]):
                if wrong != ex.answer:
                    reward = task.score(wrong, ex.answer)
                    assert 0.0 <= reward.value < 1.0 and reward.correct is False, (name, wrong)


def test_bad_alignment_is_rejected():
    with pytest.raises(ValueError, match="align"):
        positional_credit("1", "1", align="middle")


def test_sort_digits_default_is_five_sorted_digits():
    task = SortDigits()
    for seed in range(20):
        ex = task.example(random.Random(seed))
        digits = ex.prompt.removeprefix("sort:").removesuffix("=")
        assert ex.prompt.startswith("sort:") and ex.prompt.endswith("=")
        assert len(digits) == 5 and digits.isdigit() and ex.answer == "".join(sorted(digits))


def test_sort_digits_respects_length_range():
    task = SortDigits(min_len=3, max_len=8)
    lengths = {len(task.example(random.Random(s)).answer) for s in range(300)}
    assert lengths == set(range(3, 9))


def test_addition_answer_is_the_sum():
    task = Addition(min_len=2, max_len=2)
    for seed in range(20):
        ex = task.example(random.Random(seed))
        a, b = ex.prompt.removesuffix("=").split("+")
        assert len(a) == 2 and len(b) == 2 and int(ex.answer) == int(a) + int(b)


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_examples_are_deterministic_for_a_seed(name):
    task = BUILT_IN[name]()
    rng_a, rng_b = random.Random(7), random.Random(7)
    a = [task.example(rng_a) for _ in range(20)]
    b = [task.example(rng_b) for _ in range(20)]
    assert a == b and all(isinstance(ex, TaskExample) for ex in a)
    assert len({ex.prompt for ex in a}) > 1  # the stream moves on
    assert task.example(random.Random("0/eval/3")) == task.example(random.Random("0/eval/3"))


def test_task_examples_are_frozen():
    ex = SortDigits().example(random.Random(0))
    with pytest.raises(AttributeError):
        ex.answer = "0"  # type: ignore[misc]


def test_names_match_the_registry():
    assert all(cls.name == name for name, cls in TASKS.items())
    assert {"sort_digits", "addition"} <= set(TASKS)


@pytest.mark.parametrize("kwargs, message", [
    ({"min_len": 0}, "min_len must be in"),
    ({"min_len": 5, "max_len": 3}, "max_len must be >= min_len"),
    ({"max_len": 0}, "max_len must be in"),
    ({"min_len": 2.5}, "min_len must be an integer"),
    ({"max_len": "4"}, "max_len must be an integer"),
    ({"min_len": True}, "min_len must be an integer"),
    ({"max_len": 1000}, "max_len must be in"),
])
def test_bad_task_arguments_name_the_argument(kwargs, message):
    for task in BUILT_IN.values():
        with pytest.raises(ValueError, match=message):
            task(**kwargs)


def test_unknown_task_argument_is_a_type_error():
    with pytest.raises(TypeError):
        SortDigits(length=5)
