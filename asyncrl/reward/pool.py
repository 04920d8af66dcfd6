"""RewardPool: scoring as its own pool of workers, sized and placed independently of the rollout
and trainer pools.

    RolloutManager ── finished samples ──► RewardPool.score ── chunks of batch_size ──►
        least-loaded RewardWorker (Ray actor; in-process when num_workers = 0)
            └─ score_batch: up to `concurrency` rewards at once, each under `timeout_s`

What can go wrong, and what happens:

| failure                                  | handled by   | outcome                              |
|------------------------------------------|--------------|--------------------------------------|
| one reward raises / times out            | RewardWorker | that sample's `Reward.failed(reason)` |
| a worker raises on the whole call        | RewardPool   | retried with backoff, then failed     |
| a worker dies or hangs past its deadline | RewardPool   | worker replaced, the chunk re-scored  |

Every failure is counted by reason (the text before the first ':' of its error, e.g. "timeout")
and then, by `reward.on_failure`, either kept as a failure (the DataManager drops the group) or
scored as `reward.failure_value`. Never a silent 0.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncrl.errors import WorkerLost
from asyncrl.types import Prompt, Reward, RewardStatus, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardSpec:
    """What a reward worker builds, in its own process (picklable, so it travels to actors).

    `remote` holds the gRPC client's arguments (address, token, tls_ca) for `reward.type:
    remote`; otherwise `fn` is resolved with `kwargs` (and the task, for the task's scorer).
    """

    fn: str
    task: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    transforms: list[dict[str, Any]] = field(default_factory=list)
    remote: dict[str, Any] | None = None

    def __call__(self) -> Any:
        if self.remote is not None:
            from asyncrl.reward.remote.client import RemoteReward

            return RemoteReward(**self.remote)
        from asyncrl.reward import build_reward

        return build_reward(self.fn, self.task, self.kwargs, self.transforms)


def failure_reason(reward: Reward) -> str:
    """The metric label of a failed reward: its error's prefix before ':' ("timeout", ...)."""
    head = (reward.error or "").partition(":")[0].strip().lower()
    if reward.status is RewardStatus.TIMEOUT:
        return "timeout"
    return head if head.isidentifier() else "error"


class RewardWorker:
    """The body of one reward actor: builds its reward function in its own process.

    Args:
        make_reward: a picklable zero-argument callable returning a `RewardFn` (built here, so a
            reward that holds processes, sockets or models never crosses a process boundary).
        concurrency: rewards scored at once.
        timeout_s: longest a single reward may take before it counts as failed ("timeout").
    """

    def __init__(self, make_reward: Callable[[], Any], *, concurrency: int, timeout_s: float):
        self._reward = make_reward()
        self._limit = asyncio.Semaphore(concurrency)
        self._timeout_s = timeout_s

    async def score_batch(self, items: list[tuple[Prompt, str]]) -> list[Reward]:
        batched = getattr(self._reward, "score_batch", None)
        if batched is not None:  # e.g. a reward model: one forward for the chunk
            try:
                return await asyncio.wait_for(batched(*map(list, zip(*items, strict=True))),
                                              self._timeout_s * max(1, len(items)))
            except TimeoutError:
                return [_timeout(self._timeout_s)] * len(items)
        return list(await asyncio.gather(*(self._score_one(p, r) for p, r in items)))

    async def _score_one(self, prompt: Prompt, response: str) -> Reward:
        async with self._limit:
            try:
                return await asyncio.wait_for(self._reward.score(prompt, response),
                                              self._timeout_s)
            except TimeoutError:
                return _timeout(self._timeout_s)
            except Exception as exc:  # a reward's crash is that sample's failure, not the pool's
                return Reward.failed(f"error: {type(exc).__name__}: {exc}")

    async def ready(self) -> bool:
        """Answers once the worker is built (actor start-up is not part of any call deadline)."""
        return True

    async def close(self) -> None:
        close = getattr(self._reward, "close", None)
        if close is not None:
            out = close()
            if asyncio.iscoroutine(out):
                await out


def _timeout(seconds: float) -> Reward:
    return Reward.failed(f"timeout: no reward within {seconds}s (reward.timeout_s)",
                         RewardStatus.TIMEOUT)


class RewardPool:
    """Scores samples across workers; counts failures by reason and applies the failure policy.

    Args:
        spawn_worker: starts worker number `i` and returns its ref (an `ActorRef`, or a
            `LocalRef` in local mode); called again with a new number to replace a lost worker.
        num_workers: workers started now (at least 1).
        batch_size: samples per call to a worker.
        call_timeout_s: deadline of one call to a worker; past it the worker counts as hung.
        retries: further attempts of a chunk after a failed call.
        backoff_s: wait before the first retry, doubled at each further one.
        on_failure: "drop_group" keeps failures failed; "score" replaces them by failure_value.
        failure_value: the reward a failure gets under on_failure="score".
        kill: stops a worker being replaced (e.g. `ray.kill`); None in local mode.
    """

    def __init__(
        self,
        spawn_worker: Callable[[int], Any],
        *,
        num_workers: int,
        batch_size: int,
        call_timeout_s: float,
        retries: int,
        backoff_s: float,
        on_failure: str = "drop_group",
        failure_value: float = 0.0,
        kill: Callable[[Any], None] | None = None,
    ) -> None:
        self._spawn, self._kill = spawn_worker, kill
        self._spawned = num_workers
        self.workers = [spawn_worker(i) for i in range(num_workers)]
        self._load = dict.fromkeys(range(num_workers), 0)
        self._batch_size, self._call_timeout_s = batch_size, call_timeout_s
        self._retries, self._backoff_s = retries, backoff_s
        self._on_failure, self._failure_value = on_failure, failure_value
        self.failures: Counter[str] = Counter()
        self.scored = 0
        self.workers_replaced = 0
        self.busy_s = 0.0
        self._ready: set[int] = set()  # ids of workers known to be started

    async def score(self, samples: list[Sample], prompts: dict[str, Prompt]) -> None:
        """Set `reward` on every sample (in place)."""
        chunks = [samples[i : i + self._batch_size]
                  for i in range(0, len(samples), self._batch_size)]
        results = await asyncio.gather(*(self._score_chunk(
            [(prompts[s.prompt_id], s.response_text) for s in chunk]) for chunk in chunks))
        for chunk, rewards in zip(chunks, results, strict=True):
            for sample, reward in zip(chunk, rewards, strict=True):
                sample.reward = self._apply_policy(reward)

    def stats(self) -> dict[str, float]:
        return {
            "reward/scored": float(self.scored),
            "reward/workers_replaced": float(self.workers_replaced),
            "reward/busy_s": self.busy_s,
            **{f"reward/failures/{k}": float(v) for k, v in sorted(self.failures.items())},
        }

    def failed(self, error: str) -> Reward:
        """A failure found before scoring (e.g. a workflow error): counted by the reason
        before its first ':' and handled by reward.on_failure like any failed reward."""
        return self._apply_policy(Reward.failed(error))

    def _apply_policy(self, reward: Reward) -> Reward:
        self.scored += 1
        if reward.ok:
            return reward
        self.failures[failure_reason(reward)] += 1
        if self._on_failure == "score":
            return Reward(value=self._failure_value, correct=False, error=reward.error)
        return reward

    async def _score_chunk(self, items: list[tuple[Prompt, str]]) -> list[Reward]:
        error = "no attempt"
        for attempt in range(self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff_s * 2 ** (attempt - 1))
            slot = min(self._load, key=self._load.__getitem__)
            worker = self.workers[slot]
            self._load[slot] += len(items)
            start = asyncio.get_running_loop().time()
            try:
                if id(worker) not in self._ready:
                    await worker.ready()
                    self._ready.add(id(worker))
                rewards = await asyncio.wait_for(worker.score_batch(items), self._call_timeout_s)
                if len(rewards) != len(items):
                    raise ValueError(f"{len(rewards)} rewards for {len(items)} samples")
                return rewards
            except (WorkerLost, TimeoutError) as exc:  # dead or hung: replace, re-score
                error = f"{type(exc).__name__}: {exc}"
                log.warning("reward worker %d lost (%s); replacing it", slot, error)
                self._replace(slot, worker)
            except Exception as exc:  # the call itself failed: retry with backoff
                error = f"{type(exc).__name__}: {exc}"
                log.warning("reward call failed (attempt %d): %s", attempt + 1, error)
            finally:
                self.busy_s += asyncio.get_running_loop().time() - start
                if self.workers[slot] is worker:
                    self._load[slot] -= len(items)
        reason = f"pool: {len(items)} samples unscored after {self._retries + 1} attempts ({error})"
        return [Reward.failed(reason)] * len(items)

    def _replace(self, slot: int, worker: Any) -> None:
        if self.workers[slot] is not worker:  # another chunk already replaced it
            return
        if self._kill is not None:
            try:
                self._kill(worker)
            except Exception as exc:  # already dead is fine; anything else is only logged
                log.debug("killing reward worker %d: %s", slot, exc)
        self.workers[slot] = self._spawn(self._spawned)
        self._spawned += 1
        self._load[slot] = 0
        self.workers_replaced += 1


def pool_call_timeout(timeout_s: float, batch_size: int, concurrency: int) -> float:
    """A worker is hung when a chunk takes longer than its rewards could, back to back."""
    return timeout_s * (math.ceil(batch_size / concurrency) + 1)

