"""A real Prometheus scrape of a running job's /metrics endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncrl.config import load_config
from asyncrl.controller.run import prepare

pytestmark = pytest.mark.timeout(300)

DOCUMENTED = {
    "asyncrl_policy_version", "asyncrl_rollout_generated_tokens", "asyncrl_train_samples",
    "asyncrl_rollout_in_flight_samples", "asyncrl_buffer_ready_groups",
    "asyncrl_buffer_partial_samples", "asyncrl_samples_dropped",
    "asyncrl_sample_staleness_versions", "asyncrl_reward_mean", "asyncrl_eval_accuracy",
    "asyncrl_step_phase_seconds", "asyncrl_weight_sync_seconds", "asyncrl_weight_sync_bytes",
    "asyncrl_reward_failures", "asyncrl_reward_scored_samples", "asyncrl_pool_busy_fraction",
    "asyncrl_rollout_workers",
}


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(family.name, 0.0)
            if sample.name in (family.name, f"{family.name}_total", f"{family.name}_count"):
                values[family.name] += sample.value
    return values


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_the_endpoint_serves_every_documented_metric_and_values_move(ray_local, tmp_path):
    from asyncrl.controller.loop import run_loop

    port = _free_port()
    config = load_config(None, [
        f"run.output_dir={tmp_path}", "run.name=prom", "run.steps=12", "run.eval_every=6",
        "mode=async", "model.warm_start.steps=10", "data.eval_size=8",
        "rollout.prompts_per_step=4", "rollout.n_samples=4", f"metrics.port={port}",
        "trainer.num_cpus=0.5",
    ])
    url = f"http://127.0.0.1:{port}/metrics"
    task = asyncio.create_task(run_loop(prepare(config), progress=False))
    scrapes = []
    while not task.done():
        await asyncio.sleep(0.25)
        with contextlib.suppress(OSError):  # not serving yet, or already stopped
            scrapes.append(await asyncio.to_thread(_scrape, url))
    await task
    with pytest.raises(OSError):  # the run stopped its server
        _scrape(url)
    assert len(scrapes) >= 2
    last = scrapes[-1]
    assert DOCUMENTED <= set(last), DOCUMENTED - set(last)
    moved = [s for s in scrapes if s["asyncrl_policy_version"] > 0]
    assert moved and moved[-1]["asyncrl_rollout_generated_tokens"] > 0
    assert moved[-1]["asyncrl_train_samples"] == 16 * moved[-1]["asyncrl_policy_version"]
    assert scrapes[0]["asyncrl_policy_version"] <= last["asyncrl_policy_version"]
