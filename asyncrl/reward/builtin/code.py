"""Model-written Python run against tests in the sandbox (`sandbox.py`).

How a prompt carries its tests:

- `Prompt.metadata["tests"]`: a list of Python snippets, one test each (typically `assert`
  statements), run in order in the namespace the solution defined. A JSONL prompt file gets it
  from a `"tests": [...]` field on the line (every field other than the prompt and the answer
  goes to `metadata`).
- otherwise `Prompt.answer`: one test script (a single test).

The code is the last fenced block of the response (```python ... ``` or ``` ... ```), or the whole
response if it has no fence (`extract: raw` always takes the whole response).

value = fraction of tests passed (partial credit, so a group rarely ties); correct = all passed.
A program that raises at import, loops past the deadline, runs out of memory or is killed
passes the tests it reported before that and fails the rest: that is the program's result, not
a reward failure (scoring it as a failure would drop the sample, and the policy would never
learn that hanging is wrong). Failures are the sandbox's own: "crash: ..." when the harness
could not start the program, "error: ..." for a prompt without tests.

The sandbox protects the machine, not the reward: tests run in the program's own process, so a
program can game assert-style tests (an object whose `__eq__` is always True, or a patched
builtin). Results travel with a per-run nonce, so stray prints cannot forge them by accident.
Tests that compare serialised values (`assert repr(f(2)) == "4"`) are harder to game.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from asyncrl.errors import PluginError
from asyncrl.reward.builtin.sandbox import Network, Sandbox, SandboxError
from asyncrl.types import Prompt, Reward

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def fenced_blocks(response: str) -> list[str]:
    """The fenced code blocks of `response` (```python ... ``` or ``` ... ```), in order."""
    return _FENCE.findall(response)


def extract_code(response: str) -> str:
    """The last fenced code block of `response`, or all of it when there is none."""
    blocks = fenced_blocks(response)
    return blocks[-1] if blocks else response


def prompt_tests(prompt: Prompt) -> list[str] | None:
    """The prompt's tests (see the module docstring), or None if it carries none."""
    tests = prompt.metadata.get("tests")
    if tests is not None:
        if isinstance(tests, str):
            return [tests]
        if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
            return list(tests)
        return None
    return [prompt.answer] if prompt.answer else None


class CodeReward:
    """Fraction of a prompt's tests that the response's code passes, in the sandbox.

    Args:
        timeout_s: wall-clock limit for the solution and all its tests together.
        memory_mb: address-space limit of the program (RLIMIT_AS).
        fsize_mb: largest file it may write (RLIMIT_FSIZE).
        nproc: most processes/threads it may hold (RLIMIT_NPROC).
        network: "auto", "namespace" or "hook" (see `sandbox.Sandbox`).
        extract: "fenced" (last fenced block, else everything) or "raw" (everything).
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 1024, fsize_mb: int = 16,
                 nproc: int = 32, network: Network = "auto",
                 extract: Literal["fenced", "raw"] = "fenced") -> None:
        if extract not in ("fenced", "raw"):
            raise ValueError(f"extract: must be 'fenced' or 'raw' (got {extract!r})")
        self.sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, fsize_mb=fsize_mb,
                               nproc=nproc, network=network)
        self._extract = extract

    async def score(self, prompt: Prompt, response: str) -> Reward:
        tests = prompt_tests(prompt)
        if not tests:
            return Reward.failed("error: the prompt carries no tests (Prompt.metadata['tests'] "
                                 "as a list of strings, or Prompt.answer as a test script)")
        code = extract_code(response) if self._extract == "fenced" else response
        try:
            result = await self.sandbox.run(code, tests)
        except SandboxError as exc:
            return Reward.failed(f"crash: {exc}")
        except OSError as exc:  # could not even start the interpreter
            return Reward.failed(f"crash: cannot start the sandbox: {exc}")
        return Reward(value=result.passed / result.total, correct=result.all_passed)

    async def check(self) -> None:
        """Run a one-line program once (the driver calls this before any actor starts)."""
        try:
            result = await self.sandbox.run("x = 1", ["assert x == 1"])
        except (SandboxError, OSError) as exc:
            raise PluginError(f"reward.fn: 'code': the sandbox does not work here: {exc}"
                              ) from None
        if not result.all_passed:
            raise PluginError(f"reward.fn: 'code': the sandbox failed a trivial program "
                              f"({result.outcome}): {result.stderr[-300:]}")
        log.info("code sandbox ready: isolation %s, %.0f ms per run", result.isolation,
                 1000 * result.duration_s)
