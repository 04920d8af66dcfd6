"""JSONL prompt files: read, shuffled per epoch, checkpointable; bad files fail with the line."""

from __future__ import annotations

import json

import pytest

from asyncrl.data.datasets import FilePrompts, read_jsonl, tokenize_checked
from asyncrl.errors import ConfigError
from asyncrl.models.tiny import build_char_tokenizer


def _write(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_file_is_read_tokenized_and_cycled_in_a_seeded_order(tmp_path):
    rows = [json.dumps({"prompt": f"sort:{i}{i}1=", "answer": f"1{i}{i}", "level": i})
            for i in range(5)]
    path = _write(tmp_path, rows[:3] + [""] + rows[3:])  # blank lines are skipped
    prompts = tokenize_checked("data.train_file", read_jsonl("data.train_file", path, "prompt",
                                                             "answer"),
                               build_char_tokenizer(), max_prompt_tokens=64)
    assert [p.metadata["level"] for p in prompts] == [0, 1, 2, 3, 4]
    assert prompts[4].prompt_id == f"{path}:6" and prompts[0].input_ids
    stream = FilePrompts(prompts, seed=3)
    epoch1 = stream.take(5)
    assert sorted(p.text for p in epoch1) == sorted(p.text for p in prompts)  # each once
    assert len({p.prompt_id for p in [*epoch1, *stream.take(5)]}) == 10  # ids unique per draw
    state = stream.state_dict()
    again = FilePrompts(prompts, seed=3)
    again.load_state_dict(state)
    assert [p.text for p in again.take(4)] == [p.text for p in stream.take(4)]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a"', '{"prompt": "b"}'], "data.jsonl:1: not valid JSON"),
    (['{"prompt": "a"}', '["a", "b"]'], "data.jsonl:2: expected a JSON object, got list"),
    (['{"question": "a"}'], "data.jsonl:1: no non-empty string under 'prompt'"),
    (['{"prompt": ""}'], "no non-empty string under 'prompt'"),
    (['{"prompt": 7}'], "data.jsonl:1: no non-empty string"),
    (["", "  "], "has no prompts"),
])
def test_bad_files_name_the_field_file_and_line(tmp_path, lines, message):
    path = _write(tmp_path, lines)
    with pytest.raises(ConfigError, match=message) as info:
        read_jsonl("data.train_file", path, "prompt", "answer")
    assert str(info.value).startswith("data.train_file: ")


def test_a_missing_file_and_a_too_long_prompt_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.eval_file: .* does not exist"):
        read_jsonl("data.eval_file", str(tmp_path / "nope.jsonl"), "prompt", "answer")
    path = _write(tmp_path, ['{"prompt": "short"}', json.dumps({"prompt": "x" * 50})])
    prompts = read_jsonl("data.train_file", path, "prompt", "answer")
    with pytest.raises(ConfigError, match=r"data.jsonl:2: the prompt has 50 tokens, more than "
                                          r"the 20 .*rollout.max_new_tokens"):
        tokenize_checked("data.train_file", prompts, build_char_tokenizer(), max_prompt_tokens=20)
