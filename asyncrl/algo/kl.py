"""KL estimators (Schulman's k1/k2/k3) and entropy, per token."""

from __future__ import annotations

import torch


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str, clamp: float | None = 10.0
) -> torch.Tensor:
    """Estimate KL(π ‖ π_ref) per token from samples of π.

    Args:
        logprobs: [B, T] current policy. ref_logprobs: [B, T] reference policy.
        kind: "k1" = log r⁻¹ = logp − ref (unbiased, high variance, can be negative);
            "k2" = ½ (logp − ref)²; "k3" = exp(ref − logp) − (ref − logp) − 1 (unbiased,
            non-negative, low variance).
        clamp: the log-ratio is clamped to [−clamp, clamp] first (the "low-variance" guard
            against exp overflow; None disables).
    """
    log_ratio = logprobs - ref_logprobs
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits → [B, T] entropy of softmax(logits)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)
