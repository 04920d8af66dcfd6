"""Policy losses. Each returns `(per_token_loss [B, T], metrics)`, not yet aggregated, so every
loss works with every aggregation mode (asyncrl.algo.aggregate).

Inputs (all [B, T], float32 unless said):
    logprobs: current policy, with grad.
    old_logprobs: proximal policy, recomputed by the trainer before the step (no grad).
    advantages: per token (a sequence's advantage repeated over its tokens).
    loss_mask: bool, True for trained tokens. Masked positions return exactly 0.

Off-policy correction is separate (`behaviour_weights`) and multiplies any of these losses.
"""

from __future__ import annotations

import torch

# exp() of a log-ratio beyond this overflows float32 gradients before clipping can help.
_MAX_LOG_RATIO = 20.0


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


def _ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    return torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))


def _zero_masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, loss, torch.zeros_like(loss))


def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip (Schulman et al. 2017): −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A), ρ = π/π_old.

    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025), exposed as `dapo`.
    """
    mask = loss_mask.to(torch.bool)
    ratio = _ratio(logprobs, old_logprobs, mask)
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    was_clipped = (ratio * advantages) > (clipped * advantages)
    metrics = {
        "clip_fraction": _masked_mean(was_clipped.float(), mask).detach(),
        "approx_kl": _masked_mean(old_logprobs - logprobs, mask).detach(),
        "ratio_mean": _masked_mean(ratio, mask).detach(),
    }
    return _zero_masked(loss, mask), metrics


def dapo(logprobs, old_logprobs, advantages, loss_mask, *, clip_low=0.2, clip_high=0.28):
    """DAPO clip-higher: PPO-clip with a wider upper range (ε_high = 0.28 in the paper)."""
    return ppo_clip(logprobs, old_logprobs, advantages, loss_mask,
                    clip_low=clip_low, clip_high=clip_high)


def dual_clip_ppo(
    logprobs, old_logprobs, advantages, loss_mask, *, clip_low=0.2, clip_high=0.2, clip_c=3.0
):
    """Dual-clip PPO (Ye et al. 2020): for A < 0 the PPO loss is also bounded by −c·A, so a huge
    ratio on a bad token cannot blow the update up. Needs c > 1."""
    if clip_c <= 1:
        raise ValueError(f"dual-clip needs clip_c > 1 (got {clip_c})")
    loss, metrics = ppo_clip(logprobs, old_logprobs, advantages, loss_mask,
                             clip_low=clip_low, clip_high=clip_high)
    bound = -clip_c * advantages
    dual = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    mask = loss_mask.to(torch.bool)
    metrics["dual_clip_fraction"] = _masked_mean(
        ((advantages < 0) & (loss > bound)).float(), mask).detach()
    return _zero_masked(dual, mask), metrics


def gspo(
    logprobs, old_logprobs, advantages, loss_mask, *, clip_low=3e-4, clip_high=4e-4
):
    """GSPO (Zheng et al. 2025): sequence-level ratio s = exp(mean_t(logp − old)), clipped, and
    −min(s A, clip(s) A) per sequence. Uses the GSPO-token form, s_t = sg(s) · π_t / sg(π_t),
    so the value on every token equals the sequence value while gradients flow per token.
    Every token of a sequence carries the sequence loss; aggregate with seq-mean-token-mean to
    get the paper's per-sequence mean.
    """
    mask = loss_mask.to(torch.bool)
    diff = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    seq_log_ratio = diff.sum(-1) / mask.sum(-1).clamp(min=1)
    seq_ratio = torch.exp(seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    token_ratio = seq_ratio.detach()[:, None] * torch.exp(logprobs - logprobs.detach())
    clipped = token_ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(token_ratio * advantages, clipped * advantages)
    was_clipped = (token_ratio * advantages) > (clipped * advantages)
    metrics = {
        "clip_fraction": _masked_mean(was_clipped.float(), mask).detach(),
        "ratio_mean": seq_ratio.mean().detach(),
    }
    return _zero_masked(loss, mask), metrics


def cispo(logprobs, old_logprobs, advantages, loss_mask, *, clip_low=None, clip_high=0.2):
    """CISPO (MiniMax-M1, 2025): −sg(clip(ρ, 1 − ε_low, 1 + ε_high)) · A · log π. The IS weight is
    clipped but never zeroes a token's gradient (PPO's clip drops clipped tokens entirely).
    The paper uses no lower clip (clip_low=None)."""
    mask = loss_mask.to(torch.bool)
    ratio = _ratio(logprobs, old_logprobs, mask).detach()
    low = 0.0 if clip_low is None else 1 - clip_low
    weight = ratio.clamp(low, 1 + clip_high)
    loss = -weight * advantages * logprobs
    metrics = {"clip_fraction": _masked_mean((weight != ratio).float(), mask).detach(),
               "ratio_mean": _masked_mean(ratio, mask).detach()}
    return _zero_masked(loss, mask), metrics


POLICY_LOSSES = {
    "ppo_clip": ppo_clip,
    "dapo": dapo,
    "dual_clip": dual_clip_ppo,
    "gspo": gspo,
    "cispo": cispo,
}


def behaviour_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    mode: str,
    cap: float = 2.0,
) -> torch.Tensor:
    """Per-token weight [B, T] (no grad) correcting for the policy that generated the tokens.

    w = min(π_old / π_behaviour, cap), π_behaviour = the engine's `rollout_logprobs`.
    - "decoupled" (AReaL's decoupled PPO, Fu et al. 2025): the PPO ratio is taken against the
      proximal policy π_old (recomputed now), and this weight corrects for samples generated by
      an older, stale policy.
    - "tis" (truncated importance sampling, Yao et al. 2025): the same formula, used when
      π_behaviour differs from π_old only by engine/trainer numerics (no staleness); the cap
      bounds the variance.
    - "none": all ones.
    Masked positions get weight 0.
    """
    mask = loss_mask.to(torch.bool)
    if mode == "none":
        return mask.to(torch.float32)
    if mode not in ("decoupled", "tis"):
        raise ValueError(f"unknown off-policy correction {mode!r}; use none, decoupled or tis")
    log_w = torch.where(mask, old_logprobs - rollout_logprobs, torch.zeros_like(old_logprobs))
    weight = torch.exp(log_w.clamp(max=_MAX_LOG_RATIO)).clamp(max=cap)
    return torch.where(mask, weight, torch.zeros_like(weight)).detach()
