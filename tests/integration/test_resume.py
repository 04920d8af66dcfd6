"""Checkpoints written by the loop, `--resume`, and SIGTERM → checkpoint → resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from asyncrl.config import load_config
from asyncrl.controller.run import load_resume_config, run
from asyncrl.metrics.report import read_metrics

pytestmark = pytest.mark.timeout(600)

SMALL = ["model.warm_start.steps=10", "data.eval_size=8", "rollout.prompts_per_step=4",
         "rollout.n_samples=4", "run.eval_every=2", "trainer.num_cpus=0.5"]


def test_a_run_continues_from_its_periodic_checkpoint(ray_local, tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", "run.steps=4",
                                "run.checkpoint_every=2", "mode=async", *SMALL])
    first = run(config, progress=False)
    assert first.ledger["balance"] == 0 and (first.run_dir / "checkpoint").is_dir()
    resumed_config = load_resume_config(first.run_dir, ["run.steps=6"])
    assert resumed_config.mode == "async" and resumed_config.run.steps == 6
    second = run(resumed_config, progress=False, resume=True)
    assert second.evals[0][0] == 4 and second.evals[-1][0] == 6
    rows = read_metrics(first.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "time/step_s" in r] == [1, 2, 3, 4, 5, 6]
    assert second.ledger["balance"] == 0


@pytest.mark.parametrize("make_dir", [False, True])
def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, make_dir):
    run_dir = tmp_path / "nothing"
    if make_dir:
        run_dir.mkdir()
        (run_dir / "config.resolved.yaml").write_text("mode: sync\n")
    proc = subprocess.run([sys.executable, "-m", "asyncrl", "train", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--resume" in proc.stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_cli_resumes_it(tmp_path):
    base = [sys.executable, "-m", "asyncrl", "train", "-q"]
    args = [f"run.output_dir={tmp_path}", "run.name=term", "run.steps=1000", *SMALL]
    proc = subprocess.Popen([*base, *(x for a in args for x in ("--set", a))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if metrics.is_file() and len(read_metrics(metrics)) >= 3:
                break
            time.sleep(1)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert "--resume" in out
    assert list((tmp_path / "term" / "checkpoint").glob("step-*/job_state.pkl"))
    stopped_at = max(r["step"] for r in read_metrics(metrics))
    resumed = subprocess.run(
        [*base, "--resume", str(tmp_path / "term"), "--set", f"run.steps={stopped_at + 2}"],
        capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [r["step"] for r in read_metrics(metrics) if "time/step_s" in r]
    assert steps == list(range(1, stopped_at + 3))


def test_resume_in_sync_mode_gives_the_same_weights_as_the_uninterrupted_run(ray_local, tmp_path):
    # One sync run of 4 steps keeps its checkpoints at steps 2 and 4. A copy of the run resumed
    # from step 2 must end at step 4 with the same weights: sampling draws depend only on (seed,
    # sample, position), the prompt cursor, optimizer, scheduler and RNGs are restored, and
    # batches are ordered by prompt, not by arrival.
    import shutil

    from safetensors.torch import load_file

    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=whole", "run.steps=4",
                                "run.checkpoint_every=2", "run.keep_checkpoints=2", *SMALL])
    whole = run(config, progress=False)
    checkpoints = sorted(p.name for p in (whole.run_dir / "checkpoint").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(whole.run_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoint" / "step-000004")
    shutil.rmtree(resumed_dir / "final_model")
    resumed = run(load_resume_config(resumed_dir, ["run.name=resumed"]), progress=False,
                  resume=True)
    assert resumed.evals[0][0] == 2 and resumed.evals[-1][0] == 4

    expected = load_file(whole.final_model / "model.safetensors")
    got = load_file(resumed.final_model / "model.safetensors")
    initial = load_file(whole.run_dir / "init_model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert not torch.equal(expected[name], initial[name]) or "norm" in name  # it trained
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_a_hung_trainer_call_ends_the_run_with_a_clear_error_when_no_checkpoint_exists(
    ray_local, tmp_path
):
    from asyncrl.errors import AsyncrlError

    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=hang", "run.steps=2",
                                "trainer.call_timeout_s=0.001", *SMALL])
    with pytest.raises(AsyncrlError, match=r"trainer.call_timeout_s=0.001s\); no checkpoint to "
                                           r"restart from: set run.checkpoint_every"):
        run(config, progress=False)
