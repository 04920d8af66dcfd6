"""RolloutManager: admits prompts under the staleness gate and dispatches them to workers.

Order of work: partials (interrupted answers) first, then prompts re-queued after a drop, then
fresh prompts. Each group goes, whole, to the worker with the fewest samples in flight. With a
curriculum, the DataManager plans each drawn prompt (`plan`): its group size, or a skip, which
takes no slot, so the next round draws another prompt in its place.

Staleness gate (active-slot form; it holds no history, so it is exact after a resume):

    admit while active_groups < (⌊η / m⌋ + 1) × B  [+ (oversample − 1) × B while < B are ready]

B = groups per batch, m = policy versions per batch (optimizer steps per batch), active_groups =
groups admitted whose slot is not free yet. A slot is freed only when its group was dropped, or
was trained and the resulting weights reached every worker (torchtitan's "born fresh" rule).
So with oversample = 1 every group starts on weights at most ⌊η/m⌋ batches older than the batch
that trains it: staleness ≤ η. Over-provisioning adds (oversample − 1) × B groups once, for the
batch being filled, and only while fewer than B groups are ready: once the next batch can be
filled the trainer is the bottleneck, and extra groups would only wait until stale. (Multiplying
the whole window by oversample let the producer run so far ahead on a long-tail load that 2,080
of 5,888 samples went stale: benchmarks/throughput.py at η = 4, oversample 2.) The
DataManager still checks every batch, so out-of-order completion or over-provisioning can only
cause counted drops, never a stale sample trained.

APRIL: `abort_in_flight()` interrupts every request; the engines return partial answers, which
go to the partial pool and are resumed first, from their tokens, under newer weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asyncrl.errors import WorkerLost
from asyncrl.types import Prompt, Sample, SamplingParams

log = logging.getLogger(__name__)


def gate_capacity(
    *, max_staleness: int, versions_per_batch: int, batch_groups: int, oversample: float
) -> tuple[int, int]:
    """(window, extra): groups that may be active at once, and the over-provisioned groups
    admitted on top while the next batch is not yet ready (see the module docstring)."""
    window = (max_staleness // versions_per_batch + 1) * batch_groups
    return window, int(round(batch_groups * (oversample - 1)))


class RolloutManager:
    def __init__(
        self,
        workers: list[Any],
        data: Any,
        *,
        next_prompt: Callable[[], Prompt],
        new_samples: Callable[[Prompt, int], list[Sample]],
        score: Callable[[list[Sample]], Awaitable[None]],
        params: SamplingParams,
        max_staleness: int,
        batch_groups: int,
        versions_per_batch: int,
        oversample: float,
        group_size: int,
        planned: bool = False,
        request_timeout_s: float | None = None,
    ) -> None:
        self._workers = {w.name: w for w in workers}
        self._request_timeout_s = request_timeout_s
        self._load = {w.name: 0 for w in workers}
        self._data = data
        self._next_prompt, self._new_samples, self._score = next_prompt, new_samples, score
        self._params = params
        self._eta, self._batch_groups = max_staleness, batch_groups
        self._m, self._oversample = versions_per_batch, oversample
        # planned: the DataManager's curriculum sizes (or skips) each prompt's group; else every
        # group has group_size samples and no round trip is spent asking
        self._group_size, self._planned = group_size, planned
        self.trainer_version = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._failure: Exception | None = None  # a request's unexpected error, raised by run()
        self._tasks: dict[asyncio.Task, str] = {}  # request → the worker it went to
        self._busy_since: dict[str, float] = {}  # worker → when its load last left 0
        self.busy_s = 0.0  # Σ over workers of time with at least one request in flight
        self.generated_tokens = 0
        self.lost_workers: list[str] = []  # died since the controller last replaced workers
        self.worker_lost = asyncio.Event()  # set with each name added to lost_workers
        self._parked: list[list[Sample]] = []  # dispatched while no worker was available

    # --- versions and capacity -------------------------------------------------------------
    def set_trainer_version(self, version: int) -> None:
        self.trainer_version = version
        self._wake.set()

    def capacity(self) -> tuple[int, int]:
        return gate_capacity(
            max_staleness=self._eta, versions_per_batch=self._m,
            batch_groups=self._batch_groups, oversample=self._oversample,
        )

    @property
    def in_flight(self) -> int:
        return sum(self._load.values())

    # --- the producer loop -----------------------------------------------------------------
    async def run(self) -> None:
        """Admit and dispatch until `request_stop()`. It stops only between rounds: a round
        takes prompts from the DataManager and the dataset, so cut short it would lose them.
        A stop requested before this task first ran still counts (the flag is reset on exit)."""
        try:
            while not self._stopping:
                await self._round()
        finally:
            self._stopping = False

    async def _round(self) -> None:
        if self._failure is not None:
            raise self._failure
        if not self._workers:  # all lost: wait for a replacement (add_worker wakes us)
            await self._wake.wait()
            self._wake.clear()
            return
        window, extra = self.capacity()
        partials, requeued, free, epoch = await self._data.poll(
            self.trainer_version, window, extra=extra, batch_groups=self._batch_groups)
        for samples in partials:
            self._dispatch(samples)
        prompts = requeued + [self._next_prompt() for _ in range(free)]
        if self._planned and prompts:
            sizes = await self._data.plan(prompts, self.trainer_version)
        else:
            sizes = dict.fromkeys((p.prompt_id for p in prompts), self._group_size)
        groups = [(p, self._new_samples(p, sizes[p.prompt_id]))
                  for p in prompts if p.prompt_id in sizes]
        if groups:
            await self._data.start_groups(groups)
            for _, samples in groups:
                self._dispatch(samples)
        if not (partials or prompts):  # skipped prompts left their slots free: draw again
            await self._wait_for_change(epoch)

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _wait_for_change(self, epoch: int) -> None:
        """Sleep until the buffer changed after `epoch`, the trainer version moved or a worker
        was added (those set `_wake`, which stays set until this wait consumes it)."""
        waiters = [asyncio.create_task(self._data.wait_changed(epoch)),
                   asyncio.create_task(self._wake.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        self._wake.clear()

    def _dispatch(self, samples: list[Sample]) -> None:
        if not self._load:  # the last worker was lost meanwhile: held for its replacement
            self._parked.append(samples)
            return
        name = min(self._load, key=self._load.get)
        if not self._load[name]:
            self._busy_since[name] = time.perf_counter()
        self._load[name] += len(samples)
        task = asyncio.create_task(self._request(name, samples))
        self._tasks[task] = name
        task.add_done_callback(lambda t: self._tasks.pop(t, None))

    def _unload(self, name: str, count: int) -> None:
        if name not in self._load:
            return
        self._load[name] -= count
        if not self._load[name]:
            self.busy_s += time.perf_counter() - self._busy_since.pop(name)

    def busy_time(self) -> float:
        """Σ busy seconds so far, including the current stretch of busy workers."""
        now = time.perf_counter()
        return self.busy_s + sum(now - t for t in self._busy_since.values())

    async def _request(self, name: str, samples: list[Sample]) -> None:
        """Generate, score and store one group's request. A lost worker's samples are
        re-queued; any other error (a bug: retrying would repeat it) stops the producer with
        it, so the run fails at once, naming it, instead of waiting out run.batch_timeout_s."""
        try:
            await self._generate_score_put(name, samples)
        except Exception as exc:
            log.error("a request to %s failed: %s: %s", name, type(exc).__name__, exc)
            self._failure = self._failure or exc
            self._wake.set()

    async def _generate_score_put(self, name: str, samples: list[Sample]) -> None:
        before = sum(len(s.response_ids) for s in samples)
        try:
            worker = self._workers.get(name)
            if worker is None:  # removed (lost) between dispatch and now
                raise WorkerLost(f"{name} left the pool before its request started")
            out = await asyncio.wait_for(worker.generate(samples, self._params),
                                         self._request_timeout_s)
        except (WorkerLost, TimeoutError) as exc:
            # A worker that does not answer in time is handled like a dead one: the controller
            # replaces it (lost_workers), and its samples are generated again elsewhere.
            reason = exc if isinstance(exc, WorkerLost) else (
                f"{name} did not answer a request within rollout.request_timeout_s="
                f"{self._request_timeout_s}s")
            log.warning("%s; re-queueing its %d samples", reason, len(samples))
            self.remove_worker(name)
            self.flag_lost(name)
            await self._data.requeue_lost(samples)
            return
        finally:
            self._unload(name, len(samples))
        self.generated_tokens += sum(len(s.response_ids) for s in out) - before
        await self._score([s for s in out if s.is_finished])
        await self._data.put(out)

    # --- control ---------------------------------------------------------------------------
    async def abort_in_flight(self) -> None:
        """APRIL: interrupt every in-flight request; partials come back through `_request`.
        A worker found dead here is left to `_request`, which re-queues its samples."""
        workers = list(self._workers.items())
        results = await asyncio.gather(*(w.abort(None) for _, w in workers),
                                       return_exceptions=True)
        for (name, _), result in zip(workers, results, strict=True):
            if isinstance(result, WorkerLost):
                log.warning("%s; its requests will be re-queued", result)
                self.flag_lost(name)
            elif isinstance(result, BaseException):
                raise result

    def flag_lost(self, name: str) -> None:
        """`name` died or hung: the controller replaces it (it waits on `worker_lost`)."""
        if name not in self.lost_workers:
            self.lost_workers.append(name)
        self.worker_lost.set()

    def add_worker(self, worker: Any) -> None:
        self._workers[worker.name] = worker
        self._load[worker.name] = 0
        parked, self._parked = self._parked, []
        for samples in parked:
            self._dispatch(samples)
        self._wake.set()

    def remove_worker(self, name: str) -> None:
        self._workers.pop(name, None)
        self._load.pop(name, None)
        if name in self._busy_since:
            self.busy_s += time.perf_counter() - self._busy_since.pop(name)

    async def retire_worker(self, name: str) -> None:
        """Scale down: no more requests to `name`; its in-flight requests are interrupted and
        come back as partials (resumed by other workers). Returns once they are back."""
        worker = self._workers[name]
        requests = [task for task, owner in self._tasks.items() if owner == name]
        self.remove_worker(name)
        with contextlib.suppress(WorkerLost):  # dead already: `_request` re-queues its samples
            await worker.abort(None)
        await asyncio.gather(*requests, return_exceptions=True)

    @property
    def workers(self) -> int:
        return len(self._workers)

    async def drain(self) -> None:
        """Wait for every dispatched request to come back."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
