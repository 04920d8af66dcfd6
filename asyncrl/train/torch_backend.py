"""Plain-PyTorch trainer backend: an HF causal LM, AdamW, micro-batched gradient accumulation.

One `step(batch)`: advantages from the group rewards; proximal logprobs (`old_logprobs`)
recomputed once under the pre-step weights; then `minibatches` optimizer steps, each over
micro-batches whose losses are weighted so that the aggregate over the whole minibatch is exact
(token-mean weights micro-batches by their token share, seq-mean modes by their sequence share).
The objective itself (losses, weights, shares, lr schedule) is `asyncrl.train.objective`, shared
with the megatron backend.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.models.forward import token_logprobs
from asyncrl.train.objective import PolicyObjective, batched_logprobs, lr_factor
from asyncrl.types import TrainBatch

__all__ = ["TorchBackend", "lr_factor"]


class TorchBackend:
    def __init__(
        self,
        model_path: str,
        algorithm: AlgorithmConfig,
        trainer: TrainerConfig,
        *,
        temperature: float,
        max_new_tokens: int,
        total_steps: int,
        seed: int,
    ) -> None:
        torch.manual_seed(seed)
        self._algo, self._cfg = algorithm, trainer
        # Logprobs are of softmax(logits / T) with the rollout temperature (greedy counts as 1).
        self._temperature = temperature if temperature > 0 else 1.0
        self._objective = PolicyObjective(algorithm, max_new_tokens=max_new_tokens)
        self._device = torch.device(trainer.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.model.to(self._device).train()
        self._ref = (
            copy.deepcopy(self.model).eval().requires_grad_(False) if algorithm.kl_coef else None
        )
        self._opt = torch.optim.AdamW(
            self.model.parameters(), lr=trainer.lr, betas=trainer.betas,
            weight_decay=trainer.weight_decay,
        )
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._opt, lr_factor(trainer.lr_schedule, total_steps=total_steps,
                                 warmup_steps=trainer.warmup_steps,
                                 min_ratio=trainer.min_lr_ratio))
        self._policy_version = 0

    @property
    def policy_version(self) -> int:
        return self._policy_version

    def _forward(self, model: torch.nn.Module, mb: TrainBatch, *, with_entropy: bool = False):
        return token_logprobs(
            model, mb.input_ids.to(self._device), mb.attention_mask.to(self._device),
            self._temperature, with_entropy=with_entropy,
        )

    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        model = model or self.model
        return batched_logprobs(batch, torch.arange(batch.size), self._cfg.micro_batch_size,
                                lambda mb: self._forward(model, mb))

    def step(self, batch: TrainBatch) -> dict[str, float]:
        old_logprobs = self.logprobs(batch)
        ref_logprobs = self.logprobs(batch, model=self._ref) if self._ref is not None else None
        tensors, metrics = self._objective.step_tensors(batch, old_logprobs, ref_logprobs)
        rows = torch.arange(batch.size)
        # tensor_split, not chunk: chunk can give fewer parts (6 rows into 4 → 3)
        for minibatch in rows.tensor_split(self._cfg.minibatches):
            metrics |= self._optimizer_step(batch, tensors, minibatch)
        return metrics

    def _optimizer_step(self, batch: TrainBatch, tensors, rows: torch.Tensor) -> dict[str, float]:
        self._opt.zero_grad(set_to_none=True)
        sums = self._objective.accumulate(
            batch, tensors, rows, micro_batch_size=self._cfg.micro_batch_size,
            forward=lambda mb, with_entropy: self._forward(self.model, mb,
                                                           with_entropy=with_entropy),
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self._cfg.grad_clip)
        self._opt.step()
        self._scheduler.step()
        self._policy_version += 1
        return sums | {"train/grad_norm": float(grad_norm),
                       "train/lr": self._scheduler.get_last_lr()[0]}

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.model.state_dict().items():
            yield name, tensor.detach()

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        torch.save(
            {"optimizer": self._opt.state_dict(), "scheduler": self._scheduler.state_dict(),
             "policy_version": self._policy_version},
            path / "trainer_state.pt",
        )

    def load(self, path: Path) -> None:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.model.load_state_dict(loaded.state_dict())
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self._opt.load_state_dict(state["optimizer"])
        self._scheduler.load_state_dict(state["scheduler"])
        self._policy_version = state["policy_version"]
