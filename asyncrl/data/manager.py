"""DataManager: the streaming buffer between rollouts and the trainer (an actor body).

    RolloutManager ──put(samples)──► DataManager ──get_batch(n, version)──► trainer loop
          ▲                              │
          └── poll: partials, re-queued prompts, free slots ◄──┘

Backpressure: the DataManager never blocks producers; the RolloutManager's staleness gate reads
`active_groups` and admits no more work than η allows. `get_batch` waits (up to a timeout) until
enough fresh groups are ready. The state machine and the ledger live in `GroupBuffer`.
"""

from __future__ import annotations

import asyncio

from asyncrl.data.buffer import GroupBuffer
from asyncrl.data.curriculum import Curriculum
from asyncrl.types import Group, Prompt, Sample


class DataManager:
    def __init__(
        self, *, group_size: int, max_staleness: int, drop_all_equal: bool,
        curriculum: Curriculum | None = None,
    ) -> None:
        self._buffer = GroupBuffer(
            group_size=group_size, max_staleness=max_staleness, drop_all_equal=drop_all_equal,
            curriculum=curriculum,
        )
        self._changed = asyncio.Condition()
        self._epoch = 0  # bumped on every change, so a waiter never misses one (see wait_changed)

    async def poll(
        self, trainer_version: int, capacity: int, *, extra: int = 0, batch_groups: int = 0
    ) -> tuple[list[list[Sample]], list[Prompt], int, int]:
        """One round trip for the producer: partials to resume (all of them), re-queued prompts
        and the number of fresh groups that fit under `capacity`, and the change epoch.

        `extra` over-provisioned groups (APRIL) are admitted on top only while fewer than
        `batch_groups` groups are ready: they exist to fill the next batch sooner. Once it can
        be filled, the trainer is the bottleneck and extras would only wait until stale."""
        partials = self._buffer.take_partials(trainer_version)
        if self._buffer.ready_groups < batch_groups:
            capacity += extra
        free = capacity - self._buffer.active_groups
        requeued = []
        while len(requeued) < free and (prompt := self._buffer.take_requeued()) is not None:
            requeued.append(prompt)
        return partials, requeued, max(free - len(requeued), 0), self._epoch

    async def plan(self, prompts: list[Prompt], trainer_version: int) -> dict[str, int]:
        """prompt_id → group size for the drawn prompts to start; the others were skipped by
        the curriculum (and accounted as skipped). Without a curriculum: every one, n each."""
        return self._buffer.plan(prompts, trainer_version)

    async def start_groups(self, groups: list[tuple[Prompt, list[Sample]]]) -> None:
        for prompt, samples in groups:
            self._buffer.start_group(prompt, samples)

    async def put(self, samples: list[Sample]) -> None:
        self._buffer.add(samples)
        await self._notify()

    async def requeue_lost(self, samples: list[Sample]) -> None:
        self._buffer.requeue_lost(samples)
        await self._notify()

    async def get_batch(
        self, n_groups: int, trainer_version: int, timeout_s: float | None = None
    ) -> list[Group]:
        """Wait until `n_groups` groups within η of `trainer_version` are ready; FIFO."""
        async def ready() -> list[Group]:
            async with self._changed:
                while (batch := self._buffer.pop_batch(n_groups, trainer_version)) is None:
                    await self._changed.wait()
            await self._notify()  # popping frees gate capacity
            return batch

        return await asyncio.wait_for(ready(), timeout_s)

    async def take_finished_prompts(self) -> list[str]:
        return self._buffer.take_finished_prompts()

    async def release_batch(self, n_groups: int) -> None:
        self._buffer.release_batch(n_groups)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._epoch += 1
            self._changed.notify_all()

    async def wait_changed(self, since_epoch: int) -> int:
        """Return once anything changed after `since_epoch` (at once if it already has)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._epoch > since_epoch)
            return self._epoch

    async def stats(self) -> dict[str, float]:
        b = self._buffer
        curriculum = {} if b.curriculum is None else b.curriculum.summary()
        return {"ready_groups": b.ready_groups, "active_groups": b.active_groups,
                "partial_samples": b.partial_count, **b.ledger(), **b.prompt_counts(),
                **curriculum}

    async def ledger_entries(self) -> list[dict]:
        """A row per prompt: its fate and its sample ids' (pending, trained@V, dropped:R)."""
        return self._buffer.ledger_entries()

    async def fate_counts(self) -> dict[str, int]:
        return self._buffer.fate_counts()

    async def state_dict(self) -> dict:
        return self._buffer.state_dict()

    async def load_state_dict(self, state: dict) -> None:
        self._buffer.load_state_dict(state)
