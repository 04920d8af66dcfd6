"""Supervised warm start of the built-in model on its task, so RL starts from a non-zero reward.

Deliberately short: it should leave plenty of accuracy for RL to win.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from asyncrl.models.forward import token_logprobs


def warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    example: Callable[[random.Random], Any],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    exclude: set[str],
) -> None:
    """Teacher-forced cross-entropy on `prompt + answer + EOS`, loss on the answer tokens only."""
    rng = random.Random(f"warm-start/{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        rows = []
        while len(rows) < batch_size:
            ex = example(rng)
            if ex.prompt not in exclude:
                prompt = tokenizer(ex.prompt).input_ids
                answer = tokenizer(ex.answer).input_ids + [tokenizer.eos_token_id]
                rows.append((prompt, answer))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.bool)
        target = torch.zeros((batch_size, width), dtype=torch.bool)
        for i, (p, a) in enumerate(rows):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            attention[i, : len(p) + len(a)] = True
            target[i, len(p) : len(p) + len(a)] = True
        logprobs, _ = token_logprobs(model, ids, attention)
        loss = -(logprobs * target).sum() / target.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
