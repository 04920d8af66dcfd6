"""RolloutManager + DataManager + a real CPU rollout worker in one event loop (LocalRef, no
Ray): the staleness gate's capacity, partials resumed first, nothing lost."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from asyncrl.cluster.actors import LocalRef
from asyncrl.controller.pools import new_samples
from asyncrl.data.manager import DataManager
from asyncrl.rollout.manager import RolloutManager, gate_capacity
from asyncrl.rollout.worker import RolloutWorker
from asyncrl.types import FinishReason, Prompt, Reward, Sample, SamplingParams
from tests.helpers import save_tiny_model

B, N = 2, 3  # groups per batch, samples per group


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_gate_capacity_formula():
    def gate(eta: int, m: int, oversample: float = 1.0) -> tuple[int, int]:
        return gate_capacity(max_staleness=eta, versions_per_batch=m, batch_groups=4,
                             oversample=oversample)

    assert gate(0, 1) == (4, 0)
    assert gate(2, 1) == (12, 0)
    assert gate(2, 2, oversample=1.5) == (8, 2)  # the extra groups once, not per batch
    assert gate(1, 2) == (4, 0)


async def test_extra_groups_are_admitted_only_while_the_next_batch_is_not_ready():
    data = DataManager(group_size=2, max_staleness=1, drop_all_equal=False)
    prompts = [Prompt(prompt_id=f"p{i}", text="x", input_ids=[1]) for i in range(6)]
    groups = [(p, new_samples(p, 2, 4)) for p in prompts]
    _, _, free, _ = await data.poll(0, 4, extra=2, batch_groups=2)
    assert free == 6  # nothing ready: window 4 + 2 extra
    await data.start_groups(groups)
    for i, (_, samples) in enumerate(groups[:2]):  # two groups finish: a batch is ready
        for s in samples:
            s.append(5, -0.1, 0)
            s.finish_reason = FinishReason.STOP
            s.reward = Reward(value=float(i))
        await data.put(samples)
    _, _, free, _ = await data.poll(0, 4, extra=2, batch_groups=2)
    assert free == 0  # 6 active, window 4: the extras stop while a batch waits for the trainer
    _, _, free, _ = await data.poll(0, 8, extra=2, batch_groups=2)
    assert free == 2


def _manager(model_dir, eta: int, **kwargs) -> tuple[RolloutManager, LocalRef]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worker = LocalRef(RolloutWorker(str(model_dir), "cpu", seed=0), "worker-0")
    data = LocalRef(DataManager(group_size=N, max_staleness=eta, drop_all_equal=False), "data")
    counter = iter(range(10**6))

    def next_prompt() -> Prompt:
        i = next(counter)
        return Prompt(f"p{i}", f"sort:{i}=", tokenizer(f"sort:{i}=").input_ids, answer="0")

    def new_samples(p: Prompt, n: int) -> list[Sample]:
        return [Sample(sample_id=f"{p.prompt_id}/{k}", prompt_id=p.prompt_id,
                       prompt_ids=p.input_ids, max_new_tokens=kwargs.get("max_new_tokens", 6))
                for k in range(n)]

    async def score(samples: list[Sample]) -> None:  # the job's reward hook: length parity
        for s in samples:
            s.reward = Reward(value=float(len(s.response_ids) % 2))

    manager = RolloutManager(
        [worker], data, next_prompt=next_prompt, new_samples=new_samples, score=score,
        params=SamplingParams(temperature=1.0), max_staleness=eta, batch_groups=B,
        versions_per_batch=1, oversample=kwargs.get("oversample", 1.0), group_size=N)
    return manager, data


@pytest.mark.parametrize("eta", [0, 1, 2])
async def test_active_groups_never_exceed_the_gate_and_batches_keep_coming(model_dir, eta):
    manager, data = _manager(model_dir, eta)
    producer = asyncio.create_task(manager.run())
    peak = 0
    try:
        for _ in range(4):
            # No trainer here: the worker keeps version 0, so every batch is fresh at version 0.
            batch = asyncio.create_task(data.get_batch(B, 0, 60))
            while not batch.done():
                peak = max(peak, (await data.stats())["active_groups"])
                await asyncio.sleep(0.005)
            assert len(batch.result()) == B
            await data.release_batch(B)  # as if its weights had reached the worker
    finally:
        producer.cancel()
        await manager.abort_in_flight()
        await manager.drain()
    assert peak <= (eta + 1) * B
    assert (await data.stats())["balance"] == 0


async def test_aborted_answers_come_back_as_partials_and_resume_from_their_tokens(model_dir):
    # An untrained model rarely says EOS: with 64 tokens of budget, answers are mid-way.
    manager, data = _manager(model_dir, 1, max_new_tokens=64)
    producer = asyncio.create_task(manager.run())
    for _ in range(20):  # a few decoding steps (the engine yields once per step)
        await asyncio.sleep(0)
    producer.cancel()  # no resumption yet: look at the pool first
    await manager.abort_in_flight()
    await manager.drain()
    stats = await data.stats()
    assert stats["partial_samples"] > 0 and stats["balance"] == 0
    pool = (await data.state_dict())["partials"]
    before = {s.sample_id: list(s.response_ids) for s in pool}
    assert all(0 < len(tokens) < 64 for tokens in before.values())
    producer = asyncio.create_task(manager.run())  # partials are dispatched first
    try:
        groups = await data.get_batch(B, 0, 60)
    finally:
        producer.cancel()
        await manager.abort_in_flight()
        await manager.drain()
    trained = {s.sample_id: s for g in groups for s in g.samples}
    resumed = [sid for sid in before if sid in trained]
    assert resumed, "the first complete groups are the resumed ones"
    for sid in resumed:
        assert trained[sid].response_ids[: len(before[sid])] == before[sid]
        assert trained[sid].is_finished
    assert (await data.stats())["balance"] == 0


async def test_a_stop_requested_before_the_producer_first_runs_still_stops_it(model_dir):
    """A checkpoint restarts the producer right before the run's end stops it: that stop must
    not be lost (the loop used to reset the flag on entry and then admit forever)."""
    manager, data = _manager(model_dir, 0)
    for _ in range(2):  # the flag is reset on exit, so the manager can run and stop again
        producer = asyncio.create_task(manager.run())
        manager.request_stop()
        await asyncio.wait_for(producer, 10)
    producer = asyncio.create_task(manager.run())
    await asyncio.sleep(0.5)
    assert not producer.done()  # with no stop requested it keeps admitting
    manager.request_stop()
    await asyncio.wait_for(producer, 30)
    await manager.abort_in_flight()
    await manager.drain()
    assert (await data.stats())["balance"] == 0


async def test_an_unexpected_request_error_stops_the_producer_with_that_error(model_dir):
    """Not a lost worker (whose samples are re-queued) but a bug, here a token id the model
    does not have: retrying would repeat it, so the producer raises it at once."""
    manager, data = _manager(model_dir, 0)
    draws = iter(range(10**6))
    manager._next_prompt = lambda: Prompt(f"bad-{next(draws)}", "?", [10**6], answer="0")
    producer = asyncio.create_task(manager.run())
    with pytest.raises(IndexError):
        await asyncio.wait_for(producer, 30)
    await manager.drain()
