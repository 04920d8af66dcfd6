"""`rollout.workflow: python_tool`: the model runs Python and reads what it printed.

A model turn that holds a fenced code block (```python ... ```, the last one if several) is a
tool call: the code runs in the code reward's sandbox (asyncrl.reward.builtin.sandbox: its own
process, resource limits, no network, a wall-clock kill), and what it printed (stdout, then
stderr, the last `max_output_chars` characters) comes back as the observation

    <output>
    <printed text>
    </output>

(tags, not a fence: the `code` reward, which grades the last fenced block of the transcript,
then grades the model's last program). A turn without a code block is the final answer: the
episode is done. A program that raises, loops or runs out of memory is the model's result (its
error line or a `timeout` line is the observation); only a sandbox that cannot start a program
is an error, raised.
"""

from __future__ import annotations

from typing import Any

from asyncrl.errors import PluginError
from asyncrl.reward.builtin.code import fenced_blocks
from asyncrl.reward.builtin.sandbox import Network, Sandbox, SandboxError
from asyncrl.rollout.workflow import Step
from asyncrl.types import Prompt


class PythonTool:
    """Args:
    timeout_s, memory_mb, network: the sandbox's limits (see `sandbox.Sandbox`).
    max_output_chars: the most printed characters an observation carries (the last ones).
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512,
                 max_output_chars: int = 1000, network: Network = "auto") -> None:
        if isinstance(max_output_chars, bool) or not isinstance(max_output_chars, int) or (
                max_output_chars < 1):
            raise ValueError(f"max_output_chars: must be a positive int (got {max_output_chars!r})")
        self.sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, network=network)
        self.max_output_chars = max_output_chars

    def start(self, prompt: Prompt) -> dict[str, Any]:
        return {"calls": 0}

    async def step(self, turn: str, state: dict[str, Any]) -> Step:
        blocks = fenced_blocks(turn)
        if not blocks:
            return Step(done=True)
        result = await self.sandbox.run(blocks[-1], [])
        state["calls"] += 1
        printed = result.stderr[-self.max_output_chars:]  # the harness sends prints to stderr
        if result.outcome == "timeout":
            printed += f"\ntimeout: killed after {self.sandbox.timeout_s:g}s"
        return Step(observation=f"\n<output>\n{printed}</output>\n")

    async def check(self) -> None:
        """Run a one-line program once (the driver calls this before any actor starts)."""
        try:
            result = await self.sandbox.run("print(6 * 7)", [])
        except (SandboxError, OSError) as exc:
            raise PluginError(f"rollout.workflow: 'python_tool': the sandbox does not work "
                              f"here: {exc}") from None
        if result.stderr != "42\n":
            raise PluginError(f"rollout.workflow: 'python_tool': the sandbox ran print(6 * 7) "
                              f"but printed {result.stderr[-300:]!r} ({result.outcome})")
