"""`ray job submit -- asyncrl train` against a real multi-node cluster on this machine: a head
started with `ray start --head` and a second node, each offering a custom resource, so the
rollout pool and the trainer can only run on their own node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(420)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """`ray start --block` stops every process of its node on SIGTERM."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "the head node exited"
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url}")


def _nodes(gcs: str, env: dict) -> list[dict]:
    script = (f"import json, ray; ray.init(address={gcs!r}, logging_level='ERROR'); "
              "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
    out = subprocess.run(["python", "-c", script], env=env, capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else []


def test_ray_job_submit_runs_asyncrl_train_with_pools_on_their_own_nodes(tmp_path):
    gcs_port, dash_port = _free_port(), _free_port()
    # Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep for them.
    ray_tmp = Path(tempfile.mkdtemp(prefix="asyncrl-rj-", dir="/tmp"))
    gcs, dashboard = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}"
    # A private cluster on loopback: its own temp dir, no token (the test's processes only).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def own_ports() -> list[str]:  # another cluster on this machine (the tests') holds defaults
        return [f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}",
                f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]

    head = subprocess.Popen(
        ["ray", "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", '--resources={"rollout": 2}',
         f"--temp-dir={ray_tmp}", *common, *own_ports()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        _wait_for_dashboard(dashboard, head)
        worker = subprocess.Popen(
            ["ray", "start", f"--address={gcs}", "--num-cpus=1", '--resources={"trainer": 1}',
             *common, *own_ports()], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while len(_nodes(gcs, env)) < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(2)

        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "job.yaml").write_text(
            "mode: async\n"
            "run: {name: submitted, steps: 3, eval_every: 3, batch_timeout_s: 120}\n"
            "model: {warm_start: {steps: 5}}\n"
            "data: {eval_size: 8}\n"
            "rollout: {prompts_per_step: 4, n_samples: 4, worker_num_cpus: 0.5,\n"
            "          worker_resources: {rollout: 1}, placement: STRICT_PACK}\n"
            "reward: {num_workers: 1, num_cpus: 0.25, resources: {rollout: 0.5},\n"
            "         placement: PACK}\n"
            "trainer: {num_cpus: 0.5, resources: {trainer: 1}}\n")
        out_dir = tmp_path / "runs"
        deadline = time.monotonic() + 120
        while True:  # the head's job agent may still be starting under load
            submit = subprocess.run(
                ["ray", "job", "submit", f"--address={dashboard}", "--working-dir", str(job_dir),
                 "--", "asyncrl", "train", "job.yaml", "-q", "--set",
                 f"run.output_dir={out_dir}"],
                env=env, capture_output=True, text=True, timeout=300)
            logs = submit.stdout[-3000:] + submit.stderr[-2000:]
            if "No available agent" not in logs or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, logs
        assert "succeeded" in logs
        assert "held-out accuracy" in logs
        run_dir = out_dir / "submitted"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        assert max(r.get("step", 0) for r in rows) == 3
        assert (run_dir / "final_model" / "model.safetensors").is_file()
        assert f"report: {run_dir / 'report' / 'index.html'}" in logs
        assert (run_dir / "report" / "index.html").is_file()

        # Without `ray job submit`: `--address` joins the same cluster from outside (no
        # RAY_ADDRESS). Only that cluster has the `trainer` resource, so an embedded one
        # could never place the trainer: finishing shows the address was used.
        direct = subprocess.run(
            ["asyncrl", "train", str(job_dir / "job.yaml"), "-q", "--address", gcs, "--set",
             f"run.output_dir={out_dir}", "--set", "run.name=direct", "--set", "run.steps=2",
             "--set", "run.batch_timeout_s=60"],
            env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert direct.returncode == 0, direct.stdout[-2000:] + direct.stderr[-3000:]
        assert "held-out accuracy" in direct.stdout
        assert max(json.loads(line).get("step", 0)
                   for line in (out_dir / "direct" / "metrics.jsonl").open()) == 2
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
