"""Resolve the job's model to an HF directory before any actor starts.

`model.path` set: check it looks like an HF model directory. Unset: build the tiny built-in
model and tokenizer, warm-start them on the task and save them under the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from asyncrl.config.job import ModelConfig
from asyncrl.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_model(
    cfg: ModelConfig,
    task: Any,
    *,
    seed: int,
    exclude: set[str],
    out_dir: Path,
) -> Path:
    if cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path: {cfg.path!r} is not an HF model directory (no config.json); "
                "point it at a saved model, or remove it to build the tiny built-in model"
            )
        return path

    from asyncrl.models.tiny import build_char_tokenizer, build_tiny_model, save_pretrained
    from asyncrl.models.warm_start import warm_start

    tokenizer = build_char_tokenizer()
    t = cfg.tiny
    model = build_tiny_model(
        len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
        hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, seed=seed,
    )
    w = cfg.warm_start
    warm_start(
        model, tokenizer, task.example, steps=w.steps, batch_size=w.batch_size, lr=w.lr,
        seed=seed, exclude=exclude,
    )
    save_pretrained(model, tokenizer, out_dir)
    params = sum(p.numel() for p in model.parameters())
    log.info("built tiny model (%d params) at %s", params, out_dir)
    return out_dir
