"""Policy losses. Each returns `(per_token_loss [B, T], metrics)`, not aggregated, so every loss
works with every aggregation mode (asyncrl.algo.aggregate). Values are losses (to minimise).

Inputs (all [B, T]; B sequences, T tokens, TrainBatch alignment): `logprobs` (current policy,
with grad), `old_logprobs` (proximal policy, recomputed by the trainer before the step; detached
here), `advantages` (a sequence's advantage repeated over its tokens, see
advantages.expand_to_tokens; detached here), `loss_mask` (bool, True for trained tokens).

Masked positions are exactly 0 in the output and get exactly 0 gradient whatever the inputs hold
there (−inf, NaN): inputs are selected away with `torch.where` before any arithmetic, never
multiplied by 0. Metrics are 0-d detached tensors averaged over masked tokens. The behaviour
policy (`rollout_logprobs`) enters only through `behaviour_weights`, which the caller multiplies
into any loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LossOutput = tuple[Tensor, dict[str, Tensor]]

# Log-ratios are clamped to ±20 before exp: e^20 ≈ 4.9e8 keeps ratios, their products with
# advantages and their gradients finite in float32/bf16 (exp overflows near 88.7), and a token
# that far off-policy is clipped or capped anyway.
_MAX_LOG_RATIO = 20.0


def _select(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (_select(x, mask).sum() / mask.sum().clamp(min=1)).detach()


def _prepare(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mask, logprobs, old_logprobs, advantages with masked positions replaced by 0."""
    if not logprobs.shape == old_logprobs.shape == advantages.shape == loss_mask.shape:
        raise ValueError(
            "logprobs, old_logprobs, advantages and loss_mask must all be [B, T]; got "
            f"{[tuple(t.shape) for t in (logprobs, old_logprobs, advantages, loss_mask)]}"
        )
    m = loss_mask.to(torch.bool)
    old, adv = _select(old_logprobs, m).detach(), _select(advantages, m).detach()
    return m, _select(logprobs, m), old, adv


def _check_clip(clip_low: float, clip_high: float) -> None:
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip ranges must be >= 0; got {clip_low=}, {clip_high=}")


def _ratio_metrics(
    log_ratio: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    return {
        "clip_fraction": _masked_mean(clipped.float(), mask),
        "approx_kl": _masked_mean(-log_ratio, mask),  # mean of old − new
        "ratio_mean": _masked_mean(ratio, mask),
    }


def ppo_clip(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> LossOutput:
    """PPO-clip (Schulman et al. 2017), per token:

        ρ = exp(logp − old_logp),  loss = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A)

    Where the clipped term is the smaller one, the token's gradient is 0. clip_high > clip_low
    is DAPO's clip-higher (see `dapo`). Departures: the log-ratio is clamped to ±20 before exp
    (gradient 0 beyond); no value loss (critic-free, advantages come from group rewards).
    verl's "vanilla" policy loss always adds the dual clip for A < 0 (c = clip_ratio_c = 3), so
    it is our `dual_clip_ppo`, not this function; TRL's loss types grpo, bnpo, dr_grpo and dapo
    all use this per-token loss and differ only in aggregation (TRL's optional `delta` cap on
    the unclipped ratio is not here).

    Args:
        logprobs, old_logprobs, advantages: [B, T] float. loss_mask: [B, T] bool.
        clip_low: ε_low. clip_high: ε_high.

    Returns:
        per-token loss [B, T] (0 where masked) and metrics: clip_fraction (masked tokens whose
        clipped term is active), approx_kl (mean of old_logp − logp), ratio_mean.
    """
    _check_clip(clip_low, clip_high)
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, loss_mask)
    log_ratio = logp - old
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    metrics = _ratio_metrics(log_ratio, ratio, clipped < unclipped, mask)
    return _select(loss, mask), metrics


def dapo(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> LossOutput:
    """DAPO's clip-higher (Yu et al. 2025): `ppo_clip` with ε_high > ε_low (0.28 vs 0.2 in the
    paper), so low-probability tokens with A > 0 can grow further before clipping.

    Only DAPO's loss: token-mean is an aggregation mode; dynamic sampling and overlong shaping
    are not here. Shapes as `ppo_clip`. In TRL, loss_type="dapo" names the whole-batch token-mean
    aggregation and the clip is set apart (epsilon_high); verl sets it as clip_ratio_high.
    """
    return ppo_clip(logprobs, old_logprobs, advantages, loss_mask,
                    clip_low=clip_low, clip_high=clip_high)


def dual_clip_ppo(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    clip_c: float = 3.0,
) -> LossOutput:
    """Dual-clip PPO (Ye et al. 2020), per token:

        loss = min(ppo_clip_loss, −c A)  where A < 0,  ppo_clip_loss  where A ≥ 0

    For a bad token (A < 0) whose ratio has grown huge, −ρA is unbounded; the dual clip caps the
    loss at −cA = c|A| and zeroes its gradient. Needs c > 1. Shapes as `ppo_clip`. This is
    verl's "vanilla" loss with the same default (clip_ratio_c = 3.0, also required > 1); TRL has
    no dual clip.

    Returns:
        per-token loss [B, T] and ppo_clip's metrics plus dual_clip_fraction (masked tokens
        where the −cA bound is active).

    Raises:
        ValueError: clip_c <= 1.
    """
    if clip_c <= 1:
        raise ValueError(f"dual-clip needs clip_c > 1; got {clip_c}")
    loss, metrics = ppo_clip(logprobs, old_logprobs, advantages, loss_mask,
                             clip_low=clip_low, clip_high=clip_high)
    mask = loss_mask.to(torch.bool)
    adv = _select(advantages, mask).detach()
    bound = -clip_c * adv
    bounded = (adv < 0) & (loss > bound)
    metrics["dual_clip_fraction"] = _masked_mean(bounded.float(), mask)
    return _select(torch.where(bounded, bound, loss), mask), metrics


def gspo(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> LossOutput:
    """GSPO (Zheng et al. 2025), sequence-level ratio, in its "GSPO-token" gradient form:

        s_b = exp((1/n_b) Σ_t m (logp − old_logp))            sequence ratio, [B]
        s_bt = sg(s_b) · exp(logp_bt − sg(logp_bt))             value s_b, ∂s_bt/∂logp_bt = s_b
        loss_bt = −min(s_bt A_bt, clip(s_bt, 1 − ε_low, 1 + ε_high) A_bt)

    The per-token tensor carries the sequence value on every trained token, and clipping is
    decided per sequence (a clipped sequence gives all its tokens 0 gradient). With A constant
    over a sequence and aggregation "seq-mean-token-mean", value and gradient equal GSPO's
    sequence objective (1/B) Σ_b −min(s_b A_b, clip(s_b) A_b); other aggregation modes weight
    sequences differently (token-mean weighs long ones more). The defaults 3e-4 / 4e-4 are the
    paper's ranges; they are far narrower than PPO's because s_b is a per-token geometric mean.
    verl's gspo uses this same form but clamps log s_b only from above (at 10, here ±20) and
    always aggregates seq-mean-token-mean whatever the configured mode; TRL
    (importance_sampling_level="sequence") differentiates s_b directly, which with its
    loss_type="grpo" (seq-mean-token-mean) gives the same value and gradient as here.

    Args:
        logprobs, old_logprobs, advantages: [B, T] float. loss_mask: [B, T] bool.
        clip_low: ε_low. clip_high: ε_high.

    Returns:
        per-token loss [B, T] and metrics: clip_fraction (masked tokens of clipped sequences),
        approx_kl (mean of old_logp − logp over tokens), ratio_mean (mean s_b over non-empty
        sequences).
    """
    _check_clip(clip_low, clip_high)
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, loss_mask)
    lengths = mask.sum(-1)
    log_ratio = logp - old
    seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1)
    seq_ratio = torch.exp(seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)).detach()
    token_ratio = seq_ratio[:, None] * torch.exp(logp - logp.detach())
    unclipped = token_ratio * adv
    clipped = token_ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    metrics = _ratio_metrics(log_ratio, token_ratio, clipped < unclipped, mask)
    metrics["ratio_mean"] = _masked_mean(seq_ratio, lengths > 0)
    return _select(loss, mask), metrics


def cispo(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor,
    *,
    clip_high: float = 0.2,
    clip_low: float | None = None,
) -> LossOutput:
    """CISPO (MiniMax-M1, 2025), per token:

        ρ = exp(logp − old_logp),  loss = −sg(clip(ρ, 1 − ε_low, 1 + ε_high)) · A · logp

    The importance weight is clipped and detached, but no token's gradient is ever zeroed
    (PPO's clip drops clipped tokens; CISPO keeps rare high-ratio tokens at a capped weight).
    The paper sets no lower bound (ε_low "large") and tunes only ε_high: clip_low=None; the
    default ε_high here is not from the paper. The per-token value is a surrogate: only its
    gradient −w A ∇logp means something. The paper aggregates token-mean. verl's cispo clips
    both sides, ε_low and ε_high both defaulting to clip_ratio (0.2), so it has a lower bound
    where ours has none; TRL's loss_type="cispo" caps the ratio itself, min(ρ, epsilon_high)
    (5.0 recommended), rather than at 1 + ε_high.

    Args:
        logprobs, old_logprobs, advantages: [B, T] float. loss_mask: [B, T] bool.
        clip_high: ε_high. clip_low: ε_low, or None for no lower bound.

    Returns:
        per-token loss [B, T] and metrics: clip_fraction (masked tokens whose weight was
        clipped), approx_kl, ratio_mean (of the unclipped ρ).
    """
    _check_clip(clip_low or 0.0, clip_high)
    mask, logp, old, adv = _prepare(logprobs, old_logprobs, advantages, loss_mask)
    log_ratio = (logp - old).detach()
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    low = 0.0 if clip_low is None else 1 - clip_low
    weight = ratio.clamp(low, 1 + clip_high)
    loss = -weight * adv * logp
    metrics = _ratio_metrics(log_ratio, ratio, weight != ratio, mask)
    return _select(loss, mask), metrics


POLICY_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "ppo_clip": ppo_clip,
    "dual_clip": dual_clip_ppo,
    "dapo": dapo,
    "gspo": gspo,
    "cispo": cispo,
}

BEHAVIOUR_MODES = ("none", "decoupled", "tis", "decoupled_filter")


def behaviour_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    mode: str,
    cap: float = 2.0,
) -> torch.Tensor:
    """Per-token off-policy weight (no grad); the caller multiplies any per-token loss by it.

        w = π_old / π_behaviour = exp(old_logp − rollout_logp)

    - "decoupled": min(w, cap). Decoupled PPO (AReaL, Fu et al. 2025): the loss's ratio is
      taken against the proximal policy π_old (recomputed now), and w corrects for tokens
      sampled by an older policy (staleness) plus any engine/trainer numeric mismatch.
      Departure: AReaL's reference code does not truncate, it drops tokens with w > cap
      (weight 0); that is "decoupled_filter".
    - "tis": min(w, cap). Truncated importance sampling (Yao et al. 2025, "Your efficient RL
      framework secretly brings you off-policy RL training"), meant for the synchronous case
      where π_old and π_behaviour are the same weights and differ only by engine/trainer
      numerics. The formula is identical to "decoupled": the two names say what the weight is
      expected to correct, not a different computation.
    - "decoupled_filter": w where w <= cap, else 0 (AReaL's behav_imp_weight_cap).
    - "none": 1.
    Masked positions get 0 in every mode. verl's rollout correction with rollout_is="token"
    (threshold 2.0) is "tis"; TRL's vllm_importance_sampling_mode "token_truncate" and
    "token_mask" are "tis" and "decoupled_filter" (cap 3.0 there, with an optional lower bound),
    but TRL defaults to "sequence_mask" (a whole sequence dropped when the product of its token
    ratios leaves the bounds), and sequence-level weights are not offered here.

    Args:
        old_logprobs: [B, T] float, proximal policy. rollout_logprobs: [B, T] float, behaviour
            policy (engine). loss_mask: [B, T] bool. mode: one of BEHAVIOUR_MODES.
        cap: C, the truncation (or filter) threshold; > 0.

    Returns:
        [B, T] float weight, detached.

    Raises:
        ValueError: unknown mode (the message lists the valid ones) or cap <= 0.
    """
    if mode not in BEHAVIOUR_MODES:
        raise ValueError(
            f"unknown off-policy correction {mode!r}; valid: {', '.join(BEHAVIOUR_MODES)}")
    if cap <= 0:
        raise ValueError(f"behaviour weight cap must be > 0; got {cap}")
    mask = loss_mask.to(torch.bool)
    if mode == "none":
        return mask.to(old_logprobs.dtype)
    log_w = (_select(old_logprobs, mask) - _select(rollout_logprobs, mask)).detach()
    w = torch.exp(log_w.clamp(max=_MAX_LOG_RATIO))
    if mode == "decoupled_filter":
        w = torch.where(w <= cap, w, torch.zeros_like(w))
    else:
        w = w.clamp(max=cap)
    return _select(w, mask)
