"""The one teacher-forced forward that turns token ids into per-token logprobs.

Engines and trainers both call it (or must match it), so "engine logprobs equal trainer logprobs
for the same weights" has a single definition: positions come from the attention mask (padding
never shifts them), and logprobs are of softmax(logits / temperature) in fp32.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B, T] positions counting only real tokens (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of every token given the tokens before it.

    Args:
        input_ids: [B, T] int64.
        attention_mask: [B, T] bool, True for real tokens.
        temperature: logits are divided by it (the rollout temperature).
        with_entropy: also return the per-token entropy of the same distribution.

    Returns:
        logprobs [B, T] float32 with position 0 set to 0, and entropy [B, T] (or None).
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    picked = log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    zeros = picked.new_zeros(picked.shape[0], 1)
    out = torch.cat([zeros, picked], dim=1)
    if not with_entropy:
        return out, None
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return out, torch.cat([zeros, entropy], dim=1)
