"""DataManager: the streaming buffer between rollouts and the trainer (an actor body).

    RolloutManager ──put(samples)──► DataManager ──get_batch(n, version)──► trainer loop
          ▲                              │
          └──── take_partials / take_requeued (resumed first) ◄──┘

Backpressure: the DataManager never blocks producers; the RolloutManager's staleness gate reads
`active_groups` and admits no more work than η allows. `get_batch` waits (up to a timeout) until
enough fresh groups are ready. The state machine and the ledger live in `GroupBuffer`.
"""

from __future__ import annotations

import asyncio

from asyncrl.data.buffer import GroupBuffer
from asyncrl.types import Group, Prompt, Sample


class DataManager:
    def __init__(self, *, group_size: int, max_staleness: int, drop_all_equal: bool) -> None:
        self._buffer = GroupBuffer(
            group_size=group_size, max_staleness=max_staleness, drop_all_equal=drop_all_equal
        )
        self._changed = asyncio.Condition()

    async def start_group(self, prompt: Prompt, samples: list[Sample]) -> None:
        self._buffer.start_group(prompt, samples)

    async def put(self, samples: list[Sample]) -> None:
        self._buffer.add(samples)
        await self._notify()

    async def requeue_lost(self, samples: list[Sample]) -> None:
        self._buffer.requeue_lost(samples)
        await self._notify()

    async def take_partials(self, trainer_version: int) -> list[list[Sample]]:
        return self._buffer.take_partials(trainer_version)

    async def take_requeued(self) -> Prompt | None:
        return self._buffer.take_requeued()

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

    async def release_batch(self, n_groups: int) -> None:
        self._buffer.release_batch(n_groups)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_changed(self) -> None:
        async with self._changed:
            await self._changed.wait()

    async def stats(self) -> dict[str, int]:
        b = self._buffer
        return {"ready_groups": b.ready_groups, "active_groups": b.active_groups,
                "partial_samples": b.partial_count, **b.ledger()}

    async def state_dict(self) -> dict:
        return self._buffer.state_dict()

    async def load_state_dict(self, state: dict) -> None:
        self._buffer.load_state_dict(state)
