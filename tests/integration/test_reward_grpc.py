"""The gRPC reward service for real: a RewardServer on a free 127.0.0.1 port, the RemoteReward
client, and `asyncrl serve-reward` as a subprocess. Every server is stopped by its handle and the
subprocess by its PID."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asyncrl.cli.main import main as cli_main
from asyncrl.data.tasks import SortDigits
from asyncrl.reward import TaskReward
from asyncrl.reward.pool import RewardSpec, RewardWorker
from asyncrl.reward.remote import RemoteReward, RemoteRewardAuthError, RewardServer
from asyncrl.reward.remote import reward_pb2 as pb
from asyncrl.reward.remote import reward_pb2_grpc as pb_grpc
from asyncrl.reward.remote.server import SERVICE_NAME
from asyncrl.types import Prompt, Reward, RewardStatus

pytestmark = pytest.mark.timeout(60)

TOKEN = "test-token-4f2a"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _task_prompts(n: int, seed: int = 0) -> tuple[list[Prompt], list[str]]:
    """n sort_digits prompts with a mix of right, partly right and wrong answers."""
    task, rng = SortDigits(), random.Random(seed)
    prompts, responses = [], []
    for i in range(n):
        example = task.example(rng)
        prompts.append(Prompt(f"p{i}", example.prompt, [i], answer=example.answer,
                              metadata={"i": i}))
        answer = list(example.answer)
        rng.shuffle(answer) if i % 3 else None  # every third answer is exactly right
        responses.append("".join(answer))
    return prompts, responses


class _CrashOnX:
    """Raises on a response containing 'x', never answers 'hang'; otherwise 1.0."""

    async def score(self, prompt: Prompt, response: str) -> Reward:
        if "x" in response:
            raise ValueError(f"cannot score {response!r}")
        if response == "hang":
            await asyncio.sleep(3600)
        return Reward(1.0, correct=True)


@pytest.fixture
async def task_server():
    server = RewardServer(TaskReward(SortDigits()), token=TOKEN)
    await server.start()
    yield server
    await server.stop(grace_s=0)


async def test_a_remote_batch_scores_exactly_as_local_scoring_does(task_server):
    # 64 prompts × 4 answers through one ScoreBatch and through single Scores, against the same
    # reward scored in-process: values, correctness and status are identical.
    assert task_server.host == "127.0.0.1" and task_server.port > 0
    prompts, responses = _task_prompts(64)
    prompts, responses = [p for p in prompts for _ in range(4)], responses * 4
    local = TaskReward(SortDigits())
    expected = [await local.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    client = RemoteReward(task_server.address, TOKEN, timeout_s=10)
    try:
        batch = await client.score_batch(prompts, responses)
        singles = await asyncio.gather(*(client.score(p, r) for p, r in zip(prompts[:32],
                                                                           responses[:32],
                                                                           strict=True)))
    finally:
        await client.close()
    assert batch == expected
    assert list(singles) == expected[:32]
    assert len({r.value for r in batch}) > 2  # partial credit, not just 0/1


async def test_a_missing_or_wrong_token_is_refused_with_unauthenticated(task_server):
    prompt, response = Prompt("p", "12", [], answer="12"), "12"
    request = pb.ScoreRequest(prompt=pb.Prompt(prompt_id="p", text="12", answer="12"),
                              response=response)
    async with grpc.aio.insecure_channel(task_server.address) as channel:
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.RewardServiceStub(channel).Score(request, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # health is guarded too
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The client does not retry a refused token: it raises at once, naming the token.
    client = RemoteReward(task_server.address, "wrong", retries=5, backoff_s=5.0,
                          token_source="$REWARD_TOKEN")
    start = time.monotonic()
    with pytest.raises(RemoteRewardAuthError, match=r"refused \$REWARD_TOKEN"):
        await client.score(prompt, response)
    assert time.monotonic() - start < 5.0  # no backoff was slept
    await client.close()


async def test_the_health_service_reports_serving_to_an_authorised_caller(task_server):
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(task_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service),
                                       metadata=metadata)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    client = RemoteReward(task_server.address, TOKEN)
    await client.check()
    await client.close()


async def test_a_client_outlives_a_server_restart_on_the_same_port():
    # Score, stop the server, and score again while no server listens: the client retries with
    # backoff until a new server comes up on the same port 1 s later, and that score succeeds.
    first = RewardServer(TaskReward(SortDigits()), token=TOKEN)
    port = await first.start()
    client = RemoteReward(first.address, TOKEN, timeout_s=5, retries=8, backoff_s=0.1)
    prompt = Prompt("p", "sort 321", [], answer="123")
    assert (await client.score(prompt, "123")).value == 1.0
    await first.stop(grace_s=0)

    async def restart_later() -> RewardServer:
        await asyncio.sleep(1.0)
        second = RewardServer(TaskReward(SortDigits()), token=TOKEN, port=port)
        await second.start()
        return second

    restarting = asyncio.create_task(restart_later())
    start = time.monotonic()
    try:
        reward = await client.score(prompt, "123")
        waited = time.monotonic() - start
    finally:
        second = await restarting
        await client.close()
        await second.stop(grace_s=0)
    assert reward.ok and reward.value == 1.0, reward
    assert waited >= 0.9  # it really waited through the outage rather than hitting a live server


async def test_retries_exhausted_give_a_remote_failure_not_an_exception():
    client = RemoteReward(f"127.0.0.1:{_free_port()}", TOKEN, timeout_s=1, retries=2,
                          backoff_s=0.05)
    prompts = [Prompt("p", "x", [], answer="1")] * 3
    single = await client.score(prompts[0], "1")
    batch = await client.score_batch(prompts, ["1", "2", "3"])
    await client.close()
    for reward in [single, *batch]:
        assert reward.status is RewardStatus.FAILED and math.isnan(reward.value)
        assert reward.error.startswith("remote: ")
        assert "UNAVAILABLE on all 3 attempts" in reward.error


async def test_a_reward_that_raises_or_hangs_arrives_as_a_failure_with_its_reason():
    # One crash and one hang inside a batch fail only their own items, each with its reason;
    # the hang is cut by the server's timeout_s, well before the client's deadline.
    async with RewardServer(_CrashOnX(), token=TOKEN, timeout_s=0.3) as server:
        client = RemoteReward(server.address, TOKEN, timeout_s=5)
        prompt = Prompt("p", "q", [], answer="a")
        single = await client.score(prompt, "x1")
        batch = await client.score_batch([prompt] * 4, ["ok", "xx", "hang", "fine"])
        await client.close()
    for failed in (single, batch[1]):
        assert failed.status is RewardStatus.FAILED and math.isnan(failed.value)
        assert failed.error.startswith("error: ValueError: cannot score")
    assert batch[2].status is RewardStatus.TIMEOUT and batch[2].error.startswith("timeout: ")
    assert [batch[0].value, batch[3].value] == [1.0, 1.0]


async def test_the_reward_pool_worker_scores_through_the_remote_spec(task_server):
    # The shape the controller builds for `reward: {type: remote, ...}`.
    spec = RewardSpec("task", remote=dict(address=task_server.address, token=TOKEN,
                                          tls_ca=None, timeout_s=5.0))
    worker = RewardWorker(spec, concurrency=4, timeout_s=5.0)
    prompts, responses = _task_prompts(8)
    rewards = await worker.score_batch(list(zip(prompts, responses, strict=True)))
    await worker.close()
    local = TaskReward(SortDigits())
    assert rewards == [await local.score(p, r) for p, r in zip(prompts, responses, strict=True)]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_scores_with_the_servers_ca_and_a_plaintext_client_fails(tmp_path):
    pytest.importorskip("cryptography", reason="generates the self-signed test certificate")
    cert, key = _self_signed(tmp_path)
    async with RewardServer(TaskReward(SortDigits()), token=TOKEN, tls=(cert, key)) as server:
        secure = RemoteReward(server.address, TOKEN, timeout_s=5, tls_ca=cert)
        plain = RemoteReward(server.address, TOKEN, timeout_s=2, retries=0)
        prompt = Prompt("p", "sort 21", [], answer="12")
        assert (await secure.score(prompt, "12")) == Reward(1.0, correct=True)
        refused = await plain.score(prompt, "12")
        await secure.close()
        await plain.close()
    assert refused.status is RewardStatus.FAILED and refused.error.startswith("remote: ")


def test_serve_reward_without_a_token_is_a_user_error_naming_the_flags(capsys, monkeypatch):
    monkeypatch.delenv("ASYNCRL_TEST_NO_TOKEN", raising=False)
    assert cli_main(["serve-reward", "--fn", "exact_match", "--port", "0"]) == 2
    assert "--token-env VAR or --token-file PATH" in capsys.readouterr().err
    assert cli_main(["serve-reward", "--fn", "exact_match", "--port", "0",
                     "--token-env", "ASYNCRL_TEST_NO_TOKEN"]) == 2
    assert "--token-env: environment variable 'ASYNCRL_TEST_NO_TOKEN'" in capsys.readouterr().err


async def test_serve_reward_cli_serves_until_sigterm_and_exits_cleanly():
    # `asyncrl serve-reward` as a real process: it prints its address when bound, a client
    # scores through it, and SIGTERM (sent to its PID) stops it gracefully with exit code 0.
    port = _free_port()
    env = {**os.environ, "ASYNCRL_TEST_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncrl", "serve-reward", "--fn", "exact_match",
         "--port", str(port), "--token-env", "ASYNCRL_TEST_TOKEN", "-q"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 45)
        assert f"on 127.0.0.1:{port} (plaintext)" in line, (line, proc.poll())
        client = RemoteReward(f"127.0.0.1:{port}", TOKEN, timeout_s=5)
        prompts = [Prompt("a", "q", [], answer="42"), Prompt("b", "q", [], answer="7")]
        rewards = await client.score_batch(prompts, ["42", "8"])
        await client.close()
        assert [(r.value, r.correct) for r in rewards] == [(1.0, True), (0.0, False)]
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_training_run_scores_through_a_remote_reward_server(ray_local, tmp_path, monkeypatch):
    # `asyncrl serve-reward --fn task` in its own process; the job only names its address and
    # the token's variable (reward.type=remote), and its reward workers score through it.
    from asyncrl.config import load_config
    from asyncrl.controller.run import run
    from asyncrl.metrics.report import read_metrics

    port = _free_port()
    monkeypatch.setenv("ASYNCRL_TEST_TOKEN", TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncrl", "serve-reward", "--fn", "task", "--port", str(port),
         "--token-env", "ASYNCRL_TEST_TOKEN", "-q"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving reward task" in proc.stdout.readline(), proc.poll()
        config = load_config(None, [
            f"run.output_dir={tmp_path}", "run.name=remote", "run.steps=3", "run.eval_every=3",
            "model.warm_start.steps=5", "data.eval_size=8", "rollout.prompts_per_step=4",
            "rollout.n_samples=4", "reward.type=remote", f"reward.address=127.0.0.1:{port}",
            "reward.token_env=ASYNCRL_TEST_TOKEN",
        ])
        result = run(config, progress=False)
        rows = [r for r in read_metrics(result.run_dir / "metrics.jsonl") if "reward/mean" in r]
        assert len(rows) == 3 and rows[-1]["reward/scored"] >= 3 * 16
        assert all(0.0 <= r["reward/mean"] <= 1.0 for r in rows)
        assert not any(k.startswith("reward/failures/") for k in rows[-1])
        assert result.ledger["balance"] == 0
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(15)
        proc.stdout.close()
        proc.stderr.close()


def test_a_remote_reward_with_a_wrong_token_fails_before_any_actor_starts(tmp_path, monkeypatch):
    from asyncrl.config import load_config
    from asyncrl.controller.run import prepare

    async def serve_and_prepare():
        server = RewardServer(TaskReward(SortDigits()), token=TOKEN)
        port = await server.start()
        config = load_config(None, [
            f"run.output_dir={tmp_path}", "run.name=badtoken", "reward.type=remote",
            f"reward.address=127.0.0.1:{port}", "reward.token_env=ASYNCRL_WRONG_TOKEN"])
        try:
            with pytest.raises(RemoteRewardAuthError, match="ASYNCRL_WRONG_TOKEN"):
                await asyncio.to_thread(prepare, config)
        finally:
            await server.stop(0)

    monkeypatch.setenv("ASYNCRL_WRONG_TOKEN", "not-the-token")
    asyncio.run(serve_and_prepare())
