"""Elastic rollout pool: workers are added and removed while a run goes on, through the control
file that `asyncrl scale` writes; nothing is lost, and the run's weights stay exact."""

from __future__ import annotations

import asyncio
import json

import pytest

from asyncrl.config import load_config
from asyncrl.controller.control import ControlFile, write_control
from asyncrl.controller.run import prepare
from asyncrl.metrics.report import read_metrics
from tests.helpers import assert_ledger_file_matches

pytestmark = pytest.mark.timeout(300)


async def _until_step(metrics, step: int) -> None:
    while not (metrics.is_file() and any(r.get("step", 0) >= step and "time/step_s" in r
                                         for r in read_metrics(metrics))):
        await asyncio.sleep(0.2)


async def test_scaling_up_and_down_mid_run_loses_nothing(ray_local, tmp_path):
    from asyncrl.controller.loop import run_loop

    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=elastic", "run.steps=12", "run.eval_every=12",
        "mode=async", "max_staleness=1", "rollout.partial=true", "rollout.oversample=2",
        "rollout.num_workers=1", "rollout.worker_num_cpus=0.25", "rollout.prompts_per_step=4",
        "rollout.n_samples=4", "rollout.max_new_tokens=16", "model.warm_start.steps=5",
        "data.eval_size=8", "trainer.num_cpus=0.5", "reward.num_workers=0",
    ])
    ctx = prepare(config)
    metrics = ctx.run_dir / "metrics.jsonl"
    job = asyncio.create_task(run_loop(ctx, progress=False))
    await _until_step(metrics, 2)
    write_control(ctx.run_dir, rollout_workers=3)
    await _until_step(metrics, 6)
    write_control(ctx.run_dir, rollout_workers=1)
    result = await job

    rows = [r for r in read_metrics(metrics) if "time/step_s" in r]
    sizes = [int(r["rollout/workers"]) for r in rows]
    assert sizes[0] == 1 and 3 in sizes and sizes[-1] == 1, sizes
    assert_ledger_file_matches(ctx.run_dir, result.ledger)
    assert all(r["staleness/max"] <= 1 for r in rows)
    assert all(0.0 <= r["busy/rollout"] <= 1.0 + 1e-6 for r in rows)


def test_a_control_file_is_read_once_per_change_and_a_bad_one_is_ignored(tmp_path, caplog):
    control = ControlFile(tmp_path)
    assert control.poll() == {}
    write_control(tmp_path, rollout_workers=2)
    assert control.poll() == {"rollout_workers": 2}
    assert control.poll() == {}  # unchanged
    (tmp_path / "control.json").write_text('{"rollout_workers": 0, "gpus": 2}')
    assert control.poll() == {}
    assert "ignoring" in caplog.text and "rollout_workers" in caplog.text
    with pytest.raises(ValueError, match="unknown control keys"):
        write_control(tmp_path, gpus=2)


def test_asyncrl_scale_writes_the_control_file_and_refuses_a_non_run_dir(tmp_path, capsys):
    from asyncrl.cli.main import main

    assert main(["scale", str(tmp_path), "--rollout-workers", "2"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (tmp_path / "config.resolved.yaml").write_text("mode: sync\n")
    assert main(["scale", str(tmp_path), "--rollout-workers", "0"]) == 2
    assert main(["scale", str(tmp_path), "--rollout-workers", "3"]) == 0
    assert json.loads((tmp_path / "control.json").read_text()) == {"rollout_workers": 3}
