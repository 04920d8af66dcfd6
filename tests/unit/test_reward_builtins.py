"""Reward built-ins: string matching, transforms on hand-worked numbers, the registry and its
kwarg errors, and reasoning-gym scoring (the task adapter and the `gym` reward)."""

from __future__ import annotations

import pickle
import random

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import build_task
from asyncrl.data.gym_task import ENTRY_KEY, GymTask
from asyncrl.data.tasks import TASKS
from asyncrl.errors import ConfigError, PluginError
from asyncrl.reward import (
    BUILTIN_REWARDS,
    CodeReward,
    ExactMatchReward,
    GymReward,
    MathReward,
    RegexReward,
    TaskReward,
    TransformedReward,
    build_reward,
    build_transforms,
)
from asyncrl.reward.builtin import gym as gym_reward
from asyncrl.reward.builtin.code import extract_code, prompt_tests
from asyncrl.reward.builtin.transforms import (
    FormatPenalty,
    LengthPenalty,
    OverlongPenalty,
    TruncationPenalty,
)
from asyncrl.types import Prompt, Reward, RewardStatus


def _prompt(answer: str | None = "42", text: str = "q", **metadata) -> Prompt:
    return Prompt(prompt_id="p", text=text, input_ids=[], answer=answer, metadata=metadata)


# --- exact and regex match --------------------------------------------------------------------

@pytest.mark.parametrize("response, value", [(" 42\n", 1.0), ("42.0", 0.0), ("", 0.0)])
async def test_exact_match_compares_stripped_strings(response, value):
    reward = await ExactMatchReward().score(_prompt("42"), response)
    assert reward.ok and reward.value == value and reward.correct is (value == 1.0)


async def test_a_prompt_without_answer_is_a_failure_not_a_zero():
    for fn in (ExactMatchReward(), RegexReward(r"Answer: (\S+)")):
        reward = await fn.score(_prompt(None), "Answer: 42")
        assert not reward.ok and reward.error.startswith("error:")


@pytest.mark.parametrize(
    "pattern, occurrence, response, value",
    [
        (r"\\boxed\{([^{}]*)\}", "last", r"try \boxed{41}, no: \boxed{ 42 }", 1.0),
        (r"\\boxed\{([^{}]*)\}", "first", r"try \boxed{41}, no: \boxed{42}", 0.0),
        (r"Answer:\s*(\S+)", "last", "so... Answer: 42", 1.0),
        (r"Answer:\s*(\S+)", "last", "42", 0.0),  # no match: a wrong answer, not a failure
        (r"\d+", "last", "between 7 and 42", 1.0),  # no group: the whole match
    ],
)
async def test_regex_extracts_the_answer_then_matches(pattern, occurrence, response, value):
    reward = await RegexReward(pattern, occurrence).score(_prompt("42"), response)
    assert reward.ok and reward.value == value and reward.correct is (value == 1.0)


# --- the registry -----------------------------------------------------------------------------

def test_every_builtin_is_built_by_name_with_its_kwargs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    kwargs = {"regex": {"pattern": "x"}, "reward_model": {"path": str(tmp_path)},
              "gym": {"dataset": "basic_arithmetic"}, "math": {"workers": 1}}
    for name, cls in BUILTIN_REWARDS.items():
        fn = build_reward(name, TASKS["sort_digits"](), kwargs.get(name))
        assert type(fn) is cls, name


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("regex", {"patern": "x"}, "reward.kwargs.patern: not a parameter of reward 'regex'; "
                                   "accepted: pattern, occurrence"),
        ("regex", {}, "reward.kwargs.pattern: required by reward 'regex'"),
        ("regex", {"pattern": "("}, "reward.kwargs.pattern: '(' is not a valid regular"),
        ("math", {"timeout_s": 4, "verify_timeout_s": 3}, "reward.kwargs.timeout_s: must exceed"),
        ("code", {"network": "off"}, "reward.kwargs.network: must be 'auto', 'namespace'"),
        ("gym", {"dataset": "basic_arithmetc"}, "did you mean 'basic_arithmetic'"),
        ("exact_match", {"x": 1}, "reward.kwargs.x: not a parameter of reward 'exact_match'; "
                                  "accepted: none"),
        ("reward_model", {"path": "/nowhere"}, "reward.kwargs.path: '/nowhere' is not an HF"),
    ],
)
def test_a_wrong_kwarg_names_the_field_and_the_accepted_ones(spec, kwargs, message):
    with pytest.raises(PluginError) as info:
        build_reward(spec, None, kwargs)
    assert message in str(info.value)


def scaled_prefix(prompt: Prompt, response: str, *, scale: float = 1.0) -> float:
    """A user reward with a config knob."""
    return scale * float(response.startswith(prompt.answer or ""))


def two_args_only(prompt, response):
    return 1.0


async def test_user_functions_take_kwargs_and_keep_their_signature_check():
    fn = build_reward(f"{__name__}:scaled_prefix", None, {"scale": 0.5})
    assert (await fn.score(_prompt("4"), "42")).value == 0.5
    with pytest.raises(PluginError, match=r"reward.kwargs.scal: .*accepted: scale"):
        build_reward(f"{__name__}:scaled_prefix", None, {"scal": 0.5})
    with pytest.raises(PluginError, match=r"reward.kwargs.scale: .*accepted: none"):
        build_reward(f"{__name__}:two_args_only", None, {"scale": 0.5})
    with pytest.raises(PluginError, match="must take exactly"):
        build_reward(f"{__name__}:_prompt", None)
    # a class path is constructed with the kwargs, like a built-in
    regex = build_reward("asyncrl.reward.builtin.match:RegexReward", None, {"pattern": "4."})
    assert (await regex.score(_prompt("42"), "x42y")).value == 1.0


def test_building_math_or_code_starts_no_process():
    # the driver builds each reward once to check the config; workers start on first use
    math_reward = build_reward("math", None, {})
    assert isinstance(math_reward, MathReward) and math_reward.pool.pids == []
    assert isinstance(build_reward("code", None, {}), CodeReward)


# --- transforms: hand-worked numbers -----------------------------------------------------------

@pytest.mark.parametrize("length, penalty", [(0, 0.0), (10, 0.0), (15, 0.25), (30, 1.0),
                                             (50, 1.5)])
def test_length_penalty_is_linear_past_the_budget_and_capped(length, penalty):
    # budget 10, coef 0.5, cap 1.5: 15 chars = half a budget over → 0.5 · 0.5 = 0.25
    transform = LengthPenalty(budget=10, coef=0.5, max_penalty=1.5)
    out = transform.apply(_prompt(), "x" * length, Reward(1.0, correct=True))
    assert out.value == pytest.approx(1.0 - penalty) and out.correct is True


@pytest.mark.parametrize("length, value", [(14, 1.0), (15, 1.0), (16, 0.8), (18, 0.4),
                                           (20, 0.0), (21, 0.0), (100, 0.0)])
def test_overlong_penalty_follows_dapo(length, value):
    # L_max = 20, L_cache = 5: no penalty to 15, then (15 - L) / 5, then -1 past 20
    out = OverlongPenalty(max_length=20, cache=5).apply(_prompt(), "x" * length, Reward(1.0))
    assert out.value == pytest.approx(value)


@pytest.mark.parametrize("length, value", [(7, 1.0), (8, 1.0), (9, 0.0), (50, 0.0)])
def test_truncation_penalty_zeroes_only_answers_past_the_limit(length, value):
    out = TruncationPenalty(max_length=8).apply(_prompt(), "x" * length,
                                                Reward(1.0, correct=True))
    assert out.value == value and out.correct is True  # accuracy stays the task's verdict
    assert TruncationPenalty(max_length=8, value=-1).apply(
        _prompt(), "x" * 9, Reward(1.0)).value == -1.0


def test_truncation_penalty_counts_tokens_with_a_tokenizer(tmp_path):
    from tests.helpers import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny")
    cut = TruncationPenalty(max_length=3, unit="tokens", tokenizer=str(model))
    assert cut.apply(_prompt(), "123", Reward(1.0)).value == 1.0  # one token per character
    assert cut.apply(_prompt(), "1234", Reward(1.0)).value == 0.0
    with pytest.raises(ValueError, match="value: must be a finite number"):
        TruncationPenalty(max_length=3, value=float("nan"))


def test_format_penalty_subtracts_or_zeroes_on_a_miss():
    subtract = FormatPenalty(r"<answer>.*</answer>", penalty=0.5)
    zero = FormatPenalty(r"<answer>.*</answer>", mode="zero")
    hit, miss = "<answer>4</answer>", "4"
    assert subtract.apply(_prompt(), hit, Reward(0.75)).value == 0.75
    assert subtract.apply(_prompt(), miss, Reward(0.75)).value == 0.25
    assert zero.apply(_prompt(), miss, Reward(0.75, correct=True)) == Reward(0.0, correct=True)
    assert FormatPenalty(r"\d", fullmatch=True).apply(_prompt(), "42", Reward(1.0)).value == 0.0


async def test_transforms_compose_in_order_and_leave_failures_alone():
    class Fixed:
        def __init__(self, reward):
            self.reward = reward

        async def score(self, prompt, response):
            return self.reward

        async def score_batch(self, prompts, responses):
            return [self.reward] * len(prompts)

    transforms = build_transforms([
        {"type": "format_penalty", "pattern": "^A", "penalty": 0.5},
        {"type": "length_penalty", "budget": 4, "coef": 1.0},
    ])
    fn = TransformedReward(Fixed(Reward(1.0, correct=True)), transforms)
    # "B" * 6: format miss (1 - 0.5), then 2 chars over a budget of 4 (- 0.5)
    assert (await fn.score(_prompt(), "B" * 6)).value == pytest.approx(0.0)
    assert (await fn.score(_prompt(), "AB")).value == pytest.approx(1.0)
    assert [r.value for r in await fn.score_batch([_prompt()] * 2, ["B" * 6, "AB"])] == [0, 1]
    failed = Reward.failed("timeout: slow", RewardStatus.TIMEOUT)
    assert await TransformedReward(Fixed(failed), transforms).score(_prompt(), "B") is failed


async def test_build_reward_applies_the_configured_transforms():
    fn = build_reward("exact_match", None, None, [{"type": "format_penalty", "pattern": "^4"}])
    assert isinstance(fn, TransformedReward)
    assert (await fn.score(_prompt("42"), "42")).value == 1.0
    assert (await fn.score(_prompt("42"), " 42")).value == 0.0  # right answer, wrong format
    with pytest.raises(PluginError, match=r"reward.transforms\[0\].mode: must be"):
        build_reward("exact_match", None, None, [{"type": "format_penalty", "pattern": "x",
                                                  "mode": "halve"}])
    assert hasattr(build_reward("code", None, None, [{"type": "length_penalty", "budget": 9}]),
                   "check")  # the driver's probe still reaches the inner reward


@pytest.mark.parametrize(
    "specs, message",
    [
        ([{"type": "length_penalty", "budget": 4}, {"type": "overlong_penalty", "max_length": 8,
                                                    "cache": 9}],
         "reward.transforms[1].cache: must be at most max_length"),
        ([{"type": "length_penalty", "budgt": 4}],
         "reward.transforms[0].budgt: not a parameter of transform 'length_penalty'"),
        ([{"type": "lenght_penalty"}], "reward.transforms[0].type: unknown transform"),
        ([{"budget": 4}], "reward.transforms[0]: expected a mapping with a 'type' key"),
    ],
)
def test_transform_errors_name_the_entry_and_kwarg(specs, message):
    with pytest.raises(PluginError) as info:
        build_transforms(specs)
    assert message in str(info.value)


# --- code reward helpers (the sandbox itself: tests/integration/test_sandbox.py) ---------------

def test_code_is_the_last_fenced_block_and_tests_come_from_metadata_or_answer():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```\nx = 2\n```") == "x = 2\n"
    assert extract_code("x = 3") == "x = 3"
    assert prompt_tests(_prompt("assert f()", tests=["assert 1", "assert 2"])) == ["assert 1",
                                                                                    "assert 2"]
    assert prompt_tests(_prompt("assert f()")) == ["assert f()"]
    assert prompt_tests(_prompt(None)) is None


# --- reasoning-gym ----------------------------------------------------------------------------

def test_gym_task_is_registered_and_seeded_and_carries_its_entry():
    assert TASKS["reasoning_gym"] is GymTask
    task = GymTask("basic_arithmetic", prompt_style="compact", max_terms=2, max_digits=1,
                   operators="+,-,*")
    first = task.example(random.Random("0/train/3"))
    assert first == task.example(random.Random("0/train/3"))  # same rng, same example
    assert first != task.example(random.Random("0/train/4"))
    entry = first.metadata[ENTRY_KEY]
    assert first.prompt == "".join(entry["question"].lower().split())
    assert first.answer == entry["answer"]
    assert set(entry["metadata"]["expression"]) <= set("0123456789+-*() ")
    clone = pickle.loads(pickle.dumps(task))  # travels to reward actors by its arguments
    assert clone.example(random.Random("0/train/3")) == first


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "basic_arithmetc"}, "dataset: unknown reasoning-gym dataset"),
    ({"dataset": "basic_arithmetic", "max_term": 2}, "max_term: not a field"),
    ({"dataset": "basic_arithmetic", "min_terms": 3, "max_terms": 2}, "max_terms must be >="),
    ({"dataset": "basic_arithmetic", "prompt_style": "short"}, "prompt_style: must be"),
])
def test_gym_task_errors_name_the_task_kwarg(kwargs, message):
    config = load_config(None, ["data.task=reasoning_gym"] + [
        f"data.task_kwargs.{k}={v}" for k, v in kwargs.items()])
    with pytest.raises(ConfigError) as info:
        build_task(config)
    assert str(info.value).startswith("data.task_kwargs:") and message in str(info.value)


def test_a_gym_task_outside_the_tiny_vocabulary_fails_at_prepare_time_with_the_fix():
    config = load_config(None, ["data.task=reasoning_gym",
                                "data.task_kwargs.dataset=basic_arithmetic"])
    with pytest.raises(ConfigError) as info:
        build_task(config)  # raw questions: "Calculate 5 - 3 - 6." has ' ' and 'C'
    assert "' '" in str(info.value) and "'C'" in str(info.value)
    assert "data.task_kwargs.prompt_style=compact" in str(info.value)
    config = load_config(None, ["data.task=reasoning_gym", "data.task_kwargs.dataset=leg_counting",
                                "data.task_kwargs.prompt_style=compact"])
    with pytest.raises(ConfigError, match="model.tiny.max_position_embeddings"):
        build_task(config)  # fits the alphabet, but ~200-character prompts do not fit


async def test_the_entry_reaches_the_scorer():
    # number_sorting scores against entry metadata: answer-only scoring would call the right
    # answer wrong, so the entry (Prompt.metadata) must travel with the prompt
    task = GymTask("number_sorting")
    example = task.example(random.Random(0))
    prompt = _prompt(example.answer, example.prompt, **example.metadata)
    assert task.score(example.answer, example.answer).value == 0.0  # without the entry
    for reward in (TaskReward(task), GymReward()):
        right = await reward.score(prompt, example.answer)
        assert right.ok and right.value == 1.0 and right.correct is True
        wrong = await reward.score(prompt, "['1.0']")
        assert wrong.ok and wrong.value < 1.0 and wrong.correct is False


async def test_gym_reward_extracts_tags_and_reports_scorer_crashes_as_failures():
    task = GymTask("basic_arithmetic")
    example = task.example(random.Random(1))
    prompt = _prompt(example.answer, example.prompt, **example.metadata)
    tagged = GymReward(answer_tag="answer")
    assert (await tagged.score(prompt, f"hmm <answer> {example.answer} </answer>")).value == 1.0
    assert (await tagged.score(prompt, example.answer)).value == 0.0  # no tag: no answer
    # a JSONL prompt (no entry) is scored against its answer, for a named dataset
    plain = _prompt(example.answer)
    assert (await GymReward("basic_arithmetic").score(plain, example.answer)).value == 1.0
    assert not (await GymReward().score(plain, example.answer)).ok  # which dataset?
    # word_sorting's scorer reads entry metadata: without it, it raises → a failure, not a 0
    crashed = await GymReward("word_sorting").score(plain, "a, b")
    assert not crashed.ok and crashed.error.startswith("error: reasoning-gym word_sorting")
    assert gym_reward.ENTRY_KEY == ENTRY_KEY
