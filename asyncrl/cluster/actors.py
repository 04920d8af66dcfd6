"""Apply `ray.remote` from outside: actor bodies stay plain Python classes."""

from __future__ import annotations

import inspect
from typing import Any

import ray

from asyncrl.errors import WorkerLost


def spawn(
    cls: type, *args: Any, name: str, num_cpus: float, num_gpus: float = 0,
    resources: dict[str, float] | None = None, scheduling_strategy: Any = None, **kwargs: Any,
) -> ActorRef:
    """Start `cls(*args, **kwargs)` as a named Ray actor on a node that has `num_cpus`,
    `num_gpus` and the custom `resources` (how each pool is steered to its own nodes), or in
    the placement-group bundle `scheduling_strategy` names (asyncrl.cluster.placement)."""
    actor_cls = ray.remote(cls)
    handle = actor_cls.options(name=name, num_cpus=num_cpus, num_gpus=num_gpus,
                               resources=resources or None,
                               scheduling_strategy=scheduling_strategy).remote(*args, **kwargs)
    return ActorRef(handle, name)


def kill_all(refs: list[ActorRef]) -> None:
    for ref in refs:
        ray.kill(ref.handle, no_restart=True)


class ActorRef:
    """Calls a Ray actor's methods as coroutines: `await ref.method(...)`.

    A dead actor surfaces as `WorkerLost`, never as a Ray exception, so actor bodies and
    managers above this layer do not import Ray.
    """

    def __init__(self, handle: Any, name: str) -> None:
        self.handle, self.name = handle, name

    def __getattr__(self, method: str):
        remote = getattr(self.handle, method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await remote.remote(*args, **kwargs)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
                raise WorkerLost(f"{self.name} died: {exc}") from exc

        return call


class LocalRef:
    """The in-process twin of ActorRef (local mode and tests): same calls, no Ray."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def __getattr__(self, method: str):
        target = getattr(self.obj, method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            out = target(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        return call


async def run_in_actor(ref: ActorRef, fn: Any, *args: Any) -> Any:
    """Run a plain function inside an actor's process (e.g. to learn its node's address)."""
    return await ref.handle.__ray_call__.remote(lambda _self, *a: fn(*a), *args)


def node_ip() -> str:
    return ray.util.get_node_ip_address()
