"""Bucket planning (hand-checked plans) and bit-exact pack/unpack."""

from __future__ import annotations

import pytest
import torch

from asyncrl.sync.buckets import Bucket, TensorMeta, pack, plan_buckets, unpack


def _metas() -> list[TensorMeta]:
    return [
        TensorMeta("a", (4, 4), "float32"),  # 64 bytes
        TensorMeta("b", (8,), "bfloat16"),  # 16 bytes
        TensorMeta("c", (8,), "float32"),  # 32 bytes
        TensorMeta("d", (40,), "float32"),  # 160 bytes: larger than the bucket
        TensorMeta("e", (2,), "float32"),  # 8 bytes
        TensorMeta("f", (3,), "int64"),  # 24 bytes
    ]


def _layout(plan: list[Bucket]) -> list[tuple[str, list[str], int]]:
    return [(b.dtype, [m.name for m in b.metas], b.nbytes) for b in plan]


def test_tensor_meta_records_shape_dtype_and_size_in_bytes():
    meta = TensorMeta.of("w", torch.zeros(3, 5, dtype=torch.bfloat16))
    assert meta == TensorMeta("w", (3, 5), "bfloat16")
    assert (meta.numel, meta.nbytes, meta.torch_dtype) == (15, 30, torch.bfloat16)


def test_plan_keeps_order_separates_dtypes_and_isolates_oversize_tensors():
    # bucket 100 B: a + c = 96 B fit; d (160 B) closes it and is alone; e opens a new one.
    plan = plan_buckets(_metas(), bucket_bytes=100)
    assert _layout(plan) == [
        ("float32", ["a", "c"], 96),
        ("float32", ["d"], 160),
        ("float32", ["e"], 8),  # still-open buckets close in order of their dtype's first use
        ("bfloat16", ["b"], 16),
        ("int64", ["f"], 24),
    ]


def test_a_bucket_filled_exactly_to_its_size_is_not_split():
    metas = [TensorMeta("x", (10,), "float32"), TensorMeta("y", (15,), "float32"),
             TensorMeta("z", (1,), "float32")]
    plan = plan_buckets(metas, bucket_bytes=100)  # 40 + 60 = 100 ≤ 100; z starts a new one
    assert _layout(plan) == [("float32", ["x", "y"], 100), ("float32", ["z"], 4)]


def test_one_bucket_per_dtype_when_everything_fits():
    plan = plan_buckets(_metas(), bucket_bytes=1 << 20)
    assert _layout(plan) == [("float32", ["a", "c", "d", "e"], 264), ("bfloat16", ["b"], 16),
                             ("int64", ["f"], 24)]
    assert plan[0].numel == 16 + 8 + 40 + 2


def test_plan_rejects_a_non_positive_bucket_size():
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        plan_buckets(_metas(), bucket_bytes=0)


def test_pack_lays_tensors_end_to_end_in_plan_order():
    tensors = {"p": torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t(),  # non-contiguous: [[1,3],[2,4]]
               "q": torch.tensor([5.0])}
    (bucket,) = plan_buckets([TensorMeta.of(n, t) for n, t in tensors.items()], 1 << 10)
    out = bucket.empty()
    assert pack(bucket, tensors, out) is out
    assert out.tolist() == [1.0, 3.0, 2.0, 4.0, 5.0]
    assert torch.equal(pack(bucket, tensors), out)  # allocates when no buffer is given


def test_pack_unpack_round_trip_is_bit_exact_for_fp32_bf16_int64():
    torch.manual_seed(0)
    tensors = {
        "a": torch.randn(4, 4), "b": torch.randn(8).bfloat16(), "c": torch.randn(8),
        "d": torch.randn(40), "e": torch.tensor([float("inf"), -0.0]),
        "f": torch.tensor([1, -2, 2**40]),
    }
    metas = [TensorMeta.of(name, t) for name, t in tensors.items()]
    seen = []
    for bucket in plan_buckets(metas, bucket_bytes=100):
        flat = pack(bucket, tensors)
        for name, view in unpack(bucket, flat):
            assert view.dtype == tensors[name].dtype and view.shape == tensors[name].shape
            assert torch.equal(_bits(view), _bits(tensors[name]))
            # a view into the bucket, not a copy
            assert view.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
            seen.append(name)
    assert sorted(seen) == list("abcdef")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.reshape(-1).view(torch.uint8)
