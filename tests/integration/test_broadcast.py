"""WeightBroadcast over real gloo groups between real processes."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from asyncrl.sync.broadcast import WeightBroadcast, WeightSyncTimeout

SMALL_BUCKET = 256  # bytes: forces several buckets


def _weights(scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(int(scale * 10))
    return {
        "embed.weight": torch.randn(16, 8, generator=g) * scale,
        "layer.0.w": torch.randn(8, 8, generator=g).bfloat16(),
        "layer.0.b": torch.randn(8, generator=g),
        "steps": torch.tensor([3, 1 << 40]),
    }


def _receiver(rank: int, world: int, port: int, sends: int, out: mp.Queue, group: str) -> None:
    bc = WeightBroadcast(rank=rank, world_size=world, host="127.0.0.1", port=port,
                         bucket_bytes=SMALL_BUCKET, timeout_s=30, group_name=group)
    for _ in range(sends):
        named, version = bc.receive()
        out.put((rank, version, {name: t.clone() for name, t in named}))
    bc.close()


def _start_receivers(world: int, port: int, sends: int, group: str):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(r, world, port, sends, queue, group))
             for r in range(1, world)]
    for p in procs:
        p.start()
    return procs, queue


def _stop(procs) -> None:
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.terminate()
            p.join()


def _assert_same(received: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
    assert received.keys() == sent.keys()
    for name, tensor in sent.items():
        assert received[name].dtype == tensor.dtype
        assert torch.equal(received[name], tensor), name


def test_every_receiver_gets_bit_identical_weights_and_the_version_across_sends():
    port = WeightBroadcast.free_port()
    procs, queue = _start_receivers(world=3, port=port, sends=2, group="w0")
    try:
        sender = WeightBroadcast(rank=0, world_size=3, host="127.0.0.1", port=port,
                                 bucket_bytes=SMALL_BUCKET, timeout_s=30, group_name="w0")
        first, second = _weights(1.0), _weights(2.0)
        stats = sender.send(first.items(), policy_version=5)
        assert stats.buckets > 3 and stats.bytes == sum(
            t.numel() * t.element_size() for t in first.values())
        sender.send(second.items(), policy_version=6)
        got = [queue.get(timeout=30) for _ in range(4)]
        for _, version, named in got:
            _assert_same(named, first if version == 5 else second)
        assert sorted((r, v) for r, v, _ in got) == [(1, 5), (1, 6), (2, 5), (2, 6)]
        sender.close()
    finally:
        _stop(procs)


def test_a_new_group_hands_a_late_joiner_the_current_weights():
    # Group 1: sender + one worker. Then a second worker arrives: a new group of all three.
    port1, port2 = WeightBroadcast.free_port(), WeightBroadcast.free_port()
    procs, queue = _start_receivers(world=2, port=port1, sends=1, group="g1")
    try:
        sender = WeightBroadcast(rank=0, world_size=2, host="127.0.0.1", port=port1,
                                 bucket_bytes=SMALL_BUCKET, timeout_s=30, group_name="g1")
        sender.send(_weights(1.0).items(), policy_version=1)
        assert queue.get(timeout=30)[1] == 1
        sender.close()
        _stop(procs)
        procs, queue = _start_receivers(world=3, port=port2, sends=1, group="g2")
        sender = WeightBroadcast(rank=0, world_size=3, host="127.0.0.1", port=port2,
                                 bucket_bytes=SMALL_BUCKET, timeout_s=30, group_name="g2")
        current = _weights(3.0)
        sender.send(current.items(), policy_version=2)
        for _ in range(2):
            _, version, named = queue.get(timeout=30)
            assert version == 2
            _assert_same(named, current)
        sender.close()
    finally:
        _stop(procs)


def _silent_sender(port: int) -> None:
    WeightBroadcast(rank=0, world_size=2, host="127.0.0.1", port=port, timeout_s=10,
                    group_name="quiet")
    time.sleep(8)  # joins the group, never sends


def test_a_receiver_whose_sender_never_sends_times_out_with_a_clear_error():
    port = WeightBroadcast.free_port()
    proc = mp.get_context("spawn").Process(target=_silent_sender, args=(port,))
    proc.start()
    try:
        receiver = WeightBroadcast(rank=1, world_size=2, host="127.0.0.1", port=port,
                                   timeout_s=2, group_name="quiet")
        start = time.monotonic()
        with pytest.raises(WeightSyncTimeout, match="rank 1 of 2.*sync.timeout_s"):
            receiver.receive()
        assert time.monotonic() - start < 10
    finally:
        proc.terminate()
        proc.join()
