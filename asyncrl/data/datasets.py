"""Prompt sources. Procedural tasks give an endless, seeded, checkpointable stream.

Example i of a split is generated from its own RNG seeded by (seed, split, i), so the stream's
whole state is one integer cursor. Training prompts whose text appears in the held-out set are
skipped, so held-out accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
from typing import Any

from asyncrl.types import Prompt


def _example(task: Any, seed: int, split: str, index: int) -> Any:
    return task.example(random.Random(f"{seed}/{split}/{index}"))


def eval_examples(task: Any, seed: int, size: int) -> list[Any]:
    """The held-out set: `size` examples from the eval split."""
    return [_example(task, seed, "eval", i) for i in range(size)]


def to_prompt(prompt_id: str, example: Any, tokenizer: Any) -> Prompt:
    return Prompt(prompt_id=prompt_id, text=example.prompt,
                  input_ids=tokenizer(example.prompt).input_ids, answer=example.answer)


class ProceduralPrompts:
    """An endless stream of training prompts from a procedural task."""

    def __init__(self, task: Any, tokenizer: Any, seed: int, exclude: set[str]) -> None:
        self._task, self._tokenizer, self._seed = task, tokenizer, seed
        self._exclude = exclude
        self.cursor = 0

    def next(self) -> Prompt:
        while True:
            index = self.cursor
            self.cursor += 1
            example = _example(self._task, self._seed, "train", index)
            if example.prompt not in self._exclude:
                return to_prompt(f"train-{index}", example, self._tokenizer)

    def take(self, count: int) -> list[Prompt]:
        return [self.next() for _ in range(count)]

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = state["cursor"]
