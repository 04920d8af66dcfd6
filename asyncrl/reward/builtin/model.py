"""A learned reward: an HF `AutoModelForSequenceClassification` scoring prompt + response.

value = the classifier's logit `label` (raw, unnormalised) for the text
`template.format(prompt=prompt.text, response=response)`; correct = None (a reward model does
not know accuracy). `score_batch` runs chunks of `batch_size` texts per forward pass (the
RewardPool calls it when present); `score` is a batch of one. Texts are right-padded and the
model reads the last non-pad token, so a text scores the same alone or in a batch.

The model is loaded on first use, not when the reward is built, so the driver's check of the
config does not load it. Forward passes run on a worker thread, one at a time.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

from asyncrl.types import Prompt, Reward


class RewardModel:
    """Scores with a sequence-classification model.

    Args:
        path: an HF model directory (config.json, weights, tokenizer files).
        batch_size: texts per forward pass.
        max_length: longer texts are truncated (from the right) to this many tokens.
        template: how prompt and response become one text (`{prompt}`, `{response}`).
        label: which output logit is the reward (0 for a one-label reward model).
        device: torch device, e.g. "cpu" or "cuda".
    """

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024,
                 template: str = "{prompt}{response}", label: int = 0,
                 device: str = "cpu") -> None:
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"path: {path!r} is not an HF model directory (no config.json)")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer (got {value!r})")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"label: must be a non-negative integer (got {label!r})")
        try:
            template.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"template: may use only {{prompt}} and {{response}} ({exc!r})"
                             ) from None
        self.path, self.batch_size, self.max_length = path, batch_size, max_length
        self.template, self.label, self.device = template, label, device
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path)
        tokenizer.padding_side = "right"
        model = AutoModelForSequenceClassification.from_pretrained(self.path)
        if tokenizer.pad_token is None:  # batching needs a pad token the model can find
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if self.label >= model.config.num_labels:
            raise ValueError(f"label {self.label} but the model has "
                             f"{model.config.num_labels} output(s) (reward.kwargs.label)")
        self._model = model.to(torch.device(self.device)).eval()
        self._tokenizer = tokenizer

    def _forward(self, texts: list[str]) -> list[float]:
        import torch

        if self._model is None:
            self._load()
        values: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(texts[start : start + self.batch_size], padding=True,
                                    truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self._model.device)
            with torch.inference_mode():
                logits = self._model(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits
            values += logits[:, self.label].float().tolist()
        return values

    async def score_batch(self, prompts: list[Prompt], responses: list[str]) -> list[Reward]:
        texts = [self.template.format(prompt=p.text, response=r)
                 for p, r in zip(prompts, responses, strict=True)]
        try:
            async with self._lock:
                values = await asyncio.to_thread(self._forward, texts)
        except Exception as exc:  # a load or forward error fails the chunk, never scores it 0
            return [Reward.failed(f"error: reward model {self.path}: "
                                  f"{type(exc).__name__}: {exc}"[:300])] * len(texts)
        return [Reward(value=v) if math.isfinite(v)
                else Reward.failed(f"error: reward model gave a non-finite score ({v})")
                for v in values]

    async def score(self, prompt: Prompt, response: str) -> Reward:
        return (await self.score_batch([prompt], [response]))[0]

    async def close(self) -> None:
        self._model = self._tokenizer = None
