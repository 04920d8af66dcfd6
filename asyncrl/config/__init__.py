"""Load a job config: YAML (or the built-in default), then `--set` overrides, then validation.

`load_config(path, overrides)` returns a `JobConfig` or raises `ConfigError` whose message names
every bad field by its dotted path and says what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from asyncrl.config.job import JobConfig
from asyncrl.config.overrides import apply_override, format_validation_error, read_yaml
from asyncrl.errors import ConfigError

__all__ = ["JobConfig", "load_config", "dump_resolved", "RESOLVED_NAME"]

RESOLVED_NAME = "config.resolved.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    for override in overrides or []:
        apply_override(data, override)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, JobConfig)) from None


def dump_resolved(config: JobConfig, run_dir: Path) -> Path:
    """Write every field (defaults and nulls included), enough to reproduce the run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / RESOLVED_NAME
    out.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out
