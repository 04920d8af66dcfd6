"""YAML loading, `--set a.b=c` overrides and error messages that name the dotted field."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from asyncrl.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: check the path")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` in place; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, raw = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {override!r} is not of the form section.field=value "
            "(e.g. --set rollout.n_samples=4)"
        )
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"override {override!r}: {'.'.join(parents[: i + 1])} is a value, not a section"
            )
        node = child
    node[leaf] = value


def _known_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The field names of the section a location points into (for 'did you mean')."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not str(p).startswith("function-after"))
        field = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _known_keys(root, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            lines.append(
                f"{field}: unknown key. {hint}Known keys here: {', '.join(known)}"
                if known
                else f"{field}: unknown key; remove it"
            )
            continue
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("literal_error", "enum"):
            message = f"{message} (got {err.get('input')!r})"
        elif err["type"] != "value_error":
            message = f"{message} (got {err.get('input')!r})"
        lines.append(f"{field}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)
