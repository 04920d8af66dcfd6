"""RolloutWorker: the body of one rollout actor, holding one engine.

A plain class with async methods; `asyncrl.cluster` makes it a Ray actor. It decodes response
text (so rewards never need the tokenizer) and receives weights from the trainer's broadcast.

Samples with an `episode` (multi-turn workflows) run the episode loop of
asyncrl.rollout.workflow.episode on this engine and tokenizer; the others go to the engine as
one batch, as before. `response_text` is the whole transcript (model turns and observations).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import torch
from transformers import AutoTokenizer

from asyncrl.rollout.engine import build_engine
from asyncrl.rollout.workflow import WorkflowSpec
from asyncrl.rollout.workflow.episode import run_episode
from asyncrl.sync.broadcast import WeightBroadcast
from asyncrl.types import Sample, SamplingParams


class RolloutWorker:
    def __init__(self, model_path: str, engine: str, *, seed: int, num_threads: int = 1,
                 vllm_options: dict | None = None, workflow: WorkflowSpec | None = None
                 ) -> None:
        torch.set_num_threads(num_threads)
        self._tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._engine = build_engine(engine, model_path, seed=seed, vllm_options=vllm_options)
        self._broadcast: WeightBroadcast | None = None
        self._spec = workflow
        self._workflow = workflow() if workflow is not None else None
        self._episodes: set[str] = set()  # ids of episodes running here now
        self._aborted: set[str] = set()  # of those, the ones asked to stop

    async def generate(self, samples: list[Sample], params: SamplingParams) -> list[Sample]:
        episodes = [s for s in samples if s.episode]
        if not episodes:
            out = await self._engine.generate(samples, params)
        else:
            if self._workflow is None:
                raise ValueError(f"sample {episodes[0].sample_id!r} is a multi-turn episode but "
                                 "this worker has no workflow (set rollout.workflow)")
            single = [s for s in samples if not s.episode]
            # Registered now, not when their tasks start: an abort from here on reaches them.
            self._episodes.update(s.sample_id for s in episodes)
            jobs = [self._episode(s, params) for s in episodes]
            if single:
                jobs.append(self._engine.generate(single, params))
            await asyncio.gather(*jobs)
            out = samples
        for s in out:
            s.response_text = self._tokenizer.decode(s.response_ids, skip_special_tokens=True)
        return out

    async def _episode(self, sample: Sample, params: SamplingParams) -> None:
        sid = sample.sample_id
        try:
            await run_episode(
                sample, generate=lambda s: self._engine.generate([s], params),
                decode=lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True),
                encode=lambda text: self._tokenizer(text, add_special_tokens=False).input_ids,
                workflow=self._workflow, spec=self._spec, aborted=lambda: sid in self._aborted)
        finally:  # an id is not remembered: a later resume of it is not aborted by mistake
            self._episodes.discard(sid)
            self._aborted.discard(sid)

    async def abort(self, sample_ids: Iterable[str] | None = None) -> None:
        ids = None if sample_ids is None else set(sample_ids)
        # An episode between turns (its environment stepping) stops before its next turn.
        self._aborted |= self._episodes if ids is None else self._episodes & ids
        await self._engine.abort(ids)

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
