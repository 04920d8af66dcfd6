"""Placement groups per pool on a real local Ray cluster: the rollout and reward pools are
reserved as groups, a replaced or added worker lands in a bundle of its pool, an impossible
layout fails with an error naming the field, and everything is released at close."""

from __future__ import annotations

import pytest

from asyncrl.cluster.actors import run_in_actor
from asyncrl.cluster.placement import current_placement_group
from asyncrl.config import load_config
from asyncrl.controller.loop import Controller
from asyncrl.controller.pools import Pools
from asyncrl.controller.run import prepare
from asyncrl.errors import AsyncrlError

pytestmark = pytest.mark.timeout(300)


def _config(tmp_path, name: str, *overrides: str):
    return load_config(None, [
        f"run.name={name}", f"run.output_dir={tmp_path}", "model.warm_start.steps=5",
        "data.eval_size=8", "rollout.prompts_per_step=2", "rollout.n_samples=2",
        "rollout.max_new_tokens=6", "rollout.worker_num_cpus=0.25", "trainer.num_cpus=0.5",
        *overrides,
    ])


async def _groups_of(refs) -> list[str | None]:
    return [await run_in_actor(ref, current_placement_group) for ref in refs]


async def test_pools_run_in_their_placement_groups_and_successors_reuse_the_bundles(
    ray_local, tmp_path
):
    import ray

    config = _config(tmp_path, "placed", "mode=async", "rollout.num_workers=2",
                     "rollout.placement=STRICT_PACK", "reward.num_workers=1",
                     "reward.num_cpus=0.25", "reward.placement=PACK",
                     "trainer.placement=STRICT_PACK")
    controller = Controller(await Pools.start(prepare(config)))
    pools = controller.pools
    try:
        rollout_groups = await _groups_of(pools.workers)
        (reward_group,) = await _groups_of(pools.reward.workers)
        (trainer_group,) = await _groups_of([pools.trainer])
        assert None not in rollout_groups and len(set(rollout_groups)) == 1
        assert None not in (reward_group, trainer_group)
        assert len({rollout_groups[0], reward_group, trainer_group}) == 3  # one per pool
        controller.start_producer()
        await controller.step()  # the pipeline trains with placed pools

        victim = pools.workers[0]
        ray.kill(victim.handle, no_restart=True)
        assert await pools.replace_lost_workers() == 1
        assert await _groups_of(pools.workers) == rollout_groups  # the freed bundle, reused
        assert pools._rollout_placement.bundles == 2

        await pools.scale_rollout(3)  # beyond the reservation: a new group for the newcomer
        grown = await _groups_of(pools.workers)
        assert len(grown) == 3 and None not in grown and len(set(grown)) == 2
        await controller.step()
    finally:
        await controller.stop_producer()
        pools.close()
    table = ray.util.placement_group_table()
    groups = {*rollout_groups, *grown, reward_group, trainer_group}
    assert {table[g]["state"] for g in groups} == {"REMOVED"}


async def test_a_layout_the_cluster_cannot_place_fails_naming_the_field(ray_local, tmp_path):
    import ray

    # One node: two bundles that must be on different nodes can never be placed.
    config = _config(tmp_path, "spread", "rollout.num_workers=2",
                     "rollout.placement=STRICT_SPREAD", "run.placement_timeout_s=3")
    with pytest.raises(AsyncrlError) as error:
        await Pools.start(prepare(config))
    message = str(error.value)
    assert "rollout.placement=STRICT_SPREAD" in message
    assert "within 3s (run.placement_timeout_s)" in message and "Add nodes" in message
    states = [g["state"] for g in ray.util.placement_group_table().values()
              if g["name"].startswith("spread/")]
    assert states and set(states) == {"REMOVED"}  # nothing left reserved
    assert not [a for a in ray.util.list_named_actors() if a.startswith("spread/")]


async def test_a_scale_up_the_cluster_cannot_place_is_skipped_and_training_goes_on(
    ray_local, tmp_path, monkeypatch, caplog
):
    import logging

    import asyncrl.controller.pools as pools_module

    monkeypatch.setattr(pools_module, "SCALE_UP_PLACEMENT_S", 2.0)
    # 2 × 0.75 CPUs of rollout workers + the trainer's 0.5: the 2-CPU cluster is full
    config = _config(tmp_path, "full", "mode=async", "rollout.num_workers=2",
                     "rollout.worker_num_cpus=0.75", "rollout.placement=PACK",
                     "reward.num_workers=0")
    controller = Controller(await Pools.start(prepare(config)))
    pools = controller.pools
    try:
        controller.start_producer()
        with caplog.at_level(logging.WARNING, logger="asyncrl.controller.pools"):
            assert await pools.scale_rollout(3) == 0
        assert "scaling the rollout pool up stopped at 2 workers" in caplog.text
        assert len(pools.workers) == 2 and pools._rollout_placement.bundles == 2
        await controller.step()  # the run goes on with the workers it has
    finally:
        await controller.stop_producer()
        pools.close()
