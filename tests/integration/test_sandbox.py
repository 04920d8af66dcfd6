"""The code sandbox against hostile programs, in each isolation mode this machine offers:
infinite loops, network access, fork bombs, memory and disk hogs, forged results. After all of
that, a correct solution still scores as passing.

Modes: "auto" (namespaces where the kernel allows them), "hook" (the audit-hook fallback) and,
when the tests run as root, "auto" as an unprivileged user (uid 65534 through setpriv, with the
system Python), which exercises the user-namespace path that non-root deployments take.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from asyncrl.cluster.actors import LocalRef
from asyncrl.reward import CodeReward
from asyncrl.reward.builtin._harness import UID_BASE
from asyncrl.reward.builtin.sandbox import Sandbox, SandboxError
from asyncrl.reward.pool import RewardPool, RewardSpec, RewardWorker
from asyncrl.types import Prompt, Sample

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]


def _unprivileged_python(directory: Path) -> str | None:
    """A wrapper that runs the sandbox's Python as uid 65534 (root only)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
        return None
    wrapper = directory / "python-as-nobody"
    wrapper.write_text(f"#!/bin/sh\nchown {NOBODY}:{NOBODY} . && exec env -u PWD "  # sh sets PWD
                       f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups "
                       f'{SYSTEM_PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(scope="module", params=["auto", "hook", "auto-unprivileged"])
def mode(request, tmp_path_factory):
    """(network mode, python) for Sandbox; skips the unprivileged mode where it cannot run."""
    if request.param == "auto-unprivileged":
        python = _unprivileged_python(tmp_path_factory.mktemp("wrapper"))
        if python is None:
            pytest.skip("needs root, setpriv and a system python3 to run as another user")
        return "auto", python
    return request.param, sys.executable


def _sandbox(mode, **limits) -> Sandbox:
    network, python = mode
    return Sandbox(network=network, python=python, **{"timeout_s": 1.0, **limits})


def _leftovers() -> list[int]:
    """Live or zombie processes of any sandbox: by uid (root harnesses switch to their own uid,
    the unprivileged mode runs as 65534) or by working directory."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            uid = int(status.split("\nUid:")[1].split()[0])
            cwd = os.readlink(f"/proc/{entry}/cwd") if uid in (os.getuid(),) else ""
        except (OSError, IndexError):
            continue
        if uid >= UID_BASE or uid == NOBODY or "asyncrl-sandbox-" in cwd:
            found.append(int(entry))
    return found


def _no_leftovers(grace_s: float = 0.5) -> bool:
    end = time.monotonic() + grace_s
    while _leftovers() and time.monotonic() < end:
        time.sleep(0.02)
    return not _leftovers()


async def test_a_solution_is_scored_per_test_and_isolation_is_reported(mode):
    result = await _sandbox(mode).run(ADD, ADD_TESTS)
    assert (result.passed, result.total, result.outcome) == (2, 3, "done")
    if mode[0] == "hook":
        assert result.isolation.startswith("hook")
    elif mode[1] != sys.executable:  # unprivileged: a user namespace is what makes it work
        assert result.isolation == "netns+pidns+userns"
    assert result.duration_s < 1.0


async def test_an_infinite_loop_is_killed_at_the_deadline(mode):
    start = time.monotonic()
    result = await _sandbox(mode, timeout_s=1.0).run("while True:\n    pass\n", ADD_TESTS)
    assert result.outcome == "timeout" and result.passed == 0
    assert time.monotonic() - start < 2.5
    assert _no_leftovers()


async def test_the_cpu_time_limit_kills_a_busy_loop_long_before_the_wall_clock(mode):
    # RLIMIT_CPU at 1 s, wall clock at 60 s: only the CPU limit can end this program
    result = await _sandbox(mode, timeout_s=60.0, cpu_s=1).run("while True:\n    pass\n",
                                                                ADD_TESTS)
    # The soft limit sends SIGXCPU, which PID 1 of a PID namespace ignores (the kernel drops
    # default-action signals to a namespace's init), so there the hard limit's SIGKILL (one
    # CPU second later) ends it: the outcome says which, and never "timeout".
    killer = signal.SIGKILL if "pidns" in result.isolation else signal.SIGXCPU
    assert result.outcome == f"exit:{128 + killer}", (result.outcome, result.stderr)
    assert result.passed == 0 and result.duration_s >= 1.0
    assert _no_leftovers()


async def test_network_is_refused_even_to_a_local_listener(mode):
    # the test listens on the host's loopback; the program must not reach it
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (
            "import socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    error = None\n"
            "except OSError as exc:\n"
            "    error = exc\n"
        )
        tests = ["assert isinstance(error, OSError)"]
        if mode[0] != "hook":  # a fresh network namespace: only a loopback device, down
            tests.append("assert [name for _, name in socket.if_nameindex()] == ['lo']")
        result = await _sandbox(mode).run(code, tests)
        assert result.outcome == "done" and result.passed == len(tests), result.stderr
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


async def test_a_fork_bomb_is_bounded_by_nproc_and_everything_is_reaped(mode):
    # fork sleepers until fork fails: the count shows the RLIMIT_NPROC bound
    counting = (
        "import errno, os, time\n"
        "children, failure = 0, None\n"
        "while children < 1000:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as exc:\n"
        "        failure = exc.errno\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    children += 1\n"
    )
    result = await _sandbox(mode, nproc=8).run(counting, [
        f"assert failure == {errno.EAGAIN}, failure", "assert children < 8, children"])
    assert result.passed == 2, result.stderr
    assert _no_leftovers()  # the sleepers outlived the program: killed and reaped anyway
    # a real bomb: every process forks forever, ignoring failures, until the deadline
    bomb = ("import os\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    start = time.monotonic()
    result = await _sandbox(mode, nproc=8, timeout_s=1.0).run(bomb, ["pass"])
    assert result.outcome == "timeout" and time.monotonic() - start < 3.0
    assert _no_leftovers()


async def test_memory_is_capped(mode):
    code = ("try:\n    hog = bytearray(2 << 30)\n    capped = False\n"
            "except MemoryError:\n    capped = True\n")
    result = await _sandbox(mode, memory_mb=512).run(code, ["assert capped"])
    assert result.passed == 1, result.stderr


async def test_a_huge_file_cannot_be_written(mode):
    code = ("import os\n"
            "try:\n"
            "    with open('big', 'wb') as f:\n"
            "        f.write(b'x' * (64 << 20))\n"
            "    error = None\n"
            "except OSError as exc:\n"
            "    error = exc.errno\n")
    tests = [f"assert error == {errno.EFBIG}, error", "assert os.path.getsize('big') <= 8 << 20"]
    result = await _sandbox(mode, fsize_mb=8).run(code, tests)
    assert result.passed == 2, result.stderr


async def test_environment_is_stripped_and_the_directory_fresh(mode, monkeypatch):
    monkeypatch.setenv("ASYNCRL_TEST_SECRET", "do-not-leak")
    code = "import os\nkeys = set(os.environ)\nfiles = os.listdir('.')\ncwd = os.getcwd()\n"
    tests = ["assert 'ASYNCRL_TEST_SECRET' not in keys, keys",
             "assert keys <= {'PATH', 'LANG', 'HOME', 'TMPDIR', 'LC_CTYPE'}, keys",
             "assert files == [], files",
             "assert 'asyncrl-sandbox-' in cwd and os.environ['HOME'] == cwd"]
    result = await _sandbox(mode).run(code, tests)
    assert result.passed == 4, result.stderr


async def test_the_program_cannot_forge_results(mode):
    # it writes pass lines to every descriptor it can, but cannot know the run's nonce
    code = ("import os\n"
            "for fd in range(1, 20):\n"
            "    try:\n"
            "        os.write(fd, b'x test 0 pass\\nx test 1 pass\\nx done\\n')\n"
            "    except OSError:\n"
            "        pass\n")
    result = await _sandbox(mode).run(code, ["assert False", "assert False"])
    assert result.passed == 0 and result.outcome == "done"


async def test_one_reward_pool_scores_every_attack_as_zero_then_a_correct_solution_as_right():
    # the same pool object (in-process worker, as with reward.num_workers=0) throughout
    spec = RewardSpec("code", kwargs={"timeout_s": 1.0, "nproc": 8, "memory_mb": 512})
    pool = RewardPool(lambda i: LocalRef(RewardWorker(spec, concurrency=4, timeout_s=60.0),
                                         f"reward-{i}"),
                      num_workers=1, batch_size=8, call_timeout_s=300.0, retries=0,
                      backoff_s=0.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        attacks = {
            "infinite loop": "while True:\n    pass\n",
            "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n"
                         "    except OSError:\n        pass\n",
            "memory hog": "hog = []\nwhile True:\n    hog.append(bytearray(1 << 24))\n",
            "socket": "import socket\nsocket.create_connection(('127.0.0.1', "
                      f"{server.getsockname()[1]}), timeout=1).sendall(b'leak')\n{ADD}",
        }
        scored = await _pool_score(pool, list(attacks.values()))
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    for name, reward in zip(attacks, scored, strict=True):
        # the program's own fault: an OK reward of 0, not a reward failure
        assert reward.ok and reward.value == 0.0 and reward.correct is False, (name, reward)
    assert _no_leftovers()
    [right] = await _pool_score(pool, [f"```python\n{ADD}```"])
    assert right.ok and right.value == 1.0 and right.correct is True
    assert pool.failures == {} and pool.workers_replaced == 0 and pool.scored == 5
    await pool.workers[0].close()


async def _pool_score(pool: RewardPool, responses: list[str]) -> list:
    prompt = Prompt("add", "write add", [1], metadata={"tests": ADD_TESTS[:2]})
    samples = [Sample(f"add/{i}", "add", [1], 0) for i in range(len(responses))]
    for sample, response in zip(samples, responses, strict=True):
        sample.response_text = response
    await pool.score(samples, {"add": prompt})
    return [s.reward for s in samples]


async def test_a_harness_that_cannot_start_is_a_sandbox_error():
    with pytest.raises(SandboxError, match="did not start the program"):
        await Sandbox(python="/bin/false").run(ADD, ADD_TESTS)


async def test_after_all_that_the_code_reward_still_scores_a_correct_solution():
    reward = CodeReward(timeout_s=2.0)
    await reward.check()
    full = Prompt("p", "write add", [], metadata={"tests": ADD_TESTS[:2]})
    response = f"Here you go:\n```python\n{ADD}```\n"
    scored = await reward.score(full, response)
    assert scored.ok and scored.value == 1.0 and scored.correct is True
    partial = await reward.score(Prompt("p", "", [], metadata={"tests": ADD_TESTS}), response)
    assert partial.value == pytest.approx(2 / 3) and partial.correct is False
    hang = await reward.score(full, "while True: pass")  # the program's fault: a score of 0
    assert hang.ok and hang.value == 0.0
    broken = CodeReward()
    broken.sandbox = Sandbox(python="/bin/false")
    failed = await broken.score(full, response)
    assert not failed.ok and failed.error.startswith("crash: ")
    assert not (await reward.score(Prompt("p", "", []), response)).ok  # no tests: a failure
