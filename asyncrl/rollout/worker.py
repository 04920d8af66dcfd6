"""RolloutWorker: the body of one rollout actor, holding one engine.

A plain class with async methods; `asyncrl.cluster` makes it a Ray actor. It decodes response
text (so rewards never need the tokenizer) and loads weights it is handed.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AutoTokenizer

from asyncrl.rollout.engine import build_engine
from asyncrl.types import Sample, SamplingParams


class RolloutWorker:
    def __init__(self, model_path: str, engine: str, *, seed: int, num_threads: int = 1) -> None:
        torch.set_num_threads(num_threads)
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._engine = build_engine(engine, model_path, seed=seed)

    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        out = await self._engine.generate(samples, params)
        for s in out:
            s.response_text = self._tokenizer.decode(s.response_ids, skip_special_tokens=True)
        return out

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        await self._engine.abort(sample_ids)

    async def update_weights(
        self, named_tensors: dict[str, torch.Tensor], policy_version: int
    ) -> int:
        await self._engine.update_weights(named_tensors.items(), policy_version)
        return self._engine.policy_version

    async def policy_version(self) -> int:
        return self._engine.policy_version

    async def close(self) -> None:
        await self._engine.close()
