"""RolloutWorker: the body of one rollout actor, holding one engine.

A plain class with async methods; `asyncrl.cluster` makes it a Ray actor. It decodes response
text (so rewards never need the tokenizer) and receives weights from the trainer's broadcast.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import torch
from transformers import AutoTokenizer

from asyncrl.rollout.engine import build_engine
from asyncrl.sync.broadcast import WeightBroadcast
from asyncrl.types import Sample, SamplingParams


class RolloutWorker:
    def __init__(self, model_path: str, engine: str, *, seed: int, num_threads: int = 1,
                 vllm_options: dict | None = None) -> None:
        torch.set_num_threads(num_threads)
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._engine = build_engine(engine, model_path, seed=seed, vllm_options=vllm_options)
        self._broadcast: WeightBroadcast | None = None

    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        out = await self._engine.generate(samples, params)
        for s in out:
            s.response_text = self._tokenizer.decode(s.response_ids, skip_special_tokens=True)
        return out

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        await self._engine.abort(sample_ids)

    async def join_weight_group(self, group: dict) -> None:
        """Join (or re-join, when membership changed) the trainer's broadcast group."""
        if self._broadcast is not None:
            self._broadcast.close()
        self._broadcast = await asyncio.to_thread(WeightBroadcast, **group)

    async def receive_weights(self) -> int:
        """Receive the next broadcast off the event loop (decoding goes on meanwhile), then
        load it between decoding steps."""
        named, version = await asyncio.to_thread(self._broadcast.receive)
        await self._engine.update_weights(named, version)
        return self._engine.policy_version

    async def engine_weights(self) -> dict[str, torch.Tensor]:
        return self._engine.state_dict()

    async def compute_seconds(self) -> float | None:
        return self._engine.compute_seconds

    async def policy_version(self) -> int:
        return self._engine.policy_version

    async def close(self) -> None:
        if self._broadcast is not None:
            self._broadcast.close()
        await self._engine.close()
