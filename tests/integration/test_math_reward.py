"""The math reward with real math-verify in real worker processes: equivalences, math-verify's own
timeout, and the wall-clock backstop that kills a stuck worker while the pool keeps serving."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import pytest_asyncio

from asyncrl.reward import MathReward
from asyncrl.reward.builtin.procpool import ProcessPool, WorkerCrashed
from asyncrl.types import Prompt, RewardStatus

pytestmark = pytest.mark.asyncio(loop_scope="module")
# ten million digits: math-verify's comparison runs until its SIGALRM (or the backstop)
HUGE = r"\boxed{10^{10^{7}}}"
# quadratic LaTeX scanning: about 25 s of parsing, in many short steps
SLOW_PARSE = r"\[" * 20_000


def _prompt(answer: str | None) -> Prompt:
    return Prompt(prompt_id="p", text="", input_ids=[], answer=answer)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def math_reward():
    reward = MathReward(workers=2, timeout_s=4.0, verify_timeout_s=1)
    await reward.check()  # what the driver runs; also starts the workers outside timed tests
    yield reward
    pids = reward.pool.pids
    await reward.close()
    assert not any(map(_alive, pids))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stuck_reward():
    # math-verify's own timeout disabled: the backstop alone stops a call, as it must for a
    # call stuck in C code where SIGALRM handlers never run
    reward = MathReward(workers=2, timeout_s=1.0, verify_timeout_s=None)
    await reward.score(_prompt("1"), "1")
    yield reward
    await reward.close()


@pytest.mark.parametrize(
    "answer, response, correct",
    [
        ("0.5", r"so it is \boxed{1/2}", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1/3", "0.333", False),
        ("0.333", "1/3", False),
        (r"$\frac{1}{2}$", "0.5", True),
        ("5", "no answer here", False),  # nothing parseable: wrong, not a failure
    ],
)
async def test_math_verify_equivalence(math_reward, answer, response, correct):
    reward = await math_reward.score(_prompt(answer), response)
    assert reward.ok and reward.correct is correct and reward.value == float(correct)


async def test_concurrent_scores_use_both_workers(math_reward):
    pairs = [("0.5", r"\boxed{1/2}"), ("2", "3")] * 6
    start = time.monotonic()
    rewards = await asyncio.gather(*(math_reward.score(_prompt(a), r) for a, r in pairs))
    assert [r.value for r in rewards] == [1.0, 0.0] * 6
    assert time.monotonic() - start < 2.0


async def test_math_verify_timeout_is_a_timeout_failure_and_keeps_the_worker(math_reward):
    pids, replaced = sorted(math_reward.pool.pids), math_reward.pool.replaced
    start = time.monotonic()
    reward = await math_reward.score(_prompt("5"), HUGE)
    assert reward.status is RewardStatus.TIMEOUT and reward.error.startswith("timeout: ")
    assert "verify_timeout_s=1s" in reward.error
    assert 0.9 < time.monotonic() - start < 3.0
    assert sorted(math_reward.pool.pids) == pids and math_reward.pool.replaced == replaced


async def test_a_missing_answer_or_unparseable_reference_is_an_error_failure(math_reward):
    for answer in (None, "no math here"):
        reward = await math_reward.score(_prompt(answer), "1")
        assert not reward.ok and reward.error.startswith("error: ")


async def test_backstop_kills_a_stuck_worker_and_the_pool_keeps_serving(stuck_reward):
    pool = stuck_reward.pool
    before = set(pool.pids)
    start = time.monotonic()
    stuck_call = asyncio.create_task(stuck_reward.score(_prompt("5"), SLOW_PARSE))
    await asyncio.sleep(0.1)
    served = await stuck_reward.score(_prompt("0.5"), r"\frac{1}{2}")
    assert served.correct is True and not stuck_call.done()  # the other worker answered
    stuck = await stuck_call
    assert stuck.status is RewardStatus.TIMEOUT and "backstop" in stuck.error
    assert 0.9 < time.monotonic() - start < 2.5
    killed = before - set(pool.pids)
    assert len(killed) == 1 and not _alive(killed.pop())  # killed and reaped
    deadline = time.monotonic() + 3.0
    while len(pool.pids) < 2 and time.monotonic() < deadline:  # the replacement starts
        await asyncio.sleep(0.05)
    assert len(pool.pids) == 2 and pool.replaced == 1
    again = await asyncio.gather(*(stuck_reward.score(_prompt("2"), "2") for _ in range(4)))
    assert all(r.correct for r in again)


HANDLER = """
import os

def handle(action):
    if action == "exit":
        os._exit(3)  # dies mid-call, as a segfaulting library would
    if action == "raise":
        raise ValueError("bad input")
    return os.getpid()
"""


async def test_a_worker_that_dies_mid_call_is_replaced(tmp_path):
    handler = tmp_path / "handler.py"
    handler.write_text(HANDLER)
    pool = ProcessPool(handler, size=1)
    try:
        first = await pool.call("pid", timeout_s=5)
        with pytest.raises(RuntimeError, match="ValueError: bad input"):
            await pool.call("raise", timeout_s=5)  # the handler's error: the worker lives on
        assert await pool.call("pid", timeout_s=5) == first
        with pytest.raises(WorkerCrashed, match="exit code 3"):
            await pool.call("exit", timeout_s=5)
        second = await pool.call("pid", timeout_s=10)  # waits for the replacement
        assert second != first and not _alive(first) and pool.replaced == 1
    finally:
        await pool.close()
    assert not _alive(second)


async def test_workers_that_cannot_start_fail_calls_with_the_reason(tmp_path):
    handler = tmp_path / "handler.py"
    handler.write_text("import no_such_module_here\n")
    pool = ProcessPool(handler, size=2)
    for _ in range(2):  # every waiting call gets the reason, none hangs
        with pytest.raises(WorkerCrashed, match="ModuleNotFoundError"):
            await pool.call("pid", timeout_s=5)
    await pool.close()
