"""reasoning-gym rewards: a dataset's own `score_answer(answer, entry)`.

The entry (question, answer, metadata) is what the scorer needs; several datasets check an
answer against `entry["metadata"]` rather than a single oracle string. It comes from
`Prompt.metadata["reasoning_gym"]`, where the `reasoning_gym` task (asyncrl/data/gym_task.py)
stores it. A prompt without it (e.g. from a JSONL file) is scored against `Prompt.answer` as the
entry's answer, which is right for datasets that compare with a single oracle answer.

value = the scorer's float (most datasets: 1.0 exact, partial credit for near misses, else 0);
correct = value ≥ 1. A scorer that raises is a failure ("error: ..."), never a 0.
"""

from __future__ import annotations

import difflib
from functools import cache
from typing import Any

from asyncrl.types import Prompt, Reward

ENTRY_KEY = "reasoning_gym"  # Prompt.metadata key; the same literal as in data/gym_task.py


def known_datasets() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_dataset(name: str, field: str = "dataset") -> str:
    """`name` if reasoning-gym has it, else ValueError naming `field` and close matches."""
    known = known_datasets()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"{field}: unknown reasoning-gym dataset {name!r}; {hint}"
                         f"{len(known)} are known (reasoning_gym.factory.DATASETS)")
    return name


@cache
def _scorer(name: str) -> Any:
    from reasoning_gym import get_score_answer_fn

    return get_score_answer_fn(name)


def extract_tag(response: str, tag: str) -> str | None:
    """The content of the last <tag>...</tag> in the response, stripped; None if there is none."""
    end = response.rfind(f"</{tag}>")
    start = response.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    return response[start + len(tag) + 2 : end].strip() if start >= 0 else None


def score_entry(dataset: str, answer: str | None, entry: dict[str, Any]) -> Reward:
    try:
        value = float(_scorer(dataset)(answer, entry))
    except Exception as exc:  # the dataset's own code: report it as that sample's failure
        return Reward.failed(f"error: reasoning-gym {dataset}.score_answer raised "
                             f"{type(exc).__name__}: {exc}"[:300])
    return Reward(value=value, correct=value >= 1.0)


class GymReward:
    """Scores with the reasoning-gym dataset's own scorer.

    Args:
        dataset: the dataset name; None: taken from the entry
            (`entry["metadata"]["source_dataset"]`, which every reasoning-gym entry carries).
        answer_tag: if set (e.g. "answer"), the answer is the content of the last
            `<answer>...</answer>` of the response, and a response without one scores what the
            dataset gives a missing answer (usually 0). None: the whole stripped response.
    """

    def __init__(self, dataset: str | None = None, answer_tag: str | None = None) -> None:
        self.dataset = None if dataset is None else check_dataset(dataset)
        if answer_tag is not None and (not isinstance(answer_tag, str)
                                       or not answer_tag.isidentifier()):
            raise ValueError(f"answer_tag: must be a tag name such as 'answer' "
                             f"(got {answer_tag!r})")
        self.answer_tag = answer_tag

    async def score(self, prompt: Prompt, response: str) -> Reward:
        entry = prompt.metadata.get(ENTRY_KEY)
        if entry is None:
            if prompt.answer is None:
                return Reward.failed("error: the prompt carries neither a reasoning-gym entry "
                                     f"(Prompt.metadata[{ENTRY_KEY!r}]) nor an answer")
            entry = {"question": prompt.text, "answer": prompt.answer, "metadata": {}}
        dataset = self.dataset or entry.get("metadata", {}).get("source_dataset")
        if dataset is None:
            return Reward.failed("error: no reasoning-gym dataset for this prompt: set "
                                 "reward.kwargs.dataset")
        answer = (extract_tag(response, self.answer_tag) if self.answer_tag
                  else response.strip())
        return score_entry(dataset, answer, entry)
