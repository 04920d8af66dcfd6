"""A real Prometheus scrape of a running job's /metrics endpoint on 127.0.0.1."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncrl.config import load_config
from asyncrl.controller.run import prepare

pytestmark = pytest.mark.timeout(300)

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_metrics() -> set[str]:
    """The metric names of the README's table (`asyncrl_x_total{label}` → `asyncrl_x`)."""
    names = re.findall(r"^\| `(asyncrl_[a-z_]+)", README.read_text(), flags=re.MULTILINE)
    return {name.removesuffix("_total") for name in names}


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
    scrapes, done = [], threading.Event()

    def scrape_until_done() -> None:  # Prometheus's side: its own thread, every 50 ms
        while not done.wait(0.05):
            with contextlib.suppress(OSError):  # not serving yet, or already stopped
                scrapes.append(_scrape(url))

    scraper = threading.Thread(target=scrape_until_done, daemon=True)
    scraper.start()
    try:
        await run_loop(prepare(config), progress=False)
    finally:
        done.set()
        scraper.join()
    with pytest.raises(OSError):  # the run stopped its server
        _scrape(url)
    documented = documented_metrics()
    assert len(documented) >= 17  # the table parsed
    last = scrapes[-1]
    assert documented <= set(last), documented - set(last)
    # Values move: the version climbs through several scrapes, counters only grow.
    versions = [s["asyncrl_policy_version"] for s in scrapes]
    assert len(set(versions)) >= 3 and versions == sorted(versions), versions
    for counter in ("asyncrl_rollout_generated_tokens", "asyncrl_train_samples",
                    "asyncrl_step_phase_seconds", "asyncrl_pool_busy_seconds",
                    "asyncrl_weight_sync_bytes", "asyncrl_reward_scored_samples"):
        series = [s[counter] for s in scrapes]
        assert series == sorted(series) and series[-1] > series[0], (counter, series)
    assert last["asyncrl_policy_version"] >= 6
    assert last["asyncrl_train_samples"] == 16 * last["asyncrl_policy_version"]
    assert last["asyncrl_sample_staleness_versions"] == last["asyncrl_train_samples"]
