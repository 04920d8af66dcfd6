"""Off-policy expert data mixed into RL, as in CHORD (Zhang et al. 2025): the expert's tokens are
trained by a weighted SFT term beside the RL loss,

    L = (1 − μ_t) · L_RL(policy samples) + μ_t · mean over expert tokens of φ_t · (−log π_θ(y_t))

μ_t, the global coefficient, follows a schedule over the run (typically decaying, so training
moves from imitation to exploration). φ_t is the token-wise weight: 1 ("none"), or CHORD-φ's
p·(1 − p) with p = π_θ(y_t) detached ("p_one_minus_p"), which shrinks both the tokens the policy
already predicts and the ones it finds very unlikely, so expert data that is far from the policy
does not swamp exploration. Expert samples have no behaviour logprobs: they never enter the RL
term (no importance weight, no advantage), only this one.

Each term is normalised over its own rows (the RL term by the configured aggregation over the
policy's samples, the SFT term token-mean over the expert tokens), so μ = 0 is exactly the RL
loss and μ = 1 exactly the (weighted) SFT loss, whatever the two token counts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TOKEN_WEIGHTINGS = ("none", "p_one_minus_p")


def expert_coefficient(step: int, total_steps: int, *, start: float, end: float,
                       schedule: str) -> float:
    """μ at training step `step` (0-based) of `total_steps`: constant `start`, or from `start`
    to `end` linearly or along a half cosine."""
    if schedule == "constant":
        return start
    progress = min(step / max(total_steps - 1, 1), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown expert schedule {schedule!r}: use constant, linear or cosine")


def expert_sft_loss(logprobs: Tensor, mask: Tensor, weighting: str) -> tuple[Tensor, Tensor]:
    """(per-token weighted NLL [B, T], the plain NLL's mean over masked tokens, detached).

    Masked positions are 0 with 0 gradient (selected away, never multiplied by 0)."""
    if weighting not in TOKEN_WEIGHTINGS:
        raise ValueError(f"unknown token weighting {weighting!r}: use one of {TOKEN_WEIGHTINGS}")
    m = mask.to(torch.bool)
    lp = torch.where(m, logprobs, torch.zeros_like(logprobs))
    nll = -lp
    if weighting == "p_one_minus_p":
        p = lp.detach().exp()
        nll = nll * p * (1.0 - p)
    per_token = torch.where(m, nll, torch.zeros_like(nll))
    mean_nll = (torch.where(m, -lp, torch.zeros_like(lp)).sum() / m.sum().clamp(min=1)).detach()
    return per_token, mean_nll
