"""End to end: the guessing game (a multi-turn workflow) trains on the built-in tiny model
(slow: a real Ray run of 60 steps, about 40 s on 2 cores).

The same job as the README's `asyncrl train --set data.task=guess_number --set
rollout.workflow=guess_number ...` with a narrower range. Measured (seed 0): training reward
0.11 over the first 10 steps, 0.19 over the last 10; sampled accuracy 15 % → 25 %.
"""

from __future__ import annotations

import statistics

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.metrics.report import read_metrics
from tests.helpers import assert_ledger_file_matches

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_guessing_game_reward_rises_with_feedback_tokens_masked(ray_local, tmp_path):
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=guess", "run.steps=60", "run.eval_every=60",
        "data.task=guess_number", "data.task_kwargs.max_low=20", "data.task_kwargs.max_width=8",
        "data.eval_size=100", "rollout.workflow=guess_number", "rollout.max_turns=5",
        "rollout.max_turn_tokens=4", "rollout.max_new_tokens=24", "rollout.prompts_per_step=16",
    ])
    result = run(config, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 60
    assert statistics.mean(rewards[-10:]) > statistics.mean(rewards[:10]) + 0.03, rewards
    assert_ledger_file_matches(result.run_dir, result.ledger)
