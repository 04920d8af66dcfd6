"""The `TrainerBackend` protocol: what the controller needs from any trainer.

Weights always leave a backend under HF parameter names, so the weight broadcast and every
engine speak one naming scheme whatever the trainer's internal layout (e.g. Megatron's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from asyncrl.types import TrainBatch


@runtime_checkable
class TrainerBackend(Protocol):
    @property
    def policy_version(self) -> int:
        """Optimizer steps applied to the weights so far."""
        ...

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] float32 logprobs of the batch's tokens under the current weights (no grad)."""
        ...

    def step(self, batch: TrainBatch) -> dict[str, float]:
        """Advantages, loss, one or more optimizer steps; bumps policy_version per step."""
        ...

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current weights under HF names (detached, on CPU or the trainer's device)."""
        ...

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...
