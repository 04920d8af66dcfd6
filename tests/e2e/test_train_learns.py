"""End to end: `asyncrl.run` on the built-in task, a reduced run; the reward rises."""

from __future__ import annotations

import pytest

from asyncrl.config import RESOLVED_NAME, load_config
from asyncrl.controller.run import run
from asyncrl.metrics.report import read_metrics

pytestmark = pytest.mark.timeout(600)


def test_reduced_sync_run_raises_the_reward_and_writes_its_outputs(ray_local, tmp_path):
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=e2e", "run.steps=80", "run.eval_every=40",
        "data.eval_size=100",
    ])
    result = run(config, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 80
    first, last = sum(rewards[:20]) / 20, sum(rewards[-20:]) / 20
    assert last > first + 0.03, (first, last)
    assert [v for v, _ in result.evals] == [0, 40, 80]
    assert result.ledger["balance"] == 0
    assert (result.run_dir / RESOLVED_NAME).is_file()
    assert (result.final_model / "model.safetensors").is_file()
    assert (result.final_model / "tokenizer.json").is_file()
