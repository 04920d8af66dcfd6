"""Reduce a per-token loss [B, T] to a scalar; the modes differ in how tokens are weighted."""

from __future__ import annotations

import torch

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(
    values: torch.Tensor, mask: torch.Tensor, mode: str, *, norm_tokens: int | None = None
) -> torch.Tensor:
    """Args:
        values: [B, T] per-token loss. mask: [B, T] bool, tokens that count.
        mode: "token-mean": Σ tokens / #tokens (DAPO; every token weighs the same);
            "seq-mean-token-sum": mean over sequences of Σ tokens;
            "seq-mean-token-mean": mean over sequences of the token mean (GRPO's original);
            "seq-mean-token-sum-norm": mean over sequences of Σ tokens / norm_tokens (Dr.GRPO,
            a constant instead of each length).
        norm_tokens: the constant of seq-mean-token-sum-norm (e.g. the max response length).
    Masked positions never contribute, even if they hold inf/NaN; an empty mask gives 0.
    """
    m = mask.to(torch.bool)
    masked = torch.where(m, values, torch.zeros_like(values))
    counts = m.sum(-1).to(values.dtype)
    seqs = max(values.shape[0], 1)
    if mode == "token-mean":
        return masked.sum() / counts.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).sum() / seqs
    if mode == "seq-mean-token-mean":
        return (masked.sum(-1) / counts.clamp(min=1)).sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        if not norm_tokens:
            raise ValueError("seq-mean-token-sum-norm needs norm_tokens (e.g. max_new_tokens)")
        return masked.sum(-1).sum() / (seqs * norm_tokens)
    raise ValueError(f"unknown aggregation mode {mode!r}; use one of {', '.join(MODES)}")
