"""The streaming pipeline on a real local Ray cluster with real tiny models and gloo broadcast:
staleness bound, exactly-once ledger, partial rollouts, bit-exact weight sync, late joiners,
checkpoint/resume."""

from __future__ import annotations

import contextlib
import logging
import os
import signal

import pytest
import torch

from asyncrl.algo.staleness import staleness
from asyncrl.cluster.actors import run_in_actor
from asyncrl.config import load_config
from asyncrl.controller.loop import Controller
from asyncrl.controller.pools import Pools
from asyncrl.controller.run import prepare

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path, name: str, *overrides: str):
    return load_config(None, [
        f"run.name={name}", f"run.output_dir={tmp_path}", "run.seed=1",
        "model.warm_start.steps=20", "data.eval_size=8",
        "rollout.prompts_per_step=4", "rollout.n_samples=4", "rollout.max_new_tokens=10",
        "rollout.worker_num_cpus=0.25", "rollout.num_workers=2", "trainer.num_cpus=0.5",
        *overrides,
    ])


async def _start(config) -> Controller:
    controller = Controller(await Pools.start(prepare(config)))
    return controller


async def _train(controller: Controller, steps: int) -> list:
    """Run `steps` training steps; return every trained sample with the version it met."""
    trained = []
    if controller.producer is None:
        controller.start_producer()
    for _ in range(steps):
        version = controller.pools.trainer_version
        _, groups = await controller.step()
        trained += [(s, version) for g in groups for s in g.samples]
    return trained


async def _assert_weights_equal_trainer(pools: Pools) -> None:
    trainer = await pools.trainer.weights()
    for worker in pools.workers:
        engine = await worker.engine_weights()
        assert engine.keys() == trainer.keys()
        for name, tensor in trainer.items():
            assert torch.equal(engine[name], tensor), name
        assert await worker.policy_version() == pools.trainer_version


async def _replaced_and_drained(controller: Controller, victim, workers: int = 2) -> dict:
    """The victim is gone, a fresh worker took its place with the trainer's weights; returns
    the ledger once every request came back."""
    names = [w.name for w in controller.pools.workers]
    assert victim.name not in names and len(names) == workers
    await _assert_weights_equal_trainer(controller.pools)
    return await controller.settle()


@pytest.mark.parametrize("eta", [0, 1, 2])
async def test_no_trained_sample_is_staler_than_eta_even_across_a_resume(ray_local, tmp_path, eta):
    mode = ["mode=sync"] if eta == 0 else ["mode=async", f"max_staleness={eta}"]
    first = await _start(_config(tmp_path, f"eta{eta}", *mode))
    try:
        trained = await _train(first, 3)
        await first.stop_producer()
        checkpoint = await first.pools.checkpoint(tmp_path / f"ckpt{eta}")
        version = first.pools.trainer_version
    finally:
        first.pools.close()
    resumed = await _start(_config(tmp_path, f"eta{eta}-resumed", *mode))
    try:
        await resumed.pools.restore(checkpoint)
        assert resumed.pools.trainer_version == version == 3
        await _assert_weights_equal_trainer(resumed.pools)
        trained += await _train(resumed, 3)
        ledger = await resumed.settle()
    finally:
        resumed.pools.close()
    ages = [staleness(s.token_versions, v) for s, v in trained]
    assert max(ages) <= eta, ages
    if eta == 0:
        assert set(ages) == {0}
    assert ledger["balance"] == 0, ledger
    assert ledger["trained"] == len(trained) == 6 * 4 * 4


async def test_partial_rollouts_account_for_every_sample_and_resume_from_their_tokens(
    ray_local, tmp_path
):
    # An untrained model rarely says EOS, so answers are long and aborts catch them midway,
    # unless the trainer is so slow that every answer in flight finished before the abort
    # (seen once on a loaded machine): then train on, up to 12 steps, until one was caught.
    config = _config(tmp_path, "partial", "mode=async", "max_staleness=2", "rollout.partial=true",
                     "rollout.oversample=2", "rollout.max_new_tokens=48",
                     "model.warm_start.steps=0", "algorithm.off_policy_correction=decoupled")
    controller = await _start(config)
    try:
        trained = await _train(controller, 5)
        while (await controller.pools.data.stats())["resumed"] == 0 and len(trained) < 12 * 16:
            trained += await _train(controller, 1)
        ledger = await controller.settle()
        await _assert_weights_equal_trainer(controller.pools)
    finally:
        controller.pools.close()
    # (b) every sample ever started is trained, pending, or dropped by a named rule.
    dropped = sum(v for k, v in ledger.items() if k.startswith("dropped/"))
    assert ledger["started"] == ledger["trained"] + ledger["pending"] + dropped
    assert ledger["balance"] == 0 and ledger["trained"] == len(trained) >= 5 * 16
    # (c) aborted answers were resumed from their tokens; versions in order, within η.
    assert ledger["resumed"] > 0, ("with aborts every step, some partials must be resumed", ledger)
    for s, version in trained:
        assert s.token_versions == sorted(s.token_versions)
        assert staleness(s.token_versions, version) <= 2


async def test_a_worker_joining_late_gets_the_current_weights_before_work(ray_local, tmp_path):
    controller = await _start(_config(tmp_path, "late", "mode=async", "max_staleness=1",
                                      "rollout.num_workers=1"))
    try:
        await _train(controller, 2)
        await controller.pools.add_worker()
        assert len(controller.pools.workers) == 2
        await _assert_weights_equal_trainer(controller.pools)  # (d) and (e)
        await _train(controller, 2)
        await _assert_weights_equal_trainer(controller.pools)
    finally:
        await controller.stop_producer()
        controller.pools.close()


@pytest.mark.slow  # 35–100 s; failed once in five runs on a loaded machine, cause not found
async def test_a_hung_rollout_worker_is_replaced_after_the_request_timeout(
    ray_local, tmp_path, caplog
):
    """A worker frozen mid-request (SIGSTOP: alive, silent) is caught by
    rollout.request_timeout_s, not by the run's batch timeout: its samples are generated
    elsewhere, it is killed and replaced, and nothing is lost."""
    controller = await _start(_config(tmp_path, "hung", "mode=async", "max_staleness=1",
                                      "rollout.request_timeout_s=5", "sync.timeout_s=10"))
    victim = controller.pools.workers[0]
    pid = await run_in_actor(victim, os.getpid)
    try:
        trained = await _train(controller, 2)
        with caplog.at_level(logging.WARNING, logger="asyncrl.rollout.manager"):
            os.kill(pid, signal.SIGSTOP)
            trained += await _train(controller, 3)
        assert any("rollout.request_timeout_s=5" in r.getMessage() for r in caplog.records)
        ledger = await _replaced_and_drained(controller, victim)
    finally:
        await controller.stop_producer()
        controller.pools.close()
        with contextlib.suppress(ProcessLookupError):  # the frozen worker, if still there
            os.kill(pid, signal.SIGKILL)
    assert ledger["balance"] == 0 and ledger["trained"] == len(trained) == 5 * 16


@pytest.mark.parametrize("workers,partial", [(2, False), (1, True)])
async def test_a_killed_rollout_worker_is_replaced_and_no_sample_is_lost(
    ray_local, tmp_path, workers, partial
):
    """With one worker (the default) its loss leaves no one to fill the batch: the controller
    must replace it while it waits, not only after a step."""
    import ray

    controller = await _start(_config(tmp_path, f"chaos-{workers}", "mode=async",
                                      "max_staleness=1", "rollout.max_new_tokens=24",
                                      f"rollout.num_workers={workers}",
                                      f"rollout.partial={str(partial).lower()}"))
    try:
        trained = await _train(controller, 2)
        victim = controller.pools.workers[0]
        ray.kill(victim.handle, no_restart=True)  # mid-generation: the producer keeps it busy
        trained += await _train(controller, 4)
        ledger = await _replaced_and_drained(controller, victim, workers)
    finally:
        await controller.stop_producer()
        controller.pools.close()
    assert ledger["balance"] == 0 and ledger["trained"] == len(trained) == 6 * 16
    assert max(staleness(s.token_versions, v) for s, v in trained) <= 1


async def test_the_driver_forgets_prompts_once_trained_or_dropped_for_good(ray_local, tmp_path):
    """Groups dropped by a filter (here failed rewards) never come back; the driver's prompt
    table (kept for rewards, and saved in every checkpoint) must not grow with them."""
    controller = await _start(_config(
        tmp_path, "forget", "mode=sync", "rollout.num_workers=1", "reward.num_workers=0",
        "reward.fn=tests.plugins.rewards:crash_on_every_third_prompt"))
    try:
        await _train(controller, 3)
        ledger = await controller.settle()
        rows = await controller.pools.data.ledger_entries()
    finally:
        await controller.stop_producer()
        controller.pools.close()
    assert ledger["dropped/reward_failed"] > 0  # groups were dropped for good
    in_play = {r["prompt_id"] for r in rows if r["fate"] == "pending"}
    assert set(controller.pools.prompts) <= in_play
