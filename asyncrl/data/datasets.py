"""Prompt sources: procedural tasks (an endless, seeded stream) and JSONL files (seeded
shuffle per epoch). Both are checkpointable by one integer cursor.

Example i of a split is generated from its own RNG seeded by (seed, split, i), so the stream's
whole state is one integer cursor. Training prompts whose text appears in the held-out set are
skipped, so held-out accuracy measures generalisation, not memorisation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from asyncrl.errors import ConfigError
from asyncrl.types import Prompt


def _example(task: Any, seed: int, split: str, index: int) -> Any:
    return task.example(random.Random(f"{seed}/{split}/{index}"))


def eval_examples(task: Any, seed: int, size: int) -> list[Any]:
    """The held-out set: `size` examples from the eval split."""
    return [_example(task, seed, "eval", i) for i in range(size)]


def to_prompt(prompt_id: str, example: Any, tokenizer: Any) -> Prompt:
    return Prompt(prompt_id=prompt_id, text=example.prompt,
                  input_ids=tokenizer(example.prompt).input_ids, answer=example.answer,
                  metadata=dict(getattr(example, "metadata", None) or {}))


class _CursorStream:
    """A prompt stream whose whole state is one integer cursor; subclasses define `next`."""

    cursor: int = 0

    def next(self) -> Prompt:
        raise NotImplementedError

    def take(self, count: int) -> list[Prompt]:
        return [self.next() for _ in range(count)]

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.cursor = state["cursor"]


class ProceduralPrompts(_CursorStream):
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


def read_jsonl(field: str, path: str, prompt_key: str, answer_key: str) -> list[Prompt]:
    """Read and check a JSONL prompt file; errors name the config field, file and line."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError(f"{field}: {path!r} is a directory; give the path of a JSONL file")
    if not file.is_file():
        raise ConfigError(f"{field}: {path!r} does not exist; give the path of a JSONL file")
    prompts = []
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        where = f"{field}: {path}:{number}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: not UTF-8 text (byte {exc.start}); re-encode the file "
                              "as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg}); one object per line") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
        text = row.get(prompt_key)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: no non-empty string under {prompt_key!r} "
                              "(set data.prompt_key to the field that holds the prompt)")
        answer = row.get(answer_key)
        if isinstance(answer, dict | list | bool):
            raise ConfigError(f"{where}: the answer under {answer_key!r} is a "
                              f"{type(answer).__name__}; give a string or a number (or set "
                              "data.answer_key to the field that holds it)")
        metadata = {k: v for k, v in row.items() if k not in (prompt_key, answer_key)}
        prompts.append(Prompt(prompt_id=f"{path}:{number}", text=text, input_ids=[],
                              answer=None if answer is None else str(answer), metadata=metadata))
    if not prompts:
        raise ConfigError(f"{field}: {path!r} has no prompts")
    return prompts


def tokenize_checked(
    field: str, prompts: list[Prompt], tokenizer: Any, max_prompt_tokens: int,
    *, need_answers: bool = False, default_budget: int = 0,
) -> list[Prompt]:
    """Fill input_ids; a prompt the tokenizer cannot represent, or that leaves no room for the
    answer, or (with need_answers) has no answer, is an error naming its line (prompt ids
    from read_jsonl are `path:line`)."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    representable: dict[str, bool] = {}  # per character: does it become a real token?

    def lost(ch: str) -> bool:
        if ch not in representable:
            ids = tokenizer(ch, add_special_tokens=False).input_ids
            representable[ch] = bool(ids) and unknown not in ids
        return not representable[ch]

    for prompt in prompts:
        prompt.input_ids = tokenizer(prompt.text).input_ids
        bad = sorted({ch for ch in prompt.text if not ch.isspace() and lost(ch)})
        if bad:  # read as <unk>, or silently dropped, by the tokenizer
            raise ConfigError(
                f"{field}: {prompt.prompt_id}: the model's tokenizer cannot represent "
                f"{''.join(bad)!r} (it would read them as {tokenizer.unk_token!r}); remove them, "
                "or use a model whose vocabulary has them (model.path)")
        if need_answers and prompt.answer is None:
            raise ConfigError(
                f"{field}: {prompt.prompt_id}: no answer, and it is scored against one (the "
                "task scorer and exact_match need it); add it under data.answer_key")
        room = max_prompt_tokens
        if "max_new_tokens" in prompt.metadata or "min_new_tokens" in prompt.metadata:
            budget = _budget(field, prompt, default_budget)
            room = max_prompt_tokens + default_budget - budget
            if room < 1:
                raise ConfigError(
                    f"{field}: {prompt.prompt_id}: max_new_tokens={budget} leaves no room for "
                    f"the prompt in the model's {max_prompt_tokens + default_budget} positions; "
                    "lower it")
        if len(prompt.input_ids) > room:
            raise ConfigError(
                f"{field}: {prompt.prompt_id}: the prompt has {len(prompt.input_ids)} tokens, "
                f"more than the {room} the model has room for beside "
                "rollout.max_new_tokens; shorten it or drop the line"
            )
    return prompts


def _budget(field: str, prompt: Prompt, default: int) -> int:
    """A prompt's own `max_new_tokens` (and `min_new_tokens` below it), checked."""
    values = {}
    for key in ("max_new_tokens", "min_new_tokens"):
        value = prompt.metadata.get(key, default if key == "max_new_tokens" else 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{field}: {prompt.prompt_id}: {key} must be a non-negative "
                              f"integer (got {value!r})")
        values[key] = value
    if values["max_new_tokens"] < 1 or values["min_new_tokens"] > values["max_new_tokens"]:
        raise ConfigError(f"{field}: {prompt.prompt_id}: need 0 <= min_new_tokens <= "
                          f"max_new_tokens and max_new_tokens >= 1 (got {values})")
    return values["max_new_tokens"]


class FilePrompts(_CursorStream):
    """Training prompts from a file, reshuffled (seeded) every epoch, ids unique per draw."""

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        self._prompts, self._seed = prompts, seed
        self.cursor = 0

    def next(self) -> Prompt:
        epoch, offset = divmod(self.cursor, len(self._prompts))
        order = list(range(len(self._prompts)))
        random.Random(f"{self._seed}/epoch/{epoch}").shuffle(order)
        source = self._prompts[order[offset]]
        prompt = Prompt(prompt_id=f"train-{self.cursor}", text=source.text,
                        input_ids=source.input_ids, answer=source.answer,
                        metadata=source.metadata)
        self.cursor += 1
        return prompt
