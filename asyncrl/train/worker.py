"""TrainerWorker: the body of the trainer actor, around one `TrainerBackend`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from asyncrl.config.job import JobConfig
from asyncrl.sync.broadcast import WeightBroadcast
from asyncrl.types import TrainBatch


class TrainerWorker:
    def __init__(self, model_path: str, config: JobConfig, *, num_threads: int = 1) -> None:
        torch.set_num_threads(num_threads)
        # Each backend is imported only when selected: megatron.core stays optional.
        if config.trainer.backend == "megatron":
            from asyncrl.train.megatron.backend import MegatronBackend as Backend
        else:
            from asyncrl.train.torch_backend import TorchBackend as Backend

        self._broadcast: WeightBroadcast | None = None
        self._backend = Backend(
            model_path, config.algorithm, config.trainer,
            temperature=config.rollout.temperature,
            max_new_tokens=config.rollout.max_new_tokens,
            total_steps=config.run.steps * config.trainer.minibatches, seed=config.run.seed,
        )

    def step(self, batch: TrainBatch) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self._backend.step(batch)
        return {**metrics, "time/trainer_compute_s": time.perf_counter() - start}

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return self._backend.logprobs(batch)

    def open_weight_group(self, group: dict) -> None:
        """Host rank 0 of a broadcast group; returns once every worker has joined."""
        if self._broadcast is not None:
            self._broadcast.close()
        self._broadcast = WeightBroadcast(rank=0, **group)

    def broadcast_weights(self) -> dict[str, float]:
        stats = self._broadcast.send(self._backend.named_weights(), self._backend.policy_version)
        return {"sync/bytes": float(stats.bytes), "sync/send_s": stats.seconds}

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self._backend.named_weights()}

    def policy_version(self) -> int:
        return self._backend.policy_version

    def save(self, path: str) -> None:
        self._backend.save(Path(path))

    def load(self, path: str) -> None:
        self._backend.load(Path(path))
