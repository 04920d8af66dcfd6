"""reasoning-gym datasets as procedural tasks: `data.task: reasoning_gym`, through config alone.

    data:
      task: reasoning_gym
      task_kwargs: {dataset: basic_arithmetic, prompt_style: compact, max_terms: 2}

`dataset` names any reasoning-gym dataset; `prompt_style` is "raw" (the question as written) or
"compact" (lower-cased, whitespace removed: the built-in tiny model's char vocabulary has no
space and no capitals); every other kwarg goes to the dataset's own config dataclass (a
comma-separated string becomes a list, e.g. `operators: "+,-"`). `seed` (default 0) is the
dataset's seed; `size` (default 100000) is how many distinct examples it has, and example i of a
split is entry `rng.randrange(size)`, so run.seed still varies the stream.

Each prompt carries its whole entry (question, answer, metadata) in
`Prompt.metadata["reasoning_gym"]`, because several datasets score against the metadata rather
than one oracle string. `score_prompt` (used by the `task` reward) scores with it; `score`
(answer only) is right for single-oracle datasets such as basic_arithmetic.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from asyncrl.types import Prompt, Reward

ENTRY_KEY = "reasoning_gym"  # Prompt.metadata key; the same literal as in reward/builtin/gym.py
DEFAULT_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class GymExample:
    prompt: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _config_kwargs(config_cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out = {}
    for name, value in kwargs.items():
        if name not in fields:
            raise ValueError(f"{name}: not a field of {config_cls.__name__}; known: "
                             f"dataset, prompt_style, {', '.join(fields)}")
        default = fields[name].default
        if isinstance(default, list | tuple) and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        out[name] = value
    return out


class GymTask:
    """A reasoning-gym dataset behind the procedural-task interface (`example`, `score`)."""

    name = "reasoning_gym"

    def __init__(self, dataset: str, prompt_style: Literal["raw", "compact"] = "raw",
                 **config: Any) -> None:
        from reasoning_gym.factory import DATASETS

        if dataset not in DATASETS:
            import difflib

            close = difflib.get_close_matches(str(dataset), DATASETS, n=3)
            raise ValueError(f"dataset: unknown reasoning-gym dataset {dataset!r}"
                             + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
        if prompt_style not in ("raw", "compact"):
            raise ValueError(f"prompt_style: must be 'raw' or 'compact' (got {prompt_style!r})")
        self.dataset, self.prompt_style, self.config = dataset, prompt_style, dict(config)
        dataset_cls, config_cls = DATASETS[dataset]
        kwargs = {"seed": 0, "size": DEFAULT_SIZE, **_config_kwargs(config_cls, config)}
        try:
            self._data = dataset_cls(config=config_cls(**kwargs))
            self._data[len(self._data) - 1]  # fixed-list datasets fail here, not mid-run
        except AssertionError as exc:  # reasoning-gym validates its configs with assert
            raise ValueError(f"invalid {dataset} config {kwargs}: {exc}") from None
        except IndexError:
            raise ValueError(f"size: {dataset} has fewer than {kwargs['size']} examples; set "
                             "data.task_kwargs.size lower") from None

    def __reduce__(self) -> tuple[Any, ...]:  # travels to actors by its arguments
        return _rebuild, (self.dataset, self.prompt_style, self.config)

    def render(self, question: str) -> str:
        if self.prompt_style == "compact":
            return "".join(question.lower().split())
        return question

    def example(self, rng: random.Random) -> GymExample:
        entry = self._data[rng.randrange(len(self._data))]
        return GymExample(prompt=self.render(entry["question"]), answer=str(entry["answer"]),
                          metadata={ENTRY_KEY: entry})

    def _score_entry(self, response: str, entry: dict[str, Any]) -> Reward:
        try:
            value = float(self._data.score_answer(response.strip(), entry))
        except Exception as exc:  # the dataset's code: this sample's failure, never a 0
            return Reward.failed(f"error: reasoning-gym {self.dataset}.score_answer raised "
                                 f"{type(exc).__name__}: {exc}"[:300])
        return Reward(value=value, correct=value >= 1.0)

    def score(self, response: str, answer: str) -> Reward:
        """Against the answer alone (the entry's metadata is not available here)."""
        return self._score_entry(response, {"question": "", "answer": answer,
                                            "metadata": {"source_dataset": self.dataset}})

    def score_prompt(self, prompt: Prompt, response: str) -> Reward:
        """Against the prompt's whole entry when it carries one (see the module docstring)."""
        entry = prompt.metadata.get(ENTRY_KEY)
        if entry is None:
            return self.score(response, prompt.answer or "")
        return self._score_entry(response, entry)


def _rebuild(dataset: str, prompt_style: str, config: dict[str, Any]) -> GymTask:
    return GymTask(dataset, prompt_style, **config)


def unknown_characters(task: Any, alphabet: str, *, seed: int, samples: int = 64
                       ) -> tuple[set[str], int]:
    """Characters of `samples` examples' prompts and answers outside `alphabet`, and the
    longest prompt (in characters). For checking a task against a char-level vocabulary."""
    rng = random.Random(f"{seed}/alphabet-check")
    outside: set[str] = set()
    longest = 0
    for _ in range(samples):
        example = task.example(rng)
        outside |= set(example.prompt + example.answer) - set(alphabet)
        longest = max(longest, len(example.prompt))
    return outside, longest
