"""Placement groups: a pool's workers reserved together, one bundle per worker.

`rollout.placement` / `reward.placement` = PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (Ray's
strategies) reserves the whole pool before any of its workers starts: the pool either gets all
of its resources, laid out as asked (e.g. STRICT_SPREAD: one rollout worker per node), or the
job stops with an error naming the field — never a half-started pool that waits forever.

A bundle belongs to a worker by name. A replaced worker's bundle goes to its successor; a
worker added while the run goes on (elastic scaling) gets a new bundle in a placement group of
its own (same strategy, so SPREAD/PACK hold within each reservation, not across them); a
removed worker's bundle stays reserved for the next one, and everything is released at close.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from asyncrl.errors import AsyncrlError


class PoolPlacement:
    def __init__(self, field: str, bundle: dict[str, float], strategy: str, *,
                 name: str, ready_timeout_s: float) -> None:
        self._field, self._bundle, self._strategy = field, bundle, strategy
        self._name, self._timeout_s = name, ready_timeout_s
        self._groups: list[PlacementGroup] = []
        self._free: list[tuple[PlacementGroup, int]] = []
        self._held: dict[str, tuple[PlacementGroup, int]] = {}  # worker name → its bundle

    async def reserve(self, count: int, timeout_s: float | None = None) -> None:
        """Make sure `count` bundles are free, reserving the missing ones as one group, within
        `timeout_s` (default run.placement_timeout_s)."""
        missing = count - len(self._free)
        if missing <= 0:
            return
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        group = placement_group([dict(self._bundle)] * missing, strategy=self._strategy,
                                name=f"{self._name}-{len(self._groups)}")
        try:
            await asyncio.wait_for(group.ready(), timeout_s)
        except TimeoutError:
            remove_placement_group(group)
            raise AsyncrlError(
                f"{self._field}={self._strategy}: {missing} bundle(s) of {self._bundle} could "
                f"not be placed within {timeout_s:g}s (run.placement_timeout_s); the cluster "
                f"has {ray.available_resources()} free. Add nodes, lower the pool's resources, "
                f"or use a looser strategy (PACK/SPREAD place on one node if they must)"
            ) from None
        self._groups.append(group)
        self._free += [(group, index) for index in range(missing)]

    def take(self, worker_name: str) -> PlacementGroupSchedulingStrategy:
        """The scheduling strategy of a new worker: a free bundle (call `reserve` first)."""
        if not self._free:
            raise AsyncrlError(f"{self._field}: no free bundle for {worker_name}")
        group, index = self._held[worker_name] = self._free.pop(0)
        return PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=index,
            placement_group_capture_child_tasks=True)

    def release(self, worker_name: str) -> None:
        """The worker is gone (killed or retired): its bundle is free for the next one."""
        if worker_name in self._held:
            self._free.append(self._held.pop(worker_name))

    def close(self) -> None:
        for group in self._groups:
            remove_placement_group(group)
        self._groups, self._free, self._held = [], [], {}

    @property
    def bundles(self) -> int:
        return len(self._free) + len(self._held)


def bundle_of(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """A worker's resources as a bundle (Ray's keys; zero amounts left out)."""
    bundle = {"CPU": num_cpus, "GPU": num_gpus, **resources}
    return {key: value for key, value in bundle.items() if value}


def current_placement_group() -> str | None:
    """The id of the placement group this process runs in (None: none)."""
    return ray.get_runtime_context().get_placement_group_id()
