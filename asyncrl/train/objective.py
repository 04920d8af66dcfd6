"""The RL objective every trainer backend optimises, apart from how it runs the model.

A backend brings a `forward(mb, with_entropy) -> (logprobs [b, t], entropy [b, t] | None)` that
keeps the graph, an optimizer and a way to reduce gradients; everything that must be identical
across backends lives here, so "the megatron backend trains the same thing as the torch backend"
holds by construction: advantages, behaviour weights, the per-token loss with its KL and entropy
terms, the aggregation, the micro-batch shares and the lr schedule.

Micro-batch shares make gradient accumulation exact: a micro-batch's aggregated loss is weighted
by its share of the minibatch (token-mean: its share of the trained tokens; seq-mean modes: its
share of the sequences), so summing `share · ∇loss` over micro-batches, and over data-parallel
ranks that each hold part of the minibatch, gives the gradient of the whole minibatch's loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from asyncrl.algo import advantages as adv_lib
from asyncrl.algo import kl as kl_lib
from asyncrl.algo.aggregate import aggregate
from asyncrl.algo.expert import expert_sft_loss
from asyncrl.algo.losses import POLICY_LOSSES, behaviour_weights
from asyncrl.config.job import AlgorithmConfig
from asyncrl.types import TrainBatch

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class PolicyObjective:
    """Maps `AlgorithmConfig` onto asyncrl.algo, in exactly one place (STYLE §8.3)."""

    def __init__(self, algorithm: AlgorithmConfig, *, max_new_tokens: int) -> None:
        self.algo = algorithm
        self._max_new_tokens = max_new_tokens
        self._policy_loss = POLICY_LOSSES[algorithm.loss]

    @property
    def with_entropy(self) -> bool:
        return self.algo.entropy_coef > 0

    def advantages(self, batch: TrainBatch) -> torch.Tensor:
        """[B, T] advantages: the estimator's per-sequence value on each trained token."""
        estimator = adv_lib.ADVANTAGE_ESTIMATORS[self.algo.advantage]
        kwargs = {}
        if self.algo.advantage == "grpo":
            kwargs["normalize_std"] = self.algo.normalize_std
        if batch.expert_rows is None:
            per_seq = estimator(batch.rewards, batch.group_ids, **kwargs)
        else:  # expert rows stay out of the statistics (reinforce_pp's batch std, say): 0
            policy = ~batch.expert_rows
            per_seq = torch.zeros_like(batch.rewards)
            per_seq[policy] = estimator(batch.rewards[policy], batch.group_ids[policy],
                                        **kwargs)
        return adv_lib.expand_to_tokens(per_seq, batch.loss_mask)

    def step_tensors(
        self, batch: TrainBatch, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The fixed [B, T] inputs of one `step` (computed once, before any optimizer step)
        and the step's batch-level metrics."""
        tensors = {
            "old_logprobs": old_logprobs,
            "advantages": self.advantages(batch),
            "behaviour_weights": behaviour_weights(
                old_logprobs, batch.rollout_logprobs, batch.loss_mask,
                mode=self.algo.off_policy_correction, cap=self.algo.behaviour_weight_cap,
            ),
        }
        if ref_logprobs is not None:
            tensors["ref_logprobs"] = ref_logprobs
        mask = batch.loss_mask
        if batch.expert_rows is not None:  # no behaviour logprobs there: not a mismatch
            mask = mask & ~batch.expert_rows[:, None]
        mismatch = ((old_logprobs - batch.rollout_logprobs).abs() * mask).sum()
        return tensors, {"train/mismatch_abs": float(mismatch / mask.sum().clamp(min=1))}

    def _loss_kwargs(self) -> dict[str, float]:
        """Clip ranges set in the config (unset ones keep each loss's own default), and the
        dual-clip bound for the one loss that has it."""
        clips = {"clip_low": self.algo.clip_low, "clip_high": self.algo.clip_high}
        kwargs = {name: value for name, value in clips.items() if value is not None}
        if self.algo.loss == "dual_clip":
            kwargs["clip_c"] = self.algo.dual_clip_c
        return kwargs

    def micro_loss(
        self, logprobs: torch.Tensor, entropy: torch.Tensor | None, mask: torch.Tensor,
        tensors: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Aggregated loss of one micro-batch. logprobs/entropy/mask: [b, t]; tensors: the
        `step_tensors` rows of this micro-batch, trimmed to t."""
        algo = self.algo
        per_token, metrics = self._policy_loss(
            logprobs, tensors["old_logprobs"], tensors["advantages"], mask, **self._loss_kwargs()
        )
        per_token = per_token * tensors["behaviour_weights"]
        if algo.kl_coef:
            # the mask keeps padding out of the exp: with kl_clamp=None an inf there would
            # turn into a NaN gradient even though aggregation selects it away
            kl = kl_lib.kl_estimate(logprobs, tensors["ref_logprobs"], algo.kl_estimator,
                                    algo.kl_clamp, loss_mask=mask)
            per_token = per_token + algo.kl_coef * kl
            metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        if algo.entropy_coef:
            per_token = per_token - algo.entropy_coef * entropy
            metrics["entropy"] = (entropy * mask).sum() / mask.sum().clamp(min=1)
        loss = aggregate(per_token, mask, algo.aggregation, norm_tokens=self._max_new_tokens)
        return loss, metrics

    def micro_batches(
        self, batch: TrainBatch, rows: torch.Tensor, micro_batch_size: int,
        minibatch_rows: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, float]]:
        """(rows, share) of each micro-batch of `rows` that has something to train.

        Args:
            rows: [R] int64, the rows this process trains (all of the minibatch, or one
                data-parallel rank's part of it).
            minibatch_rows: the whole minibatch, when `rows` is a part of it (shares are of the
                whole, so gradients summed over ranks are exact); None means `rows`.
        """
        whole = rows if minibatch_rows is None else minibatch_rows
        seq_level = self.algo.aggregation != "token-mean"
        total = len(whole) if seq_level else int(batch.loss_mask[whole].sum().clamp(min=1))
        out = []
        for mb_rows in rows.split(micro_batch_size):
            share = (len(mb_rows) if seq_level else int(batch.loss_mask[mb_rows].sum())) / total
            if share > 0:
                out.append((mb_rows, share))
        return out

    def share_loss(
        self, batch: TrainBatch, mb_rows: torch.Tensor, share: float,
        tensors: dict[str, torch.Tensor], logprobs: torch.Tensor, entropy: torch.Tensor | None,
        sums: dict[str, float],
    ) -> torch.Tensor:
        """share × the loss of micro-batch `mb_rows` (logprobs/entropy: [b, t] on the model's
        device, t its trimmed width); adds its share-weighted metrics into `sums`."""
        width, device = logprobs.shape[1], logprobs.device
        mb_tensors = {k: v[mb_rows, :width].to(device) for k, v in tensors.items()}
        mask = batch.loss_mask[mb_rows, :width].to(device)
        loss, metrics = self.micro_loss(logprobs, entropy, mask, mb_tensors)
        for key, value in {"loss": loss, **metrics}.items():
            sums[f"train/{key}"] = sums.get(f"train/{key}", 0.0) + float(value.detach()) * share
        return loss * share

    def accumulate(
        self, batch: TrainBatch, tensors: dict[str, torch.Tensor], rows: torch.Tensor, *,
        micro_batch_size: int, forward: Forward, minibatch_rows: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Forward and backward `rows` in micro-batches (see `micro_batches`), each loss scaled
        by its share.

        Returns:
            Share-weighted sums of the loss and its metrics (`train/<name>`); summed over the
            parts of a minibatch they are the minibatch's means.
        """
        whole = rows if minibatch_rows is None else minibatch_rows
        expert = batch.expert_rows
        if expert is None:
            return self._accumulate_policy(batch, tensors, rows, whole, micro_batch_size,
                                           forward, scale=1.0)
        # CHORD (asyncrl.algo.expert): each term over its own rows, with its own shares, so
        # the sum is exactly (1 − μ)·L_RL + μ·L_SFT of the minibatch.
        mu = batch.expert_coef
        sums = self._accumulate_policy(batch, tensors, rows[~expert[rows]],
                                       whole[~expert[whole]], micro_batch_size, forward,
                                       scale=1.0 - mu)
        if mu > 0:
            sums |= self._accumulate_expert(batch, rows[expert[rows]], whole[expert[whole]],
                                            micro_batch_size, forward, scale=mu)
        return sums

    def _accumulate_policy(self, batch, tensors, rows, whole, micro_batch_size, forward, *,
                           scale: float) -> dict[str, float]:
        sums: dict[str, float] = {}
        for mb_rows, share in self.micro_batches(batch, rows, micro_batch_size, whole):
            logprobs, entropy = forward(batch.take(mb_rows), with_entropy=self.with_entropy)
            loss = self.share_loss(batch, mb_rows, share, tensors, logprobs, entropy, sums)
            (loss * scale).backward()
        return sums

    def _accumulate_expert(self, batch, rows, whole, micro_batch_size, forward, *,
                           scale: float) -> dict[str, float]:
        """The SFT term: token-mean of φ·NLL over the minibatch's expert tokens."""
        total = int(batch.loss_mask[whole].sum().clamp(min=1))
        sums = {"train/expert_loss": 0.0, "train/expert_nll": 0.0}
        for mb_rows in rows.split(micro_batch_size):
            share = int(batch.loss_mask[mb_rows].sum()) / total
            if share == 0:
                continue
            logprobs, _ = forward(batch.take(mb_rows), with_entropy=False)
            mask = batch.loss_mask[mb_rows, : logprobs.shape[1]].to(logprobs.device)
            per_token, nll = expert_sft_loss(logprobs, mask, self.algo.expert_token_weighting)
            loss = aggregate(per_token, mask, "token-mean")
            (loss * share * scale).backward()
            sums["train/expert_loss"] += float(loss.detach()) * share
            sums["train/expert_nll"] += float(nll) * share
        return sums


def batched_logprobs(
    batch: TrainBatch, rows: torch.Tensor, micro_batch_size: int, forward: Forward
) -> torch.Tensor:
    """[len(rows), T] float32 logprobs on CPU, forward run micro-batch by micro-batch (no grad
    is the caller's business); each micro-batch is trimmed, then padded back to T with 0."""
    width = batch.input_ids.shape[1]
    chunks = [forward(batch.take(mb_rows))[0].float().cpu()
              for mb_rows in rows.split(micro_batch_size)]
    if not chunks:
        return torch.zeros(0, width)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks])


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
