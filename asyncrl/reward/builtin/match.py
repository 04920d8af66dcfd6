"""String rewards: exact match, and regex extraction followed by exact match.

Both compare against `Prompt.answer`; a prompt without one is a failure ("error: ..."), never a 0.
A response with no extractable answer is a wrong answer (value 0, correct False): the model did
not answer, the reward did not fail.
"""

from __future__ import annotations

import re
from typing import Literal

from asyncrl.types import Prompt, Reward

NO_ANSWER = "error: the prompt has no reference answer (Prompt.answer is None)"


class ExactMatchReward:
    """1 if the stripped response equals the prompt's stripped answer, else 0."""

    async def score(self, prompt: Prompt, response: str) -> Reward:
        if prompt.answer is None:
            return Reward.failed(NO_ANSWER)
        correct = response.strip() == prompt.answer.strip()
        return Reward(value=float(correct), correct=correct)


class RegexReward:
    """Extract the answer with a regular expression, then compare it with `Prompt.answer`.

    value = 1.0 if the extracted text (stripped) equals the stripped answer, else 0.0.

    Args:
        pattern: searched in the response (Python `re`; inline flags such as `(?s)` or `(?i)`
            work). If it has groups, group 1 is the answer, else the whole match. Examples:
            `\\\\boxed\\{([^{}]*)\\}` (a boxed answer without nested braces), `Answer:\\s*(\\S+)`.
        occurrence: which match counts when there are several, "first" or "last".
    """

    def __init__(self, pattern: str, occurrence: Literal["first", "last"] = "last") -> None:
        try:
            self._regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"pattern: {pattern!r} is not a valid regular expression ({exc})"
                             ) from None
        if occurrence not in ("first", "last"):
            raise ValueError(f"occurrence: must be 'first' or 'last' (got {occurrence!r})")
        self._last = occurrence == "last"

    def extract(self, response: str) -> str | None:
        match = None
        for found in self._regex.finditer(response):
            match = found
            if not self._last:
                break
        if match is None:
            return None
        return (match.group(1) if self._regex.groups else match.group(0)) or ""

    async def score(self, prompt: Prompt, response: str) -> Reward:
        if prompt.answer is None:
            return Reward.failed(NO_ANSWER)
        answer = self.extract(response)
        correct = answer is not None and answer.strip() == prompt.answer.strip()
        return Reward(value=float(correct), correct=correct)
