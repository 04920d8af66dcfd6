"""Reduce a per-token loss [B, T] to a scalar; the modes differ only in how tokens are weighted.

Every policy loss in asyncrl.algo.losses returns an un-aggregated [B, T] tensor, so every mode
works with every loss. With L[b, t] the per-token value, m[b, t] the mask and n_b = Σ_t m[b, t]:

    token-mean               Σ_b Σ_t m L / Σ_b n_b          (DAPO: every token weighs the same)
    seq-mean-token-sum       (1/B) Σ_b Σ_t m L
    seq-mean-token-mean      (1/B) Σ_b (Σ_t m L) / n_b      (GRPO's original 1/|o_i|)
    seq-mean-token-sum-norm  (1/B) Σ_b (Σ_t m L) / N        (Dr.GRPO: a constant N, e.g. the
                                                             max response length)

The seq-mean modes divide by B, all rows, including rows with no trained token (they add 0):
the train backend splits a step into micro-batches and weights each by its share of rows, which
is only exact with this denominator. A row with n_b = 0 adds 0, never 0/0.

Against the other stacks: verl's agg_loss names the same modes but divides the seq-mean ones by
the rows that have a trained token (unless given a global batch size), and its
seq-mean-token-sum-norm is Σ_b Σ_t m L / N with no 1/B (N defaults to the padded response
width). TRL's GRPOTrainer names them by loss_type: "grpo" is seq-mean-token-mean, "bnpo" a
token-mean over one micro-batch, "dapo" a token-mean over the whole batch's tokens, and
"dr_grpo" is seq-mean-token-sum-norm with N = max_completion_length, as here.
"""

from __future__ import annotations

import torch

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    norm_tokens: int | None = None,
) -> torch.Tensor:
    """Reduce per-token values to a scalar (formulas in the module docstring).

    Args:
        values: [B, T] float, per-token loss. Masked positions never contribute, even if they
            hold inf or NaN (they are selected away, not multiplied by 0).
        mask: [B, T] bool, True for tokens that count.
        mode: one of MODES.
        norm_tokens: N of "seq-mean-token-sum-norm" (e.g. max_new_tokens); ignored otherwise.

    Returns:
        A 0-d tensor; 0 when the mask is empty.

    Raises:
        ValueError: unknown mode (the message lists MODES), shapes that differ, or
            "seq-mean-token-sum-norm" without a positive norm_tokens.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.to(torch.bool)
    masked = torch.where(m, values, torch.zeros_like(values))
    token_sums = masked.sum(-1)  # [B]
    counts = m.sum(-1).to(values.dtype)  # [B]
    rows = max(values.shape[0], 1)
    if mode == "token-mean":
        return token_sums.sum() / counts.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return token_sums.sum() / rows
    if mode == "seq-mean-token-mean":
        return (token_sums / counts.clamp(min=1)).sum() / rows
    if mode == "seq-mean-token-sum-norm":
        if norm_tokens is None or norm_tokens <= 0:
            raise ValueError(
                "aggregation 'seq-mean-token-sum-norm' needs norm_tokens > 0 "
                f"(e.g. the max response length); got {norm_tokens!r}"
            )
        return token_sums.sum() / (rows * norm_tokens)
    raise ValueError(f"unknown aggregation mode {mode!r}; valid modes: {', '.join(MODES)}")
