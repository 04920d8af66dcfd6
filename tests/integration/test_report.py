"""`asyncrl report`: PNG plots and an HTML page from a real run's metrics.jsonl."""

from __future__ import annotations

import pytest

from asyncrl.cli.main import main
from asyncrl.config import load_config
from asyncrl.controller.run import run
from asyncrl.metrics.plots import write_report

pytestmark = pytest.mark.timeout(300)

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_real_run_gets_every_plot_it_has_data_for(ray_local, tmp_path):
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=reported", "run.steps=5", "run.eval_every=2",
        "mode=async", "model.warm_start.steps=5", "data.eval_size=8",
        "rollout.prompts_per_step=4", "rollout.n_samples=4", "trainer.num_cpus=0.5",
    ])
    result = run(config, progress=False)
    page = write_report(result.run_dir)
    html = page.read_text()
    rows = (result.run_dir / "metrics.jsonl").read_text()
    expected = ["reward", "eval", "throughput", "staleness", "time", "utilisation"]
    expected += ["dropped"] if "data/dropped/" in rows else []
    for name in expected:
        png = page.parent / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name
        assert f"src='{name}.png'" in html
    assert not (page.parent / "reward_failures.png").exists()  # no failure in this run
    assert "ledger balance" in html and "max_staleness" in html  # summary and config


def test_the_cli_reports_a_missing_run_as_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
