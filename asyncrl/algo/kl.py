"""KL estimators (Schulman's k1/k2/k3, "Approximating KL Divergence", 2020) and entropy, per
token. Both return [B, T]; the caller weights and aggregates them (asyncrl.algo.aggregate).

The estimators estimate KL(π ‖ π_ref) from tokens sampled from π. Used as differentiable loss
terms their gradients differ from their values (on-policy, in expectation):
    k1: E_π[∇ log π] = 0, so k1 as a loss pushes nothing; it is a metric (or a reward penalty).
    k2: gradient of KL(π ‖ π_ref), the reverse KL it estimates (biased in value, right in grad).
    k3: gradient of KL(π_ref ‖ π), the forward KL (unbiased in value, not in gradient).
"""

from __future__ import annotations

import torch

KINDS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str,
    clamp: float | None = 10.0,
    *,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref), with d = logp − ref:

        k1 = d                       (unbiased, high variance, can be negative)
        k2 = ½ d²                    (biased, non-negative, low variance)
        k3 = exp(−d) − (−d) − 1      (unbiased, non-negative, low variance; = r − log r − 1
                                      with r = π_ref / π)

    For k3, d is first clamped to [−clamp, clamp] so exp cannot overflow (verl's "low_var_kl"
    guard; verl clamps at ±20 and then the result at ±10, here only the log-ratio is clamped).
    Beyond the clamp the k3 gradient is 0. k1 and k2 are never clamped (no exp). TRL's
    GRPOTrainer (beta > 0) uses the same k3 with no clamp at all (clamp=None); verl's "k3+"
    variant (k3's value with k2's gradient, straight-through) is not offered.

    Args:
        logprobs: [B, T] float, current policy (with grad when used as a loss).
        ref_logprobs: [B, T] float, reference policy.
        kind: "k1", "k2" or "k3".
        clamp: bound of |d| for k3; None disables it.
        loss_mask: optional [B, T] bool; when given, positions outside it are exactly 0 (and
            carry no gradient), whatever the inputs hold there.

    Returns:
        [B, T] estimate, logprobs' dtype.

    Raises:
        ValueError: unknown kind (the message lists KINDS).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KINDS)}")
    if loss_mask is not None:
        mask = loss_mask.to(torch.bool)
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
        ref_logprobs = torch.where(mask, ref_logprobs, torch.zeros_like(ref_logprobs))
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if clamp is not None:
        d = d.clamp(-clamp, clamp)
    return torch.exp(-d) + d - 1


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: H = −Σ_v p_v log p_v.

    Computed in float32. Vocabulary entries with p = 0 (e.g. −inf logits from a vocabulary
    mask) contribute exactly 0 and no NaN gradient; TRL's −Σ p log p and verl's
    logsumexp − Σ p·logits have the same value but give NaN for such entries (0 · −inf).

    Args:
        logits: [B, T, V] float; divide by the sampling temperature first if the entropy of the
            sampling distribution is wanted.

    Returns:
        [B, T] float32 entropy in nats.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    # 0 · (−inf) is NaN; select the log away where p = 0 so neither value nor gradient sees it.
    safe_log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    return -(p * safe_log_p).sum(-1)
