"""Advantage estimators over groups: `rewards [B]`, `group_ids [B]` → `advantages [B]`.

Samples with the same group id answered the same prompt. Group ids need not be contiguous and
groups may differ in size.
"""

from __future__ import annotations

import torch


def _group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, index = torch.unique(group_ids, return_inverse=True)
    return index, int(index.max()) + 1 if index.numel() else 0


def _group_mean(
    rewards: torch.Tensor, index: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample group mean [B] and group size [B]."""
    sums = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, rewards)
    counts = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, torch.ones_like(rewards))
    return (sums / counts)[index], counts[index]


def grpo(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i − mean_g) / (std_g + eps).

    std_g is the unbiased group std (torch.std's default), as in the paper's reference code; a
    group of one sample has std 0 and advantage 0. With normalize_std=False this is Dr.GRPO's
    advantage.
    """
    index, groups = _group_index(group_ids)
    mean, count = _group_mean(rewards, index, groups)
    centred = rewards - mean
    if not normalize_std:
        return centred
    sq = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, centred**2)[index]
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return centred / (std + eps)


def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025): A_i = r_i − mean_g, no std division (its difficulty bias).

    The paper's other change, dropping the per-response length normalisation, lives in the
    aggregation mode `seq-mean-token-sum-norm`, not here.
    """
    return grpo(rewards, group_ids, normalize_std=False)


def rloo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i − mean of the other samples of the group.

    Equals (n / (n − 1)) · (r_i − mean_g); a group of one sample gets 0.
    """
    index, groups = _group_index(group_ids)
    mean, count = _group_mean(rewards, index, groups)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    return (rewards - mean) * scale


def reinforce_pp_baseline(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): subtract the group mean, then normalise by the
    std over the whole batch (global normalisation instead of GRPO's per-group std).

    The paper also folds a token-level KL into the reward; here KL is a separate loss term.
    """
    centred = dr_grpo(rewards, group_ids)
    if centred.numel() < 2:
        return centred
    return (centred - centred.mean()) / (centred.std() + eps)


ADVANTAGE_ESTIMATORS = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp_baseline,
}


def expand_to_tokens(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B] per-sequence advantages → [B, T], zero where the mask is False."""
    return advantages[:, None].to(torch.float32) * loss_mask.to(torch.float32)
