"""Config errors name the dotted field and the fix; the CLI turns them into exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from asyncrl.config import RESOLVED_NAME, dump_resolved, load_config
from asyncrl.errors import ConfigError


def _error(overrides: list[str], path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_unknown_key_names_the_field_and_suggests_the_close_match():
    message = _error(["rollout.n_sample=4"])
    assert "rollout.n_sample: unknown key" in message
    assert "did you mean 'n_samples'" in message


def test_unknown_section_is_rejected():
    assert "rollouts: unknown key. did you mean 'rollout'" in _error(["rollouts.n_samples=4"])


def test_bad_type_names_field_and_value():
    message = _error(["rollout.n_samples=four"])
    assert "rollout.n_samples" in message and "'four'" in message


def test_bad_choice_lists_the_valid_ones():
    message = _error(["mode=fast"])
    assert "mode:" in message and "'sync' or 'async'" in message and "'fast'" in message


def test_negative_staleness_is_rejected():
    assert "max_staleness: Input should be greater than or equal to 0" in _error(
        ["mode=async", "max_staleness=-1"]
    )


def test_sync_mode_with_staleness_says_how_to_fix():
    message = _error(["max_staleness=2"])
    assert "max_staleness must be 0" in message and "mode=async" in message


def test_heads_must_divide_hidden_size():
    assert "model.tiny: num_heads (3) must divide hidden_size (128)" in _error(
        ["model.tiny.num_heads=3"]
    )


def test_malformed_override_is_explained():
    assert "section.field=value" in _error(["rollout.n_samples"])


def test_yaml_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert "does not exist" in _error([], missing)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in _error([], not_mapping)


def test_overrides_apply_on_top_of_the_file_and_resolved_config_round_trips(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"n_samples": 4}, "run": {"steps": 3}}))
    config = load_config(path, ["run.steps=5", "trainer.betas=[0.9, 0.95]"])
    assert (config.rollout.n_samples, config.run.steps) == (4, 5)
    assert config.trainer.betas == (0.9, 0.95)
    out = dump_resolved(config, tmp_path / "run")
    assert out.name == RESOLVED_NAME
    resolved = yaml.safe_load(out.read_text())
    assert resolved["model"]["path"] is None  # explicit nulls, not omitted
    assert load_config(out) == config


@pytest.mark.parametrize(
    "override, expected",
    [
        ("rollout.n_sample=4", "rollout.n_sample: unknown key"),
        ("trainer.lr=fast", "trainer.lr"),
        ("algorithm.loss=ppo2", "algorithm.loss"),
        ("data.task=chess", "data.task: unknown task 'chess'"),
        ("reward.fn=nosuch", "reward.fn: unknown name 'nosuch'"),
        ("reward.fn=nosuch_mod:score", "reward.fn: cannot import module 'nosuch_mod'"),
        ("model.path=/nonexistent/model", "model.path: '/nonexistent/model' is not an HF model"),
        ("data.train_file=/nonexistent.jsonl", "data.train_file: '/nonexistent.jsonl' does not"),
    ],
)
def test_cli_reports_config_errors_with_exit_code_2_and_no_traceback(override, expected, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "asyncrl", "train", "--set", override,
         "--set", f"run.output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_staleness_defaults_follow_the_mode():
    assert load_config(None, []).max_staleness == 0
    assert load_config(None, ["mode=async"]).max_staleness == 1
    assert load_config(None, ["mode=async", "max_staleness=3"]).max_staleness == 3


def test_partial_rollouts_need_staleness_room():
    message = _error(["rollout.partial=true"])
    assert "rollout.partial" in message and "max_staleness >= 1" in message
    assert load_config(None, ["mode=async", "rollout.partial=true", "rollout.oversample=2"])


def test_a_run_never_deletes_a_directory_that_is_not_a_run(tmp_path):
    from asyncrl.controller.run import prepare

    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=mine"])
    with pytest.raises(ConfigError, match="not an asyncrl run directory"):
        prepare(config)
    assert (precious / "notes.txt").read_text() == "keep me"
