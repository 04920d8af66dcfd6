"""A short async training run with a multi-turn workflow on a real local Ray cluster: guessing
episodes (data.task and rollout.workflow guess_number) with partial rollouts, trained with
their feedback tokens masked out; every sample accounted for, staleness within η."""

from __future__ import annotations

import pytest

from asyncrl.algo.staleness import staleness
from asyncrl.config import load_config
from asyncrl.controller.loop import Controller
from asyncrl.controller.pools import Pools
from asyncrl.controller.run import prepare
from asyncrl.types import TrainBatch

pytestmark = pytest.mark.timeout(300)


def _guess_config(tmp_path, name: str, *overrides: str):
    """A short async guessing-game job (multi-turn) on the built-in tiny model."""
    return load_config(None, [
        f"run.name={name}", f"run.output_dir={tmp_path}", "model.warm_start.steps=20",
        "data.eval_size=8", "data.task=guess_number", "rollout.max_turns=4",
        "rollout.max_turn_tokens=4", "rollout.max_new_tokens=20", "rollout.prompts_per_step=4",
        "rollout.worker_num_cpus=0.25", "trainer.num_cpus=0.5", "mode=async",
        "max_staleness=1", *overrides,
    ])


async def test_a_workflow_run_trains_model_tokens_only_and_balances_its_ledger(
    ray_local, tmp_path
):
    config = _guess_config(tmp_path, "guess", "run.seed=1", "rollout.workflow=guess_number",
                           "rollout.n_samples=4", "rollout.num_workers=2",
                           "rollout.partial=true", "rollout.oversample=2")
    controller = Controller(await Pools.start(prepare(config)))
    pools = controller.pools
    trained = []
    try:
        accuracy = await pools.evaluate()  # greedy episodes, scored by the task's transcript
        controller.start_producer()
        for _ in range(3):
            version = pools.trainer_version
            _, groups = await controller.step()
            trained.append((groups, version))
        ledger = await controller.settle()
    finally:
        pools.close()
    assert 0.0 <= accuracy <= 1.0
    assert ledger["balance"] == 0 and ledger["trained"] == 3 * 4 * 4, ledger
    samples = [(s, v) for groups, v in trained for g in groups for s in g.samples]
    assert max(staleness(s.token_versions, v) for s, v in samples) <= 1
    episodes = [s for s, _ in samples]
    assert all(s.episode["turns"] >= 1 and "end" in s.episode for s in episodes)
    assert any(not all(s.model_token_mask()) for s in episodes), "no feedback was appended"
    groups, _ = trained[-1]
    batch = TrainBatch.from_groups(groups, pad_token_id=0)
    for row, s in enumerate(s for g in groups for s in g.samples):
        p = len(s.prompt_ids)
        assert batch.loss_mask[row, p : p + len(s.response_ids)].tolist() == s.model_token_mask()


async def test_an_environment_that_raises_fails_its_samples_rewards_not_the_run(
    ray_local, tmp_path
):
    config = _guess_config(tmp_path, "flaky", "run.seed=2",
                           "rollout.workflow=tests.plugins.workflows:FlakyGuess",
                           "rollout.n_samples=2")
    controller = Controller(await Pools.start(prepare(config)))
    pools = controller.pools
    try:
        controller.start_producer()
        records = [(await controller.step())[0] for _ in range(3)]
        ledger = await controller.settle()
    finally:
        pools.close()
    last = records[-1]
    assert last["reward/failures/workflow"] > 0  # counted by reason, as reward failures are
    assert ledger["dropped/reward_failed"] > 0  # their groups dropped, never scored as 0
    assert ledger["balance"] == 0 and ledger["trained"] == 3 * 4 * 2, ledger
