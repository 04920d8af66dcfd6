"""Bucket planning and bit-exact pack/unpack."""

from __future__ import annotations

import torch

from asyncrl.sync.buckets import TensorMeta, pack, plan_buckets, unpack


def _metas():
    return [
        TensorMeta("a", (4, 4), "float32"),   # 64 bytes
        TensorMeta("b", (8,), "bfloat16"),    # 16 bytes
        TensorMeta("c", (8,), "float32"),     # 32 bytes
        TensorMeta("d", (40,), "float32"),    # 160 bytes: larger than the bucket
        TensorMeta("e", (2,), "float32"),     # 8 bytes
        TensorMeta("f", (3,), "int64"),       # 24 bytes
    ]


def test_plan_keeps_order_separates_dtypes_and_isolates_oversize_tensors():
    plan = plan_buckets(_metas(), bucket_bytes=100)
    assert [(b.dtype, [m.name for m in b.metas]) for b in plan] == [
        ("float32", ["a", "c"]),  # 64 + 32 = 96 ≤ 100
        ("float32", ["d"]),  # oversize: alone
        ("float32", ["e"]),  # open buckets close in order of their dtype's first appearance
        ("bfloat16", ["b"]),
        ("int64", ["f"]),
    ]
    assert sum(len(b.metas) for b in plan) == 6


def test_one_big_bucket_per_dtype_when_everything_fits():
    plan = plan_buckets(_metas(), bucket_bytes=1 << 20)
    assert [(b.dtype, [m.name for m in b.metas]) for b in plan] == [
        ("float32", ["a", "c", "d", "e"]), ("bfloat16", ["b"]), ("int64", ["f"])]
    assert plan[0].numel == 16 + 8 + 40 + 2


def test_pack_unpack_round_trip_is_bit_exact():
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(4, 4), "b": torch.randn(8).bfloat16(), "c": torch.randn(8),
        "d": torch.randn(40), "e": torch.tensor([float("inf"), -0.0]),
        "f": torch.tensor([1, -2, 2**40]),
    }
    metas = [TensorMeta.of(name, t) for name, t in tensors.items()]
    for bucket in plan_buckets(metas, bucket_bytes=100):
        flat = pack(bucket, tensors, bucket.empty())
        for name, view in unpack(bucket, flat):
            assert view.dtype == tensors[name].dtype and view.shape == tensors[name].shape
            assert torch.equal(_bits(view), _bits(tensors[name]))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.reshape(-1).view(torch.uint8)
