"""Plan flat buckets for a named set of tensors; pack into and unpack out of them (pure torch).

Sending a model as a few large flat buffers instead of hundreds of small tensors pays the
per-collective latency once per bucket instead of once per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorMeta:
        return cls(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True, slots=True)
class Bucket:
    dtype: str
    metas: tuple[TensorMeta, ...]

    @property
    def numel(self) -> int:
        return sum(m.numel for m in self.metas)

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.empty(self.numel, dtype=getattr(torch, self.dtype), device=device)


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Group tensors of one dtype, in order, into buckets of at most `bucket_bytes` each.

    A tensor larger than the bucket size gets a bucket of its own. Buckets of different dtypes
    are emitted in the order their dtype first appears.
    """
    open_buckets: dict[str, list[TensorMeta]] = {}
    open_bytes: dict[str, int] = {}
    done: list[Bucket] = []
    for meta in metas:
        size = meta.numel * meta.torch_dtype.itemsize
        current = open_buckets.setdefault(meta.dtype, [])
        if current and open_bytes[meta.dtype] + size > bucket_bytes:
            done.append(Bucket(meta.dtype, tuple(current)))
            current = open_buckets[meta.dtype] = []
        current.append(meta)
        open_bytes[meta.dtype] = (open_bytes.get(meta.dtype, 0) if len(current) > 1 else 0) + size
    done.extend(Bucket(dtype, tuple(ms)) for dtype, ms in open_buckets.items() if ms)
    return done


def pack(bucket: Bucket, tensors: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Copy the bucket's tensors, flattened and in order, into `out` (its preallocated buffer)."""
    offset = 0
    for meta in bucket.metas:
        out[offset : offset + meta.numel].copy_(tensors[meta.name].reshape(-1))
        offset += meta.numel
    return out


def unpack(bucket: Bucket, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views into `flat` with each tensor's shape (valid while `flat` is not overwritten)."""
    out, offset = [], 0
    for meta in bucket.metas:
        out.append((meta.name, flat[offset : offset + meta.numel].view(meta.shape)))
        offset += meta.numel
    return out
