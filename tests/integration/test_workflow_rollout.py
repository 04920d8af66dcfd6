"""Multi-turn episodes through a real RolloutWorker (CPU engine, tiny model, no Ray): turns
alternate, environment tokens are masked out of the loss with logprob 0 and their turn's
version, model tokens' logprobs equal the teacher-forced reference over the interleaved
context, and an episode aborted mid-turn or between turns resumes to the same episode."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncrl.controller.pools import new_samples
from asyncrl.data.datasets import to_prompt
from asyncrl.data.guess_task import GuessNumber, feedback
from asyncrl.models.forward import token_logprobs
from asyncrl.rollout.worker import RolloutWorker
from asyncrl.rollout.workflow import WorkflowSpec
from asyncrl.types import FinishReason, Sample, SamplingParams
from tests.helpers import as_batch, save_tiny_model

pytestmark = pytest.mark.timeout(120)

GUESS = WorkflowSpec("guess_number", max_turns=4, max_turn_tokens=3)
BUDGET = 20  # model + environment tokens per episode
PARAMS = SamplingParams(temperature=1.0)
TOLERANCE = 1e-5  # fp32 engine vs trainer logprobs, as in test_cpu_engine.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _episodes(tokenizer, spec: WorkflowSpec, prompts: int = 3, n: int = 3) -> list[Sample]:
    task, rng, env = GuessNumber(max_low=20, min_width=4, max_width=8), random.Random(0), spec()
    return [s for i in range(prompts) for s in new_samples(
        to_prompt(f"g{i}", task.example(rng), tokenizer), n, BUDGET, env)]


def _runs(mask: list[bool]) -> list[tuple[bool, int, int]]:
    """(is_model, start, end) of each maximal run of equal mask values."""
    runs, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            runs.append((mask[start], start, i))
            start = i
    return runs


async def test_an_episode_interleaves_masked_feedback_with_model_turns_scored_as_the_reference(
    model_dir, tokenizer
):
    # Nine guessing episodes and one single-turn sample in the same generate call.
    worker = RolloutWorker(str(model_dir), "cpu", seed=0, workflow=GUESS)
    samples = _episodes(tokenizer, GUESS)
    single = Sample(sample_id="s/0", prompt_id="s", prompt_ids=tokenizer("sort:31=").input_ids,
                    max_new_tokens=6)
    try:
        out = await worker.generate([*samples, single], PARAMS)
    finally:
        await worker.close()
    assert out[-1] is single and single.response_mask == [] and single.episode == {}
    eos = tokenizer.eos_token_id
    for s in samples:
        ep, mask = s.episode, s.model_token_mask()
        assert len(s.response_ids) == len(s.rollout_logprobs) == len(s.token_versions) == len(mask)
        assert s.is_finished and len(s.response_ids) <= BUDGET
        runs = _runs(mask)
        model_runs = [r for r in runs if r[0]]
        assert runs[0][0] and len(model_runs) == ep["turns"] <= GUESS.max_turns
        assert ep["end"] in ("done", "max_turns", "max_new_tokens")
        assert (s.finish_reason is FinishReason.LENGTH) == (ep["end"] == "max_new_tokens")
        state, turn = ep["state"], ""
        for i, (is_model, start, end) in enumerate(runs):
            ids = s.response_ids[start:end]
            if is_model:  # a turn ends at EOS or at its token budget (or the episode's)
                assert eos not in ids[:-1] and end - start <= GUESS.max_turn_tokens
                if i + 1 < len(runs):
                    assert ids[-1] == eos or end - start == GUESS.max_turn_tokens
                turn = tokenizer.decode(ids, skip_special_tokens=True)
                continue
            # The observation is the environment's feedback to the turn before it.
            assert tokenizer.decode(ids) == feedback(turn, state["low"], state["high"],
                                                     state["secret"])
            assert s.rollout_logprobs[start:end] == [0.0] * (end - start)
            assert s.token_versions[start:end] == [s.token_versions[start - 1]] * (end - start)
        if ep["end"] == "done":  # the last turn found the secret
            last = model_runs[-1]
            assert tokenizer.decode(s.response_ids[last[1]:last[2]],
                                    skip_special_tokens=True) == str(state["secret"])
        assert s.response_text == tokenizer.decode(s.response_ids, skip_special_tokens=True)
    assert any(not m for s in samples for m in s.model_token_mask()), "no feedback at all"
    batch = as_batch(samples, tokenizer.pad_token_id)
    for row, s in enumerate(samples):
        p = len(s.prompt_ids)
        assert batch.loss_mask[row, p : p + len(s.response_ids)].tolist() == s.model_token_mask()
        assert not batch.loss_mask[row, :p].any()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        reference, _ = token_logprobs(model, batch.input_ids, batch.attention_mask, 1.0)
    error = ((reference - batch.rollout_logprobs).abs() * batch.loss_mask).max()
    assert float(error) <= TOLERANCE


@contextlib.asynccontextmanager
async def _workers(model_dir, spec: WorkflowSpec, count: int):
    """`count` rollout workers of one seed running `spec` (a reference and one to interrupt
    draw the same tokens), closed afterwards."""
    workers = [RolloutWorker(str(model_dir), "cpu", seed=0, workflow=spec) for _ in range(count)]
    try:
        yield workers
    finally:
        for worker in workers:
            await worker.close()


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0)


def _assert_same_episodes(resumed: list[Sample], reference: list[Sample]) -> None:
    for a, b in zip(resumed, reference, strict=True):
        assert a.response_ids == b.response_ids, a.sample_id
        assert a.model_token_mask() == b.model_token_mask()
        assert a.episode == b.episode and a.finish_reason is b.finish_reason
        assert a.max_new_tokens == b.max_new_tokens == BUDGET
        assert max(abs(x - y) for x, y in zip(a.rollout_logprobs, b.rollout_logprobs,
                                              strict=True)) <= TOLERANCE


async def test_an_episode_aborted_mid_turn_resumes_that_turn_to_the_same_episode(
    model_dir, tokenizer
):
    # The same nine episodes run straight through (reference), and on a second worker with the
    # same seed interrupted in their second model turn, pickled (as a checkpoint would) and
    # resumed: draws are keyed by (seed, sample, position), so the episodes must be identical.
    async with _workers(model_dir, GUESS, 2) as (reference_worker, worker):
        reference = await reference_worker.generate(_episodes(tokenizer, GUESS), PARAMS)
        samples = _episodes(tokenizer, GUESS)
        request = asyncio.create_task(worker.generate(samples, PARAMS))
        await _until(lambda: any(s.episode["turns"] >= 1
                                 and len(s.response_ids) > s.episode["turn_start"]
                                 for s in samples))
        await worker.abort(None)
        await request
        partial = [s for s in samples if s.finish_reason is FinishReason.ABORT]
        mid_turn = [s for s in partial if len(s.response_ids) > s.episode["turn_start"] > 0]
        assert mid_turn, "the abort must catch an episode inside its second turn"
        assert all(s.max_new_tokens == BUDGET and "end" not in s.episode for s in partial)
        restored = pickle.loads(pickle.dumps(partial))
        assert [s.episode for s in restored] == [s.episode for s in partial]
        await worker.generate(restored, PARAMS)
    by_id = {s.sample_id: s for s in [*samples, *restored] if s.is_finished}
    _assert_same_episodes([by_id[s.sample_id] for s in reference], reference)


async def test_an_episode_aborted_while_its_environment_steps_resumes_with_the_next_turn(
    model_dir, tokenizer
):
    # A slow tool (tests.plugins.workflows:SlowEcho): the abort arrives while every episode
    # waits for its first observation; each comes back ABORT with the observation appended and
    # the next turn not started, and resumes to the episode an uninterrupted run produces.
    spec = WorkflowSpec("tests.plugins.workflows:SlowEcho", {"delay_s": 0.5}, max_turns=3,
                        max_turn_tokens=3)
    async with _workers(model_dir, spec, 2) as (reference_worker, worker):
        reference = await reference_worker.generate(_episodes(tokenizer, spec, 2, 2), PARAMS)
        samples = _episodes(tokenizer, spec, 2, 2)
        request = asyncio.create_task(worker.generate(samples, PARAMS))
        await _until(lambda: all(s.episode["turns"] == 1 for s in samples))
        await worker.abort(None)
        await request
        for s in samples:
            assert s.finish_reason is FinishReason.ABORT
            assert s.episode["turn_start"] == len(s.response_ids)  # the next turn not begun
            assert s.episode["state"] == {"calls": 1}
            assert tokenizer.decode(s.response_ids[-2:]) == "ok"
            assert s.model_token_mask()[-2:] == [False, False]
        await worker.generate(samples, PARAMS)
    _assert_same_episodes(samples, reference)


async def test_an_episode_aborted_before_its_first_turn_comes_back_empty_and_resumes(
    model_dir, tokenizer
):
    # The abort lands right after the request arrived, before any episode reached the engine.
    async with _workers(model_dir, GUESS, 2) as (reference_worker, worker):
        reference = await reference_worker.generate(_episodes(tokenizer, GUESS, 2, 2), PARAMS)
        samples = _episodes(tokenizer, GUESS, 2, 2)
        request = asyncio.create_task(worker.generate(samples, PARAMS))
        await asyncio.sleep(0)  # generate has run up to its first await
        await worker.abort(None)
        await request
        assert all(s.finish_reason is FinishReason.ABORT and not s.response_ids
                   and s.episode["turns"] == 0 for s in samples)
        await worker.generate(samples, PARAMS)
    _assert_same_episodes(samples, reference)


async def test_an_episode_aborted_in_turn_two_resumes_under_new_weights_with_honest_versions(
    model_dir, tokenizer
):
    # APRIL's real sequence: abort in turn 2, the trainer's new weights arrive (version 1),
    # the episode resumes. Versions never decrease along the response; the resumed tokens
    # carry version 1; environment tokens stay masked with their turn's version.
    async with _workers(model_dir, GUESS, 1) as (worker,):
        samples = _episodes(tokenizer, GUESS)
        request = asyncio.create_task(worker.generate(samples, PARAMS))
        await _until(lambda: any(s.episode["turns"] >= 1
                                 and len(s.response_ids) > s.episode["turn_start"]
                                 for s in samples))
        await worker.abort(None)
        await request
        in_turn_two = [s for s in samples if s.finish_reason is FinishReason.ABORT
                       and len(s.response_ids) > s.episode["turn_start"] > 0]
        assert in_turn_two, "the abort must catch an episode inside its second turn"
        before = {s.sample_id: len(s.response_ids) for s in in_turn_two}
        weights = await worker.engine_weights()
        await worker._engine.update_weights(weights.items(), 1)  # as receive_weights does
        await worker.generate(in_turn_two, PARAMS)
    for s in in_turn_two:
        assert s.is_finished
        versions, mask = s.token_versions, s.model_token_mask()
        assert versions == sorted(versions), versions
        cut = before[s.sample_id]
        assert set(versions[:cut]) == {0} and set(versions[cut:]) <= {1}
        for is_model, start, end in _runs(mask):
            if not is_model:  # an observation: not trained, logprob 0, its turn's version
                assert all(lp == 0.0 for lp in s.rollout_logprobs[start:end])
                assert set(versions[start:end]) == {versions[start - 1]}
        batch = as_batch([s], tokenizer.pad_token_id)
        p = len(s.prompt_ids)
        assert batch.loss_mask[0, p : p + len(mask)].tolist() == mask
