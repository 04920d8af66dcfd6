"""`rollout.workflow: guess_number`: the environment half of the guessing game (rules and the
task in asyncrl.data.guess_task). State: the range and the secret, from the prompt."""

from __future__ import annotations

from typing import Any

from asyncrl.data.guess_task import feedback, prompt_range
from asyncrl.rollout.workflow import Step
from asyncrl.types import Prompt


class GuessNumberEnv:
    """Answers each guess with `<`, `>` or `?`; done at the right one."""

    def start(self, prompt: Prompt) -> dict[str, Any]:
        low, high = prompt_range(prompt.text)
        if prompt.answer is None or not prompt.answer.isdigit():
            raise ValueError(f"prompt {prompt.prompt_id!r} has no integer answer (the secret); "
                             "use data.task=guess_number")
        return {"low": low, "high": high, "secret": int(prompt.answer)}

    def step(self, turn: str, state: dict[str, Any]) -> Step:
        answer = feedback(turn, state["low"], state["high"], state["secret"])
        return Step(done=True) if answer is None else Step(observation=answer)
