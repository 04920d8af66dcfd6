"""Math answers checked with math-verify (parse both sides, then symbolic/numeric equivalence).

math-verify times itself out with SIGALRM, which works only in a process's main thread, and some
inputs run for minutes (huge powers, factorials, regex-heavy LaTeX). So verification runs in a
small pool of worker processes (`procpool.ProcessPool`: fresh interpreters running
`_math_worker.py`), each call in a worker's main thread:

| budget                 | enforced by                                  | outcome            |
|------------------------|----------------------------------------------|--------------------|
| `verify_timeout_s`     | math-verify's SIGALRM, for parse and verify  | "timeout: ..."     |
| `timeout_s` (backstop) | the pool's wall clock: worker killed, replaced | "timeout: ..."   |

(both are `Reward.failed(..., RewardStatus.TIMEOUT)`).

The backstop catches what SIGALRM cannot: a call stuck in C code, where Python signal handlers
never run. Keep `timeout_s` above twice `verify_timeout_s` (parse + verify) and below the
RewardPool's `reward.timeout_s`.

value = 1.0 if math-verify finds the response equivalent to `Prompt.answer`, else 0.0. A response
with nothing parseable is a wrong answer (0). A math-verify error while comparing is a failure
("error: ..."), as is a reference answer it cannot parse: neither says the response is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asyncrl.errors import PluginError
from asyncrl.reward.builtin.procpool import CallTimeout, ProcessPool, WorkerCrashed
from asyncrl.types import Prompt, Reward, RewardStatus

WORKER = Path(__file__).with_name("_math_worker.py")  # the workers' handler


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name}: must be a positive number (got {value!r})")


class MathReward:
    """math-verify equivalence of the response and `Prompt.answer`, in killable workers.

    Args:
        workers: worker processes (each holds sympy and math-verify, about 200 MB).
        timeout_s: wall-clock backstop per verification; past it the worker is killed.
        verify_timeout_s: math-verify's own timeout in whole seconds, for each of parsing and
            comparing; None disables it (the backstop alone then bounds a call).
        memory_mb: address-space limit of each worker (RLIMIT_AS).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, verify_timeout_s: int | None = 3,
                 memory_mb: int = 4096) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: must be a positive integer (got {workers!r})")
        _positive("timeout_s", timeout_s)
        if verify_timeout_s is not None:
            if isinstance(verify_timeout_s, bool) or not isinstance(verify_timeout_s, int) \
                    or verify_timeout_s < 1:
                raise ValueError("verify_timeout_s: must be a whole number of seconds >= 1 "
                                 "(math-verify uses signal.alarm), or null "
                                 f"(got {verify_timeout_s!r})")
            if timeout_s <= 2 * verify_timeout_s:
                raise ValueError(f"timeout_s: must exceed 2 × verify_timeout_s "
                                 f"(= {2 * verify_timeout_s}s: parse + compare), got {timeout_s}")
        _positive("memory_mb", memory_mb)
        self.timeout_s, self.verify_timeout_s = float(timeout_s), verify_timeout_s
        self.pool = ProcessPool(WORKER, size=workers, memory_mb=int(memory_mb))

    async def score(self, prompt: Prompt, response: str) -> Reward:
        if prompt.answer is None:
            return Reward.failed("error: the prompt has no reference answer (Prompt.answer)")
        try:
            status, out = await self.pool.call(prompt.answer, response, self.verify_timeout_s,
                                               timeout_s=self.timeout_s)
        except CallTimeout:
            return Reward.failed(f"timeout: math-verify ran past the {self.timeout_s}s backstop "
                                 "(timeout_s); its worker was killed", RewardStatus.TIMEOUT)
        except (WorkerCrashed, RuntimeError) as exc:
            return Reward.failed(f"crash: math-verify worker: {exc}")
        if status == "timeout":
            return Reward.failed(f"timeout: {out}", RewardStatus.TIMEOUT)
        if status == "error":
            return Reward.failed(f"error: {out}")
        return Reward(value=float(out), correct=out)

    async def check(self) -> None:
        """Verify one pair in a worker (the driver calls this before any actor starts), so a
        broken math-verify install (e.g. an antlr4 runtime it rejects) fails the job early."""
        reward = await self.score(Prompt(prompt_id="check", text="", input_ids=[], answer="1/2"),
                                  r"\boxed{0.5}")
        if not reward.correct:
            raise PluginError(f"reward.fn: 'math' does not work here: {reward.error or reward}")

    async def close(self) -> None:
        await self.pool.close()
