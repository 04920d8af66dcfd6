"""Chaos: random rollout and reward workers are killed, and the trainer once, during an async run
with partial rollouts. The run completes, the ledger balances exactly, and no trained sample is
older than η — before and after the trainer's restart from its checkpoint."""

from __future__ import annotations

import random
import threading
import time

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.metrics.report import read_metrics
from tests.helpers import assert_ledger_file_matches

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ETA = 2


class ChaosMonkey(threading.Thread):
    """Kills actors of one run by name while it trains: random rollout and reward workers every
    few seconds, and the trainer once, after the first checkpoint exists. (Every 2–4 s was
    faster than a worker starts here: all 5 tries to form a weight group could lose a worker.)"""

    def __init__(self, ray, run_name: str, checkpoint_root, *, seed: int = 0) -> None:
        super().__init__(daemon=True)
        self.ray, self.prefix, self.checkpoints = ray, f"{run_name}/", checkpoint_root
        self.rng, self.stop, self.killed = random.Random(seed), threading.Event(), []

    def _alive(self, role: str) -> list[str]:
        actors = self.ray.util.list_named_actors(all_namespaces=False)
        return sorted(a for a in actors if a.startswith(self.prefix + role))

    def _kill(self, name: str) -> None:
        try:
            self.ray.kill(self.ray.get_actor(name), no_restart=True)
            self.killed.append(name)
        except ValueError:  # already gone
            pass

    def run(self) -> None:
        trainer_killed, next_kill = False, time.monotonic() + self.rng.uniform(3.0, 6.0)
        while not self.stop.wait(0.3):
            if not trainer_killed and any(self.checkpoints.glob("step-*/job_state.pkl")):
                for name in self._alive("trainer"):
                    self._kill(name)
                    trainer_killed = True
            if time.monotonic() < next_kill:
                continue
            next_kill = time.monotonic() + self.rng.uniform(3.0, 6.0)
            for role in ("rollout-worker", "reward-worker"):
                alive = self._alive(role)
                if alive and self.rng.random() < 0.6:
                    self._kill(self.rng.choice(alive))


def test_random_kills_of_every_pool_lose_no_sample_and_keep_staleness_bounded(
    ray_local, tmp_path
):
    name = "chaos"
    config = load_config(None, [
        f"run.output_dir={tmp_path}", f"run.name={name}", "run.steps=16", "run.eval_every=16",
        "run.checkpoint_every=4", "mode=async", f"max_staleness={ETA}", "rollout.partial=true",
        "rollout.oversample=2", "rollout.num_workers=2", "rollout.worker_num_cpus=0.25",
        "reward.num_workers=2", "reward.num_cpus=0", "reward.timeout_s=10",
        "rollout.prompts_per_step=8", "rollout.n_samples=4", "rollout.max_new_tokens=12",
        "model.warm_start.steps=5", "data.eval_size=16", "trainer.num_cpus=0.5",
        "sync.timeout_s=20",
    ])
    monkey = ChaosMonkey(ray_local, name, tmp_path / name / "checkpoint")
    monkey.start()
    try:
        result = run(config, progress=False)
    finally:
        monkey.stop.set()
        monkey.join()
    killed_roles = {n.split("/")[1].rsplit("-", 1)[0] for n in monkey.killed}
    assert {"rollout-worker", "trainer-rank"} <= killed_roles, monkey.killed
    assert result.restarts == 1
    assert result.final_model is not None
    assert_ledger_file_matches(result.run_dir, result.ledger)
    rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "time/step_s" in r]
    assert max(r["step"] for r in rows) == 16
    assert all(r["staleness/max"] <= ETA for r in rows)
    assert all(r["data/balance"] == 0 for r in rows if "data/balance" in r)
    replaced = sum(r.get("rollout/workers_replaced", 0) for r in rows)
    assert replaced >= 1 or any("reward" in n for n in monkey.killed)
