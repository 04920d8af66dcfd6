"""Operator commands to a running job through a file it watches: RUN_DIR/control.json.

`asyncrl scale RUN_DIR --rollout-workers N` writes it (atomically); the controller reads it
between training steps when it changed and applies it. A file it cannot use is logged and
ignored: a typo must not end a week-long run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL_FILE = "control.json"
KEYS = {"rollout_workers"}


def write_control(run_dir: Path, **commands: int) -> Path:
    unknown = set(commands) - KEYS
    if unknown:
        raise ValueError(f"unknown control keys {sorted(unknown)}; known: {sorted(KEYS)}")
    path = run_dir / CONTROL_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(commands))
    os.replace(tmp, path)
    return path


class ControlFile:
    """Yields the commands of RUN_DIR/control.json each time the file changes."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / CONTROL_FILE
        self._seen: float | None = self._mtime()  # a file left by an earlier run is old news

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def poll(self) -> dict[str, int]:
        mtime = self._mtime()
        if mtime is None or mtime == self._seen:
            return {}
        self._seen = mtime
        try:
            commands = json.loads(self.path.read_text())
            if not isinstance(commands, dict):
                raise ValueError("not a JSON object")
            bad = {k: v for k, v in commands.items()
                   if k not in KEYS or isinstance(v, bool) or not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"unusable entries {bad}; known keys {sorted(KEYS)}, "
                                 "values positive integers")
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.path, exc)
            return {}
        return commands
