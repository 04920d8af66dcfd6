"""WeightBroadcast: the trainer (rank 0) sends its weights to rollout workers (ranks 1..N).

Protocol, over one TCPStore (hosted by rank 0) and one process group, per send number s:
1. Metadata once. The table of names, shapes and dtypes, with its bucket plan, is pickled under
   `meta/<g>` for a generation g, and again (g + 1) only when names, shapes or dtypes change.
2. Version stamp. Rank 0 writes `send/<s>` = (g, policy_version). A receiver waits for that key,
   fetches `meta/<g>` only when g is new to it, and (re)allocates its bucket buffers then.
3. Buckets. Each flat bucket is one `broadcast` from rank 0, in plan order. All are issued before
   any is waited on, so gloo streams them back to back; the sender packs the next bucket while
   the previous one is on the wire (two staging buffers), and a bucket whose tensors already
   lie end to end in one storage (a lone contiguous tensor, or flat parameters) goes out with
   no copy at all. Receivers keep one buffer per bucket across sends and return views into it,
   in the sender's order: no unpack copy.
So every rank must call `send` / `receive` the same number of times, in the same order.

Why a side-channel group: a vLLM worker (and a trainer's own data-parallel setup) already owns
torch.distributed's default group, so this one is built from its own TCPStore + PrefixStore and
a `ProcessGroupGloo` / `ProcessGroupNCCL` object, and never calls `init_process_group`.

Late joiners: a group's world size is fixed. When a worker joins a running job the controller
forms a NEW group (new port and `group_name`) of the trainer and every current worker, closing
the old one; the first send on it hands the newcomer the current weights before its first
request. Successive groups in the same processes are independent.

Every store wait and collective is bounded by `timeout_s`; running past it (or losing a peer)
raises `WeightSyncTimeout` naming the rank, the world size, the group and the knob to raise.
"""

from __future__ import annotations

import contextlib
import pickle
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

from asyncrl.errors import AsyncrlError
from asyncrl.sync.buckets import Bucket, TensorMeta, pack, plan_buckets, unpack


class WeightSyncTimeout(AsyncrlError):
    """A weight sync step waited longer than `timeout_s` (a peer died, hung or never joined)."""


@dataclass(frozen=True, slots=True)
class SendStats:
    bytes: int
    """Payload bytes broadcast (the sum of the tensors' sizes)."""
    seconds: float
    """Wall time of the whole send, metadata and packing included."""
    buckets: int
    """Number of collectives (flat buckets) used."""


class WeightBroadcast:
    """One member of a weight-sync group: rank 0 sends, ranks 1..world_size-1 receive.

    Construction blocks until every rank of the group has constructed its member (bounded by
    `timeout_s`). Not thread-safe: one send or receive at a time per member.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        host: str,
        port: int,
        backend: Literal["gloo", "nccl", "auto"] = "auto",
        device: str | torch.device = "cpu",
        bucket_bytes: int = 64 << 20,
        timeout_s: float = 120.0,
        group_name: str = "weights",
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}) (got {rank})")
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive (got {bucket_bytes})")
        self.rank, self.world_size, self.group_name = rank, world_size, group_name
        self._device = torch.device(device)
        if self._device.type == "cuda" and self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        if backend == "auto":
            backend = "nccl" if self._device.type == "cuda" else "gloo"
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"unknown weight sync backend {backend!r}: use gloo, nccl or auto")
        if backend == "nccl" and (self._device.type != "cuda" or not dist.is_nccl_available()):
            raise ValueError(f"weight sync backend 'nccl' needs a CUDA device and a CUDA build "
                             f"of torch (device {self._device}): use backend gloo or auto")
        self.backend = backend
        self._bucket_bytes, self._timeout_s = bucket_bytes, timeout_s
        self._timeout = timedelta(seconds=timeout_s)
        with self._bounded("joining the group"):
            self._store = dist.TCPStore(host, port, world_size, is_master=rank == 0,
                                        timeout=self._timeout)
            self._pg = self._new_group(dist.PrefixStore(f"{group_name}/pg", self._store))
        self._seq = 0  # sends so far; the same on every rank
        self._generation = 0
        self._metas: list[TensorMeta] = []
        self._plan: list[Bucket] = []
        self._buffers: list[torch.Tensor] = []  # receiver: one per bucket; sender: two staging
        self._views: list[tuple[str, torch.Tensor]] = []  # receiver: (name, view into buffers)
        self._staging_bytes = 0

    def _new_group(self, store: dist.Store) -> dist.ProcessGroup:
        if self.backend == "gloo":
            return dist.ProcessGroupGloo(store, self.rank, self.world_size, self._timeout)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = self._timeout
        return dist.ProcessGroupNCCL(store, self.rank, self.world_size, options)

    @staticmethod
    def free_port(host: str = "127.0.0.1") -> int:
        """A port free on `host` now (the OS's pick); rank 0 binds it when the group forms."""
        with socket.socket() as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    @contextlib.contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        # gloo reports a timeout or a dead peer as a bare RuntimeError, the store as DistError;
        # only store and collective calls run inside this block, so nothing else is caught.
        try:
            yield
        except RuntimeError as exc:
            raise WeightSyncTimeout(
                f"weight sync group {self.group_name!r} (rank {self.rank} of world size "
                f"{self.world_size}, {self.backend}) gave up while {what}: no progress within "
                f"timeout_s={self._timeout_s}s, or a peer died ({str(exc).splitlines()[0]}). "
                "Check that every rank calls send/receive equally often; raise sync.timeout_s "
                "if the model is large or peers are slow"
            ) from exc

    def _wait(self, work: dist.Work, what: str) -> None:
        with self._bounded(what):
            work.wait(self._timeout)

    def _key(self, kind: str, n: int) -> str:
        return f"{self.group_name}/{kind}/{n}"

    def send(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int
    ) -> SendStats:
        """Rank 0: broadcast these tensors, stamped with `policy_version`, to every receiver.

        Args:
            named_tensors: (name, tensor) pairs, on `device`; the order fixes the bucket plan.
            policy_version: the version the receivers will report holding.

        Raises:
            WeightSyncTimeout: a receiver did not take part within `timeout_s`.
        """
        self._check_usable(sender=True)
        start = time.perf_counter()
        pairs = [(name, t.detach()) for name, t in named_tensors]
        tensors = dict(pairs)
        if len(tensors) != len(pairs):
            seen = [name for name, _ in pairs]
            raise ValueError(f"send: duplicate tensor names "
                             f"{sorted({n for n in seen if seen.count(n) > 1})}")
        metas = [TensorMeta.of(name, t) for name, t in tensors.items()]
        self._seq += 1
        if metas != self._metas:
            self._generation += 1
            self._metas = metas
            self._set_plan(plan_buckets(metas, self._bucket_bytes), staging=True)
            with self._bounded("publishing the metadata table"):
                table = pickle.dumps((metas, self._plan))
                self._store.set(self._key("meta", self._generation), table)
        with self._bounded("stamping the version"):
            self._store.set(self._key("send", self._seq),
                            pickle.dumps((self._generation, policy_version)))
        works: list[dist.Work] = []
        slot_work: list[dist.Work | None] = [None, None]  # the last broadcast out of each slot
        packed = 0
        what = f"sending the buckets of send #{self._seq}"
        for bucket in self._plan:
            flat = self._in_place(bucket, tensors)
            slot = packed % 2 if flat is None else None
            if slot is not None:
                # Gloo can finish broadcasts out of order (two worker threads): wait for the
                # very broadcast that last read this staging slot before overwriting it.
                if slot_work[slot] is not None:
                    self._wait(slot_work[slot], what)
                flat = pack(bucket, tensors, self._staging(slot, bucket))
                packed += 1
            with self._bounded(what):
                works.append(self._pg.broadcast(flat, 0))
            if slot is not None:
                slot_work[slot] = works[-1]
        for work in works:
            self._wait(work, what)
        if self._device.type == "cuda":  # nccl's wait only orders streams: time the transfer
            torch.cuda.current_stream(self._device).synchronize()
        nbytes = sum(b.nbytes for b in self._plan)
        return SendStats(nbytes, time.perf_counter() - start, len(self._plan))

    def receive(self) -> tuple[list[tuple[str, torch.Tensor]], int]:
        """Ranks >= 1: wait for the next send and return its tensors and policy version.

        Returns:
            (name, tensor) pairs in the sender's order, and the policy version. The tensors are
            views into buffers reused by the next `receive`: load or copy them before calling it.

        Raises:
            WeightSyncTimeout: no send arrived, or it did not complete, within `timeout_s`.
        """
        self._check_usable(sender=False)
        self._seq += 1
        with self._bounded(f"waiting for send #{self._seq}"):
            generation, version = pickle.loads(self._store.get(self._key("send", self._seq)))
            if generation != self._generation:
                self._metas, plan = pickle.loads(self._store.get(self._key("meta", generation)))
                self._generation = generation
                self._set_plan(plan, staging=False)
        what = f"receiving the buckets of send #{self._seq}"
        with self._bounded(what):
            works = [self._pg.broadcast(buffer, 0) for buffer in self._buffers]
        for work in works:
            self._wait(work, what)
        return list(self._views), version

    def close(self) -> None:
        """Release the group and (on rank 0) the store; the member cannot be used afterwards."""
        pg, self._pg, self._store, self._buffers = self._pg, None, None, []
        if pg is not None:
            with contextlib.suppress(RuntimeError):  # a backend without shutdown support
                pg.shutdown()

    def _check_usable(self, *, sender: bool) -> None:
        if self._pg is None:
            raise RuntimeError(f"weight sync group {self.group_name!r} is closed")
        if sender != (self.rank == 0):
            raise RuntimeError(f"rank {self.rank} of weight sync group {self.group_name!r} "
                               f"cannot {'send' if sender else 'receive'}: rank 0 sends, "
                               "ranks >= 1 receive")

    def _set_plan(self, plan: list[Bucket], *, staging: bool) -> None:
        self._plan = plan
        if staging:  # two byte buffers as large as the largest bucket, made on first use
            self._staging_bytes = max((b.nbytes for b in plan if len(b.metas) > 1), default=0)
            self._buffers = []
        else:  # the views stay valid as long as the buffers: build them once per generation
            self._buffers = [b.empty(self._device) for b in self._plan]
            views = dict(nv for b, buf in zip(plan, self._buffers, strict=True)
                         for nv in unpack(b, buf))
            self._views = [(m.name, views[m.name]) for m in self._metas]  # the sender's order

    def _staging(self, slot: int, bucket: Bucket) -> torch.Tensor:
        if bucket.nbytes > self._staging_bytes:
            return bucket.empty(self._device)  # a lone non-contiguous tensor: rare, one-off
        if not self._buffers:
            self._buffers = [torch.empty(self._staging_bytes, dtype=torch.uint8,
                                         device=self._device) for _ in range(2)]
        return self._buffers[slot][: bucket.nbytes].view(getattr(torch, bucket.dtype))

    def _in_place(self, bucket: Bucket, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A flat view of the bucket when its tensors already lie end to end in one storage
        (a lone contiguous tensor, or a trainer that keeps its weights in flat buffers): it is
        broadcast with no packing copy. None when the bucket has to be packed."""
        first = tensors[bucket.metas[0].name]
        if first.device != self._device:
            return None
        storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
        for meta in bucket.metas:
            t = tensors[meta.name]
            if (not t.is_contiguous() or t.storage_offset() != offset
                    or t.untyped_storage().data_ptr() != storage):
                return None
            offset += meta.numel
        return first.as_strided((bucket.numel,), (1,))
