"""End to end: a reasoning-gym dataset trained through config alone (slow: a real Ray run).

The same job as `asyncrl train --set data.task=reasoning_gym --set
data.task_kwargs.dataset=basic_arithmetic --set data.task_kwargs.prompt_style=compact --set
data.task_kwargs.max_terms=2 --set data.task_kwargs.max_digits=1 --set
data.task_kwargs.operators=+,-,* --set run.steps=10`.
"""

from __future__ import annotations

import math

import pytest

from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.metrics.report import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_reasoning_gym_task_trains_through_config_alone(ray_local, tmp_path):
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=gym", "run.steps=10", "run.eval_every=10",
        "data.task=reasoning_gym", "data.task_kwargs.dataset=basic_arithmetic",
        "data.task_kwargs.prompt_style=compact", "data.task_kwargs.max_terms=2",
        "data.task_kwargs.max_digits=1", "data.task_kwargs.operators=+,-,*",
    ])
    result = run(config, progress=False)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert len(rewards) == 10 and all(math.isfinite(r) for r in rewards)
    assert sum(rewards) > 0  # basic_arithmetic's own scorer gives (partial) credit
    assert not any(k.startswith("reward/failures/") and v for r in rows for k, v in r.items())
    assert [v for v, _ in result.evals] == [0, 10]
