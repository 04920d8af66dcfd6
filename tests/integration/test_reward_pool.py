"""RewardPool: real RewardWorkers, in-process (LocalRef) and as Ray actors; failures are typed,
counted by reason and never scored as a silent 0; a lost or hung worker's samples are re-scored."""

from __future__ import annotations

import asyncio
import json
import time
from itertools import pairwise

import pytest

from asyncrl.cluster.actors import LocalRef, kill_all, spawn
from asyncrl.reward.pool import RewardPool, RewardSpec, RewardWorker, pool_call_timeout
from asyncrl.types import Prompt, Reward, RewardStatus, Sample

pytestmark = pytest.mark.timeout(120)


def _prompts_and_samples(texts: list[str], answer: str = "12345", **metadata):
    prompts = {f"p{i}": Prompt(f"p{i}", text, [1], answer=answer, metadata=dict(metadata))
               for i, text in enumerate(texts)}
    samples = [Sample(f"p{i}/0", f"p{i}", [1], 4) for i in range(len(texts))]
    return prompts, samples


def _local_pool(spec, *, timeout_s=5.0, concurrency=4, **kwargs) -> RewardPool:
    def spawn_worker(i):
        worker = RewardWorker(spec, concurrency=concurrency, timeout_s=timeout_s)
        return LocalRef(worker, f"reward-{i}")

    options = dict(num_workers=2, batch_size=2, call_timeout_s=30.0, retries=2, backoff_s=0.01)
    return RewardPool(spawn_worker, **{**options, **kwargs})


async def test_a_user_function_scores_and_its_crashes_are_failures_counted_by_reason():
    pool = _local_pool(RewardSpec("tests.plugins.rewards:answer_prefix"))
    prompts, samples = _prompts_and_samples(["a", "b", "c"])
    for s, text in zip(samples, ["123", "9xx", "12345"], strict=True):
        s.response_text = text
    await pool.score(samples, prompts)
    assert [s.reward.value for s in samples[::2]] == [0.6, 1.0]
    crashed = samples[1].reward
    assert not crashed.ok and crashed.value != crashed.value  # NaN, never 0
    assert "ValueError" in crashed.error
    assert pool.stats()["reward/failures/error"] == 1 and pool.stats()["reward/scored"] == 3


async def test_on_failure_score_gives_the_configured_value_and_still_counts_the_failure():
    pool = _local_pool(RewardSpec("tests.plugins.rewards:answer_prefix"),
                       on_failure="score", failure_value=-1.0)
    prompts, samples = _prompts_and_samples(["a"])
    samples[0].response_text = "9"
    await pool.score(samples, prompts)
    assert samples[0].reward.ok and samples[0].reward.value == -1.0
    assert "ValueError" in samples[0].reward.error
    assert pool.failures == {"error": 1}


async def test_a_reward_past_its_timeout_fails_as_timeout_and_the_others_are_scored():
    pool = _local_pool(RewardSpec("tests.plugins.rewards:slow_on_marker"), timeout_s=0.3)
    prompts, samples = _prompts_and_samples(["fast", "slow one", "fast too"])
    await asyncio.wait_for(pool.score(samples, prompts), 10)
    assert [s.reward.status for s in samples] == [
        RewardStatus.OK, RewardStatus.TIMEOUT, RewardStatus.OK]
    assert "reward.timeout_s" in samples[1].reward.error
    assert pool.failures == {"timeout": 1}


class FailsFirstBatch:
    """A batched reward whose first call fails as a whole (e.g. a flaky model server)."""

    def __init__(self, failures: int) -> None:
        self.calls, self.failures = 0, failures
        self.times: list[float] = []  # when each call came

    async def score(self, prompt: Prompt, response: str) -> Reward:
        raise AssertionError("the pool must use score_batch")

    async def score_batch(self, prompts: list[Prompt], responses: list[str]) -> list[Reward]:
        self.calls += 1
        self.times.append(time.monotonic())
        if self.calls <= self.failures:
            raise ConnectionError("model server not ready")
        return [Reward(value=float(len(r))) for r in responses]


async def test_a_failed_call_is_retried_with_backoff_then_fails_typed_when_retries_run_out():
    flaky = FailsFirstBatch(failures=1)
    pool = _local_pool(lambda: flaky, num_workers=1, batch_size=8)
    prompts, samples = _prompts_and_samples(["a", "b"])
    for s, text in zip(samples, ["xx", "yyy"], strict=True):
        s.response_text = text
    await pool.score(samples, prompts)
    assert [s.reward.value for s in samples] == [2.0, 3.0] and flaky.calls == 2

    broken = FailsFirstBatch(failures=10)
    pool = _local_pool(lambda: broken, num_workers=1, batch_size=8, retries=2)
    await pool.score(samples, prompts)
    assert broken.calls == 3
    assert all(not s.reward.ok and "after 3 attempts" in s.reward.error for s in samples)
    assert pool.failures == {"pool": 2}


async def test_the_wait_before_each_retry_doubles():
    broken = FailsFirstBatch(failures=10)
    pool = _local_pool(lambda: broken, num_workers=1, batch_size=8, retries=3, backoff_s=0.1)
    prompts, samples = _prompts_and_samples(["a"])
    await pool.score(samples, prompts)
    assert broken.calls == 4 and not samples[0].reward.ok
    gaps = [later - earlier for earlier, later in pairwise(broken.times)]
    # lower bounds only: a loaded machine may wait longer, never shorter (1 ms for the clock)
    for gap, backoff in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert gap >= backoff - 1e-3, (gaps, backoff)


@pytest.mark.parametrize("num_workers", [1, 2])
async def test_reward_concurrency_caps_the_rewards_each_worker_scores_at_once(num_workers):
    # reward.concurrency is RewardWorker's `concurrency`; 12 samples in chunks of 6 each
    # offer a worker twice its cap
    pool = _local_pool(RewardSpec("tests.plugins.rewards:count_in_flight"), concurrency=3,
                       num_workers=num_workers, batch_size=6)
    prompts, samples = _prompts_and_samples(["x"] * 12)
    await pool.score(samples, prompts)
    assert all(s.reward.ok for s in samples)
    # in-process workers share the plugin's counter: the peak is the caps of all of them
    assert max(s.reward.value for s in samples) == 3 * num_workers


async def test_a_killed_reward_actor_is_replaced_and_its_samples_are_rescored(ray_local):
    import ray

    spec = RewardSpec("tests.plugins.rewards:sleep_then_pid")
    spawned = []

    def spawn_worker(i):
        spawned.append(spawn(RewardWorker, spec, name=f"reward-chaos-{i}", num_cpus=0,
                             concurrency=8, timeout_s=30.0))
        return spawned[-1]

    pool = RewardPool(spawn_worker, num_workers=1, batch_size=4, call_timeout_s=60.0,
                      retries=2, backoff_s=0.05, kill=lambda ref: kill_all([ref]))
    try:
        first_pid = (await spawned[0].score_batch([(Prompt("x", "x", [1]), "")]))[0].value
        prompts, samples = _prompts_and_samples(["a", "b", "c", "d"], sleep=1.5)
        scoring = asyncio.create_task(pool.score(samples, prompts))
        await asyncio.sleep(0.5)  # the chunk is in the worker, mid-reward
        ray.kill(spawned[0].handle, no_restart=True)
        await asyncio.wait_for(scoring, 60)
        assert all(s.reward.ok for s in samples)
        assert {s.reward.value for s in samples} != {first_pid}  # scored by the replacement
        assert pool.workers_replaced == 1 and len(spawned) == 2
        assert pool.failures == {}
    finally:
        kill_all(pool.workers)


async def test_a_hung_reward_actor_past_the_call_deadline_is_replaced(ray_local):
    spec = RewardSpec("tests.plugins.rewards:blocking_hang")

    def spawn_worker(i):
        return spawn(RewardWorker, spec, name=f"reward-hang-{i}", num_cpus=0, concurrency=2,
                     timeout_s=0.5)

    # The reward blocks its actor's loop, so even the per-reward timeout cannot fire: only
    # the pool's call deadline catches it. A retry on a fresh worker hangs again → typed failure.
    pool = RewardPool(spawn_worker, num_workers=1, batch_size=2,
                      call_timeout_s=pool_call_timeout(0.5, 2, 2), retries=1, backoff_s=0.0,
                      kill=lambda ref: kill_all([ref]))
    try:
        prompts, samples = _prompts_and_samples(["a"], hang=True)
        await asyncio.wait_for(pool.score(samples, prompts), 30)
        assert not samples[0].reward.ok and "TimeoutError" in samples[0].reward.error
        assert pool.workers_replaced == 2
        ok_prompts, ok_samples = _prompts_and_samples(["b"])
        await pool.score(ok_samples, ok_prompts)  # the pool keeps serving
        assert ok_samples[0].reward.ok
    finally:
        kill_all(pool.workers)


def test_a_short_training_run_uses_a_module_function_reward_and_reports_its_failures(
    ray_local, tmp_path
):
    from asyncrl.config import load_config
    from asyncrl.controller.run import run

    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=user-reward", "run.steps=4", "run.eval_every=4",
        "model.warm_start.steps=5", "data.eval_size=8", "rollout.prompts_per_step=4",
        "rollout.n_samples=4", "reward.fn=tests.plugins.rewards:crash_on_every_third_prompt",
        "reward.num_workers=2", "rollout.temperature=1.5",
    ])
    result = run(config, progress=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "reward/scored" in r]
    assert len(steps) == 4 and steps[-1]["reward/scored"] >= 4 * 4 * 4
    # train-1's answers all fail (and those starting with '9'): counted by their reason,
    # "error", and each dropped its whole group, never scored as a 0
    failures = steps[-1].get("reward/failures/error", 0.0)
    dropped = steps[-1].get("data/dropped/reward_failed", 0.0)
    assert failures >= 4 and dropped >= 4, (failures, dropped)
    assert result.ledger["balance"] == 0
