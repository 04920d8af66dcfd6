"""Multi-turn samples: the response mask in TrainBatch, environment-token versions and
logprobs, and the built-in environments' step logic (guess_number, python_tool)."""

from __future__ import annotations

import random

import pytest

from asyncrl.algo.staleness import staleness
from asyncrl.data.guess_task import GuessNumber, feedback, prompt_range
from asyncrl.errors import PluginError
from asyncrl.reward.builtin.code import CodeReward
from asyncrl.rollout.workflow import Step, build_workflow
from asyncrl.types import Group, Prompt, Reward, Sample, TrainBatch


def _episode_sample() -> Sample:
    # prompt [5, 6]; model turn [10, 11] at version 2, observation [20, 21, 22], model turn [12]
    # at version 3 (the weights changed between turns).
    s = Sample(sample_id="p/0", prompt_id="p", prompt_ids=[5, 6], max_new_tokens=16)
    s.append(10, -0.5, 2)
    s.append(11, -0.25, 2)
    s.append_environment([20, 21, 22])
    s.append(12, -1.0, 3)
    s.reward = Reward(1.0)
    return s


def test_environment_tokens_are_masked_out_of_loss_mask_and_aligned_per_token():
    single = Sample(sample_id="q/0", prompt_id="q", prompt_ids=[7], max_new_tokens=4,
                    response_ids=[30, 31], rollout_logprobs=[-0.1, -0.2], token_versions=[3, 3],
                    reward=Reward(0.0))
    batch = TrainBatch.from_groups([Group(Prompt("p", "", []), [_episode_sample()]),
                                    Group(Prompt("q", "", []), [single])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 10, 11, 20, 21, 22, 12],
                                        [7, 30, 31, 0, 0, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [
        [False, False, True, True, False, False, False, True],
        [False, True, True, False, False, False, False, False],  # empty mask: all model tokens
    ]
    assert batch.rollout_logprobs[0].tolist() == [0, 0, -0.5, -0.25, 0, 0, 0, -1.0]
    # An observation carries the version of the model turn it answers.
    assert batch.token_versions[0].tolist() == [-1, -1, 2, 2, 2, 2, 2, 3]
    assert batch.attention_mask[0].all()


def test_the_mask_covers_a_prefix_and_later_engine_tokens_count_as_model_tokens():
    s = _episode_sample()
    assert s.response_mask == [True, True, False, False, False]  # engines never extend it
    assert s.model_token_mask() == [True, True, False, False, False, True]
    s.append(13, -0.3, 4)
    assert s.model_token_mask()[-2:] == [True, True]


def test_staleness_of_an_episode_is_set_by_its_oldest_model_token():
    s = _episode_sample()
    assert staleness(s.token_versions, 5) == 3  # version 2: the first model turn


def test_an_episode_cannot_start_with_an_environment_turn():
    s = Sample(sample_id="p/0", prompt_id="p", prompt_ids=[5], max_new_tokens=4)
    with pytest.raises(ValueError, match="starts with a model turn"):
        s.append_environment([1])
    s.append_environment([])  # nothing to append: nothing happens
    assert s.response_ids == [] and s.response_mask == []


def test_guess_number_feedback_points_towards_the_secret():
    assert feedback("12", 10, 20, 15) == ">"
    assert feedback("18", 10, 20, 15) == "<"
    assert feedback(" 15 ", 10, 20, 15) is None
    assert feedback("21", 10, 20, 15) == "?"  # outside the range
    assert feedback("1a", 10, 20, 15) == "?"
    assert feedback("", 10, 20, 15) == "?"
    assert prompt_range("guess:10-20=") == (10, 20)
    with pytest.raises(ValueError, match="not a guess_number prompt"):
        prompt_range("sort:123=")


def test_guess_number_examples_hold_their_secret_in_range_and_score_by_guesses():
    task = GuessNumber(max_low=50, min_width=4, max_width=8)
    rng = random.Random(0)
    for _ in range(200):
        example = task.example(rng)
        low, high = prompt_range(example.prompt)
        assert 0 <= low < 50 and 4 <= high - low <= 8 and low <= int(example.answer) <= high
    # The transcript the reward sees: guesses and feedback, in order.
    def score(transcript: str) -> tuple[float, bool]:
        reward = task.score(transcript, "14")
        return round(reward.value, 6), reward.correct

    assert score("16<13>14") == (round(0.8 / 3 + 0.2, 6), True)
    assert score("14") == (1.0, True)
    assert score("x?14") == (round(0.8 / 2 + 0.2 / 2, 6), True)  # one malformed turn
    assert score("16<13>15<") == (0.2, False)  # the budget ran out after three valid guesses
    assert score("16<13>a?15") == (round(0.2 * 2 / 4, 6), False)  # the turns ran out
    assert score("") == (0.0, False)
    with pytest.raises(ValueError, match="max_width must be >= min_width"):
        GuessNumber(min_width=5, max_width=4)


def test_guess_number_environment_plays_one_episode_from_its_prompt():
    env = build_workflow("guess_number")
    state = env.start(Prompt("p", "guess:10-20=", [], answer="15"))
    assert state == {"low": 10, "high": 20, "secret": 15}
    assert env.step("12", state) == Step(observation=">")
    assert env.step("x", state) == Step(observation="?")
    assert env.step("15", state) == Step(done=True)
    with pytest.raises(ValueError, match="no integer answer"):
        env.start(Prompt("p", "guess:10-20=", [], answer=None))


async def test_python_tool_runs_a_code_turn_in_the_sandbox_and_returns_its_output():
    env = build_workflow("python_tool", {"timeout_s": 2.0, "max_output_chars": 200})
    state = env.start(Prompt("p", "what is 6*7?", []))
    step = await env.step("let me compute\n```python\nprint(6 * 7)\n```", state)
    assert step == Step(observation="\n<output>\n42\n</output>\n") and state == {"calls": 1}
    step = await env.step("```python\nraise ValueError('boom')\n```", state)
    assert "ValueError: boom" in step.observation and not step.done
    step = await env.step("```python\nwhile True: pass\n```", state)
    assert "timeout: killed after 2s" in step.observation
    step = await env.step("```python\nprint('x' * 500)\n```", state)
    # The last max_output_chars printed characters (the print's newline is one of them).
    assert step.observation == "\n<output>\n" + "x" * 199 + "\n</output>\n"
    assert await env.step("the answer is 42", state) == Step(done=True)
    assert state == {"calls": 4}
    await env.check()  # the driver's probe: print(6 * 7) comes back as 42


@pytest.mark.parametrize("spec, kwargs, message", [
    ("chess", {}, "rollout.workflow: unknown name 'chess'. Use one of: guess_number, "
                  "python_tool"),
    ("nosuch_mod:make", {}, "rollout.workflow: cannot import module 'nosuch_mod'"),
    ("tests.plugins.workflows:missing", {}, "has no attribute 'missing'"),
    ("tests.plugins.workflows:no_step", {}, "without a step() taking 2 argument(s)"),
    ("tests.plugins.workflows:SlowEcho", {"bogus": 1}, "rollout.workflow_kwargs:"),
    ("python_tool", {"max_output_chars": 0}, "rollout.workflow_kwargs: 'python_tool' rejected"),
])
def test_a_bad_workflow_fails_with_a_message_naming_the_field(spec, kwargs, message):
    with pytest.raises(PluginError) as info:
        build_workflow(spec, kwargs)
    assert message in str(info.value)


def test_a_user_workflow_is_built_from_its_path_with_kwargs():
    env = build_workflow("tests.plugins.workflows:SlowEcho", {"reply": "hi", "delay_s": 0})
    assert (env.reply, env.delay_s) == ("hi", 0)


async def test_the_code_reward_grades_the_last_program_of_a_python_tool_transcript():
    # Two tool calls and a final answer, as the reward sees them: the whole transcript.
    env = build_workflow("python_tool", {"timeout_s": 2.0})
    state = env.start(Prompt("p", "write f", []))
    transcript = ""
    for turn in ("```python\ndef f():\n    return 1\nprint(f())\n```",
                 "```python\ndef f():\n    return 42\nprint(f())\n```", "f is done"):
        step = await env.step(turn, state)
        transcript += turn + step.observation
    assert transcript.count("<output>") == 2 and step.done
    reward = await CodeReward(timeout_s=2.0).score(
        Prompt("p", "write f", [], metadata={"tests": ["assert f() == 42"]}), transcript)
    assert reward == Reward(value=1.0, correct=True)


async def test_a_python_tool_episode_runs_its_program_in_the_sandbox_and_masks_the_output():
    """The whole episode loop with the real sandbox; the model's two turns are given (a tiny
    random model writes no Python), one byte per token so any text is representable."""
    from asyncrl.rollout.workflow import WorkflowSpec
    from asyncrl.rollout.workflow.episode import run_episode
    from asyncrl.types import FinishReason, new_episode

    spec = WorkflowSpec("python_tool", {"timeout_s": 5.0}, max_turns=4)
    env = spec()
    turns = iter(["```python\nprint(6 * 7)\n```", "so it is 42"])

    async def model_turn(sample: Sample) -> None:  # the policy: its next turn, then EOS
        for token in next(turns).encode():
            sample.append(token, -0.1, 0)
        sample.finish_reason = FinishReason.STOP

    s = Sample(sample_id="p/0", prompt_id="p", prompt_ids=[1], max_new_tokens=200,
               episode=new_episode(env.start(Prompt("p", "6*7?", []))))
    await run_episode(s, generate=model_turn, decode=lambda ids: bytes(ids).decode(),
                      encode=lambda text: list(text.encode()), workflow=env, spec=spec,
                      aborted=lambda: False)
    text = bytes(s.response_ids).decode()
    assert text == "```python\nprint(6 * 7)\n```\n<output>\n42\n</output>\nso it is 42"
    assert s.finish_reason is FinishReason.STOP and s.episode["end"] == "done"
    assert s.episode["turns"] == 2 and s.episode["state"] == {"calls": 1}
    observation = "\n<output>\n42\n</output>\n"
    start = text.index(observation)
    mask = s.model_token_mask()
    assert mask == [True] * start + [False] * len(observation) + [True] * len("so it is 42")
    assert all(lp == 0.0 for lp, m in zip(s.rollout_logprobs, mask, strict=True) if not m)
