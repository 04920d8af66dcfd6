"""The `RolloutEngine` protocol and the registry of engine backends.

An engine continues samples: each request is a `Sample` whose `prompt_ids + response_ids` is the
context so far (empty response for a fresh request, partial tokens for a resumed one). It
generates until EOS, the sample's `max_new_tokens` budget, or an abort, and records for every
new token its logprob and the policy version of the weights that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from asyncrl.types import FinishReason, Sample, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    @property
    def policy_version(self) -> int:
        """The version of the weights the engine holds now."""
        ...

    @property
    def compute_seconds(self) -> float | None:
        """Seconds the engine has spent computing (prefill, decode, sampling) since it started,
        or None where the engine cannot see it; the overhead benchmark subtracts it."""
        ...

    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        """Continue `samples` and return them when each is finished or aborted.

        Concurrent calls are batched together by the engine. A returned sample has
        `finish_reason` STOP, LENGTH or ABORT; an aborted one keeps every token generated so far.
        """
        ...

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        """Interrupt these in-flight samples (all when None); their `generate` calls return them
        with finish_reason ABORT. Unknown or already finished ids are ignored."""
        ...

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], policy_version: int
    ) -> None:
        """Load new weights (HF names) between decoding steps; later tokens carry the version."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine generates with, under HF names (checks and debugging)."""
        ...

    async def close(self) -> None: ...


def to_continue(engine: str, samples: list[Sample], params: SamplingParams) -> list[Sample]:
    """Check a `generate` request and return the samples that still need tokens: one already
    ended by EOS stays STOP, one whose budget is spent becomes LENGTH (both returned as they
    are). Bad input is a ValueError naming the engine and the field."""
    if params.temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be >= 0 (got {params.temperature})")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1] (got {params.top_p})")
    if params.top_k < 0:
        raise ValueError(f"SamplingParams.top_k must be >= 0, 0 = off (got {params.top_k})")
    todo = []
    for s in samples:
        if not s.prompt_ids and not s.response_ids:
            raise ValueError(f"{engine}.generate: sample {s.sample_id!r} has no prompt")
        if s.finish_reason is FinishReason.STOP:
            continue
        if s.remaining_tokens <= 0:
            s.finish_reason = FinishReason.LENGTH
            continue
        todo.append(s)
    return todo


ENGINES = ("cpu", "vllm")


def build_engine(
    kind: str, model_path: str, *, seed: int, vllm_options: Mapping[str, Any] | None = None
) -> RolloutEngine:
    """Construct the engine named by `rollout.engine` (its heavy stack is imported here only).

    `vllm_options` are `VllmEngine` keyword arguments (`rollout.vllm` in the job config); the
    vllm engine's defaults suit the CPU build.
    """
    if kind == "cpu":
        from asyncrl.rollout.engine.cpu import CpuEngine

        return CpuEngine(model_path, seed=seed)
    if kind == "vllm":
        from asyncrl.rollout.engine.vllm import VllmEngine

        return VllmEngine(model_path, seed=seed, **dict(vllm_options or {}))
    raise ValueError(f"rollout.engine: unknown engine {kind!r}; known: {', '.join(ENGINES)}")
