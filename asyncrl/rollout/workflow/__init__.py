"""Multi-turn workflows: the `Workflow` (environment) protocol, its registry and its resolver.

An episode alternates model turns and environment turns, and stays ONE `Sample`: the model's
tokens and the environment's (tool output, observations) interleaved in `response_ids`, with
`response_mask` False on the environment's (never trained). The loop lives in `episode.py`
and runs inside the RolloutWorker, which owns the engine and the tokenizer.

A workflow is a registered name (`WORKFLOWS`) or a `package.module:factory` path whose target
(a class or a function) is called with `rollout.workflow_kwargs` and returns an object with

    start(prompt: Prompt) -> dict     # the environment's initial state (picklable), per sample
    step(turn: str, state: dict) -> Step | Awaitable[Step]
                                      # after each model turn (its decoded text); may update
                                      # `state` in place; Step(observation=..., done=...)

`start` runs in the driver (which knows the prompt), `step` in the worker; the state travels in
`Sample.episode`, so an aborted episode resumes anywhere, and checkpoints keep it. An optional
`async check()` is run once in the driver before any actor starts (python_tool's sandbox).

What the reward sees: `response_text` is the whole transcript (model turns and observations,
in order, special tokens skipped); the reward pool scores it like any single-turn answer.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from asyncrl.errors import PluginError
from asyncrl.plugins import resolve
from asyncrl.types import Prompt


@dataclass(frozen=True, slots=True)
class Step:
    """The environment's answer to one model turn: text to append (never trained), or done."""

    observation: str = ""
    done: bool = False


@runtime_checkable
class Workflow(Protocol):
    def start(self, prompt: Prompt) -> dict[str, Any]: ...

    def step(self, turn: str, state: dict[str, Any]) -> Any: ...


def _python_tool(**kwargs: Any) -> Workflow:
    from asyncrl.rollout.workflow.python_tool import PythonTool

    return PythonTool(**kwargs)


def _guess_number(**kwargs: Any) -> Workflow:
    from asyncrl.rollout.workflow.guess_number import GuessNumberEnv

    return GuessNumberEnv(**kwargs)


WORKFLOWS = {"python_tool": _python_tool, "guess_number": _guess_number}


def build_workflow(spec: str, kwargs: dict[str, Any] | None = None) -> Workflow:
    """Resolve `rollout.workflow` and build it with `rollout.workflow_kwargs`.

    Raises:
        PluginError: unknown name or path, a target that is not callable, kwargs it does not
            take, or a built object without `start(prompt)` and `step(turn, state)`.
    """
    target = resolve("rollout.workflow", spec, WORKFLOWS)
    if not callable(target):
        raise PluginError(f"rollout.workflow: {spec!r} is not callable; point it at a class or "
                          "a factory function returning a workflow")
    try:
        workflow = target(**dict(kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise PluginError(f"rollout.workflow_kwargs: {spec!r} rejected {dict(kwargs or {})}: "
                          f"{exc}") from None
    for method, arity in (("start", 1), ("step", 2)):
        fn = getattr(workflow, method, None)
        if not callable(fn) or not _takes(fn, arity):
            raise PluginError(
                f"rollout.workflow: {spec!r} built a {type(workflow).__name__} without a "
                f"{method}() taking {arity} argument(s); a workflow needs start(prompt) -> dict "
                "and step(turn, state) -> Step (see asyncrl.rollout.workflow)")
    return workflow


def _takes(fn: Any, arity: int) -> bool:
    try:
        inspect.signature(fn).bind(*range(arity))
    except TypeError:
        return False
    except ValueError:  # no signature to inspect (a builtin): trust it
        return True
    return True


@dataclass(slots=True)
class WorkflowSpec:
    """What a worker builds in its own process (picklable), plus the episode budgets.

    Attributes:
        spec: `rollout.workflow`.
        kwargs: `rollout.workflow_kwargs`.
        max_turns: model turns per episode (`rollout.max_turns`).
        max_turn_tokens: model tokens per turn (`rollout.max_turn_tokens`); None: what is left
            of the episode's budget (`rollout.max_new_tokens`, model and environment tokens).
    """

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    max_turn_tokens: int | None = None

    def __call__(self) -> Workflow:
        return build_workflow(self.spec, self.kwargs)
