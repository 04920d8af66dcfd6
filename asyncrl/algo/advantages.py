"""Advantage estimators over groups: `rewards [B]`, `group_ids [B]` → `advantages [B]`.

Samples with the same group id answered the same prompt. Group ids need not be contiguous and
groups may differ in size. Every estimator here is outcome-only (one scalar per sample);
`expand_to_tokens` repeats it over the sample's trained tokens.

Rewards must be finite: a NaN reward (a failed reward, see asyncrl.types.Reward) makes its whole
group NaN, on purpose, so a failure that slipped through is visible rather than silently zero.
Failed samples are filtered before this module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _per_sample_group_sum(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B] sum of `values` over each sample's group (index: [B] dense group index)."""
    groups = int(index.max()) + 1 if index.numel() else 0
    zeros = torch.zeros(groups, dtype=values.dtype, device=values.device)
    return zeros.index_add(0, index, values)[index]


def _group_stats(
    rewards: torch.Tensor, group_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample dense group index [B], group mean [B] and group size [B] (rewards' dtype)."""
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)} "
            f"and {tuple(group_ids.shape)}"
        )
    _, index = torch.unique(group_ids, return_inverse=True)
    count = _per_sample_group_sum(torch.ones_like(rewards), index)
    return index, _per_sample_group_sum(rewards, index) / count, count


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a uniform group with eps=0)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))


def grpo(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i − mean_g) / (std_g + eps).

    std_g is the unbiased group std (torch.std's default, n − 1), as in the reference code. A
    group of one sample has advantage 0 (its centred reward is 0). With eps=0, a group whose
    rewards are all equal gets 0 instead of 0/0. With normalize_std=False this is `dr_grpo`.
    verl (compute_grpo_outcome_advantage) uses the same unbiased std and eps, but gives a group
    of one mean 0 and std 1, so its advantage is r / (1 + eps) where ours is 0. TRL's
    GRPOTrainer adds eps = 1e-4, and with scale_rewards="batch" divides by the std of all the
    batch's raw rewards instead of the group's.

    Args:
        rewards: [B] float, one scalar reward per sample.
        group_ids: [B] int64, samples with the same id form one prompt's group.
        normalize_std: divide by the group std (GRPO); False only centres (Dr.GRPO).
        eps: added to the std.

    Returns:
        [B] advantages, rewards' dtype.
    """
    index, mean, count = _group_stats(rewards, group_ids)
    centred = rewards - mean
    if not normalize_std:
        return centred
    sq = _per_sample_group_sum(centred**2, index)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return _safe_divide(centred, std + eps)


def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i − mean_g.

    Departs from GRPO by dropping the division by the group std, which up-weights groups whose
    rewards barely differ (too easy or too hard prompts: the "question-level difficulty bias").
    The paper's other change, dropping GRPO's per-response 1/|o_i| length normalisation, is not
    an advantage change: it lives in the aggregation mode `seq-mean-token-sum-norm`
    (asyncrl.algo.aggregate), so pair the two to get Dr.GRPO. The same advantage is verl's GRPO
    with norm_adv_by_std_in_grpo=False and TRL's scale_rewards="none"; TRL's loss_type="dr_grpo"
    is only the aggregation (Σ / (B · max_completion_length), our seq-mean-token-sum-norm).

    Args:
        rewards: [B] float. group_ids: [B] int64.

    Returns:
        [B] advantages.
    """
    return grpo(rewards, group_ids, normalize_std=False)


def rloo(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i − (1 / (n − 1)) Σ_{j≠i} r_j, leave-one-out.

    Algebraically (n / (n − 1)) · (r_i − mean_g), which is how it is computed. A group of one
    sample has no "others" and gets 0. No std normalisation, as in the paper. verl
    (compute_rloo_outcome_advantage) leaves a group of one at its raw reward instead of 0; TRL's
    RLOOTrainer has the same baseline and can also whiten the advantages over the whole batch
    (normalize_advantages), which is not done here.

    Args:
        rewards: [B] float. group_ids: [B] int64; n is the size of the sample's group.

    Returns:
        [B] advantages.
    """
    _, mean, count = _group_stats(rewards, group_ids)
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    return (rewards - mean) * scale


def reinforce_pp_baseline(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025): A_i = (c_i − mean_B c) / (std_B c + eps), where
    c_i = r_i − mean_g is the group-centred reward and mean_B, std_B run over the whole batch.

    The batch std (unbiased) replaces GRPO's per-group std, so a group whose rewards barely
    differ is not blown up. mean_B c is 0 up to rounding (each group's centred rewards sum to
    0) and is subtracted only for fidelity. Departures from the paper: the paper folds a
    token-level KL penalty into the reward (here KL is a separate loss term, asyncrl.algo.kl)
    and its reference code whitens over tokens, so long responses weigh more in the batch
    statistics; here the statistics are per sample. A batch of one sample gets 0. verl's
    reinforce_plus_plus_baseline is that token-level whitening, with eps inside the square root
    (1/√(var + 1e-8)); TRL's nearest setting, scale_rewards="batch", divides the group-centred
    rewards by the batch std of the raw rewards, not of the centred ones.

    Args:
        rewards: [B] float. group_ids: [B] int64.
        eps: added to the batch std.

    Returns:
        [B] advantages.
    """
    centred = dr_grpo(rewards, group_ids)
    if centred.numel() < 2:
        return torch.zeros_like(centred)
    return _safe_divide(centred - centred.mean(), centred.std() + eps)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp_baseline,
}


def expand_to_tokens(advantages: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Repeat each sequence's advantage over its trained tokens.

    Args:
        advantages: [B] float, one per sequence.
        loss_mask: [B, T] bool, True for trained tokens.

    Returns:
        [B, T] advantages' dtype; exactly 0 where the mask is False (even for a NaN advantage).
    """
    mask = loss_mask.to(torch.bool)
    values = advantages[:, None].expand(mask.shape)
    return torch.where(mask, values, torch.zeros_like(values))
