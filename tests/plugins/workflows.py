"""User workflows that tests name by 'module:factory' path, as a user's config would."""

from __future__ import annotations

import asyncio
from typing import Any

from asyncrl.rollout.workflow import Step
from asyncrl.types import Prompt


class SlowEcho:
    """An environment whose step takes a while (a tool call): it answers every turn with
    `reply`, after `delay_s` seconds, and counts its calls in the episode state."""

    def __init__(self, reply: str = "ok", delay_s: float = 0.05) -> None:
        self.reply, self.delay_s = reply, delay_s

    def start(self, prompt: Prompt) -> dict[str, Any]:
        return {"calls": 0}

    async def step(self, turn: str, state: dict[str, Any]) -> Step:
        await asyncio.sleep(self.delay_s)
        state["calls"] += 1
        return Step(observation=self.reply)


def no_step(**kwargs: Any) -> object:
    """A wrong workflow: it has start but no step."""

    class Half:
        def start(self, prompt: Prompt) -> dict[str, Any]:
            return {}

    return Half()


class NeedsAnswer:
    """Its start fails on a prompt without an answer (as a mismatched data.task would)."""

    def start(self, prompt: Prompt) -> dict[str, Any]:
        raise KeyError("this environment needs metadata['board']")

    def step(self, turn: str, state: dict[str, Any]) -> Step:
        return Step(done=True)


class FlakyGuess:
    """The guessing game, except that its tool raises on the second turn of episodes whose
    secret is even (a bug in a user's environment, hit by some samples only)."""

    def __init__(self) -> None:
        from asyncrl.rollout.workflow.guess_number import GuessNumberEnv

        self._game = GuessNumberEnv()

    def start(self, prompt: Prompt) -> dict[str, Any]:
        return {**self._game.start(prompt), "turn": 0}

    def step(self, turn: str, state: dict[str, Any]) -> Step:
        state["turn"] += 1
        if state["turn"] == 2 and state["secret"] % 2 == 0:
            raise RuntimeError("the tool exploded")
        return self._game.step(turn, state)
