"""WeightBroadcast: trainer rank 0 sends its weights to rollout workers (ranks 1..N).

Protocol, over one TCPStore (hosted by rank 0) and one process group:
- Each send has a sequence number s. Rank 0 writes `send/s` = (metadata generation, policy
  version) to the store, then broadcasts the buckets. Receivers read `send/s` (waiting for it),
  so every rank must call send/receive the same number of times, in the same order.
- The metadata table (names, shapes, dtypes → bucket plan) is written once per generation under
  `meta/g`, and again only when it changes; receivers fetch it only on a new generation.
- Tensors travel in flat buckets of `bucket_bytes`, one collective each; buffers are allocated
  once per generation and reused.

The group is a side channel: it never touches torch.distributed's default group, which a vLLM
worker (or a trainer's own data-parallel setup) already owns. Its world size is fixed, so a
worker that joins later gets a new group (new port and name) formed with every current member;
the first send on it hands the newcomer the current weights before its first request.

Every wait is bounded by `timeout_s`; a timeout raises WeightSyncTimeout naming the group.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from asyncrl.errors import AsyncrlError
from asyncrl.sync.buckets import Bucket, TensorMeta, pack, plan_buckets, unpack


class WeightSyncTimeout(AsyncrlError):
    """A weight sync waited longer than its timeout (a peer died or never joined)."""


@dataclass(frozen=True)
class SendStats:
    bytes: int
    seconds: float
    buckets: int


class WeightBroadcast:
    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        backend: str = "auto",
        device: str = "cpu",
        bucket_bytes: int = 64 << 20,
        timeout_s: float = 120.0,
        group_name: str = "weights",
    ) -> None:
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        self._device = torch.device(device)
        self._bucket_bytes, self._timeout_s = bucket_bytes, timeout_s
        if backend == "auto":
            backend = "nccl" if self._device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        with self._bounded("joining the group"):
            self._store = dist.TCPStore(host, port, world_size, is_master=rank == 0,
                                        timeout=timeout)
            prefixed = dist.PrefixStore(group_name, self._store)
            if backend == "gloo":
                self._pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
            elif backend == "nccl":
                self._pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
            else:
                raise ValueError(f"unknown weight sync backend {backend!r}; use gloo or nccl")
        self._seq = 0
        self._generation = 0
        self._metas: list[TensorMeta] = []
        self._plan: list[Bucket] = []
        self._buffers: list[torch.Tensor] = []

    @staticmethod
    def free_port(host: str = "127.0.0.1") -> int:
        with socket.socket() as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    @contextlib.contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            raise WeightSyncTimeout(
                f"weight sync group {self.group_name!r} (rank {self.rank} of {self.world_size}) "
                f"failed or timed out after {self._timeout_s}s while {what}: a peer died or "
                f"never joined ({exc}). Raise sync.timeout_s if the model is large or peers slow"
            ) from exc

    def _set_plan(self, metas: list[TensorMeta]) -> None:
        self._metas, self._plan = metas, plan_buckets(metas, self._bucket_bytes)
        self._buffers = [b.empty(self._device) for b in self._plan]

    def send(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int
    ) -> SendStats:
        """Rank 0: broadcast these tensors stamped with `policy_version`."""
        assert self.rank == 0, "only rank 0 sends"
        start = time.perf_counter()
        tensors = dict(named_tensors)
        metas = [TensorMeta.of(name, t) for name, t in tensors.items()]
        self._seq += 1
        with self._bounded("sending weights"):
            if metas != self._metas:
                self._generation += 1
                self._set_plan(metas)
                table = pickle.dumps((metas, self._bucket_bytes))
                self._store.set(f"meta/{self._generation}", table)
            self._store.set(f"send/{self._seq}", pickle.dumps((self._generation, policy_version)))
            for bucket, buffer in zip(self._plan, self._buffers, strict=True):
                pack(bucket, tensors, buffer)
                self._pg.broadcast(buffer, 0).wait(timedelta(seconds=self._timeout_s))
        nbytes = sum(b.numel() * b.element_size() for b in self._buffers)
        return SendStats(nbytes, time.perf_counter() - start, len(self._plan))

    def receive(self) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """Ranks ≥ 1: the next send's tensors (views into reused buffers: copy them before the
        next receive) and its policy version."""
        assert self.rank > 0, "rank 0 sends"
        self._seq += 1
        with self._bounded("receiving weights"):
            generation, version = pickle.loads(self._store.get(f"send/{self._seq}"))
            if generation != self._generation:
                metas, self._bucket_bytes = pickle.loads(self._store.get(f"meta/{generation}"))
                self._generation = generation
                self._set_plan(metas)
            named: list[tuple[str, torch.Tensor]] = []
            for bucket, buffer in zip(self._plan, self._buffers, strict=True):
                self._pg.broadcast(buffer, 0).wait(timedelta(seconds=self._timeout_s))
                named.extend(unpack(bucket, buffer))
        return named, version

    def close(self) -> None:
        self._pg = None
        self._store = None
