"""Plain-PyTorch trainer backend: an HF causal LM, AdamW, micro-batched gradient accumulation.

One `step(batch)`: advantages from the group rewards; proximal logprobs (`old_logprobs`)
recomputed once under the pre-step weights; then `minibatches` optimizer steps, each over
micro-batches whose losses are weighted so that the aggregate over the whole minibatch is exact
(token-mean weights micro-batches by their token share, seq-mean modes by their sequence share).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from asyncrl.algo import advantages as adv_lib
from asyncrl.algo import kl as kl_lib
from asyncrl.algo.aggregate import aggregate
from asyncrl.algo.losses import POLICY_LOSSES, behaviour_weights
from asyncrl.config.job import AlgorithmConfig, TrainerConfig
from asyncrl.models.forward import token_logprobs
from asyncrl.types import TrainBatch


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
        self._max_new_tokens = max_new_tokens
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
        self._policy_loss = POLICY_LOSSES[algorithm.loss]
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
        chunks = []
        for rows in torch.arange(batch.size).split(self._cfg.micro_batch_size):
            chunks.append(self._forward(model, batch.take(rows))[0].cpu())
        width = batch.input_ids.shape[1]
        return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])

    def _advantages(self, batch: TrainBatch) -> torch.Tensor:
        estimator = adv_lib.ADVANTAGE_ESTIMATORS[self._algo.advantage]
        kwargs = {}
        if self._algo.advantage == "grpo":
            kwargs["normalize_std"] = self._algo.normalize_std
        per_seq = estimator(batch.rewards, batch.group_ids, **kwargs)
        return adv_lib.expand_to_tokens(per_seq, batch.loss_mask)

    def _loss_kwargs(self) -> dict[str, float]:
        """Clip ranges set in the config; unset ones keep each loss's own default."""
        clips = {"clip_low": self._algo.clip_low, "clip_high": self._algo.clip_high}
        return {name: value for name, value in clips.items() if value is not None}

    def _micro_loss(self, mb: TrainBatch, tensors: dict[str, torch.Tensor]):
        algo = self._algo
        logprobs, entropy = self._forward(self.model, mb, with_entropy=algo.entropy_coef > 0)
        mask = mb.loss_mask.to(self._device)
        per_token, metrics = self._policy_loss(
            logprobs, tensors["old_logprobs"], tensors["advantages"], mask, **self._loss_kwargs()
        )
        per_token = per_token * tensors["behaviour_weights"]
        if algo.kl_coef:
            kl = kl_lib.kl_estimate(logprobs, tensors["ref_logprobs"], algo.kl_estimator)
            per_token = per_token + algo.kl_coef * kl
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        if algo.entropy_coef:
            per_token = per_token - algo.entropy_coef * entropy
            metrics["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        loss = aggregate(per_token, mask, algo.aggregation, norm_tokens=self._max_new_tokens)
        return loss, metrics

    def step(self, batch: TrainBatch) -> dict[str, float]:
        old_logprobs = self.logprobs(batch)
        tensors = {
            "old_logprobs": old_logprobs,
            "advantages": self._advantages(batch),
            "behaviour_weights": behaviour_weights(
                old_logprobs, batch.rollout_logprobs, batch.loss_mask,
                mode=self._algo.off_policy_correction, cap=self._algo.behaviour_weight_cap,
            ),
        }
        if self._ref is not None:
            tensors["ref_logprobs"] = self.logprobs(batch, model=self._ref)
        mask = batch.loss_mask
        metrics: dict[str, float] = {
            "train/mismatch_abs": float(((old_logprobs - batch.rollout_logprobs).abs() * mask).sum()
                                        / mask.sum().clamp(min=1)),
        }
        rows = torch.arange(batch.size)
        for minibatch in rows.chunk(self._cfg.minibatches):
            metrics |= self._optimizer_step(batch, tensors, minibatch)
        return metrics

    def _optimizer_step(self, batch: TrainBatch, tensors, rows: torch.Tensor) -> dict[str, float]:
        seq_level = self._algo.aggregation != "token-mean"
        total = len(rows) if seq_level else int(batch.loss_mask[rows].sum().clamp(min=1))
        self._opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for mb_rows in rows.split(self._cfg.micro_batch_size):
            mb = batch.take(mb_rows)
            share = (len(mb_rows) if seq_level else int(mb.loss_mask.sum())) / total
            if share == 0:
                continue
            width = mb.input_ids.shape[1]
            mb_tensors = {k: v[mb_rows, :width].to(self._device) for k, v in tensors.items()}
            loss, metrics = self._micro_loss(mb, mb_tensors)
            (loss * share).backward()
            for key, value in {"loss": loss, **metrics}.items():
                sums[f"train/{key}"] = sums.get(f"train/{key}", 0.0) + float(value.detach()) * share
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



def lr_factor(schedule: str, *, total_steps: int, warmup_steps: int, min_ratio: float):
    """Multiplier of the base lr at optimizer step s (LambdaLR): warm-up, then decay."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
