"""metrics.jsonl (one JSON object per step or evaluation) and the console progress bar."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a")
        self._start = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        row = {"time_s": round(time.monotonic() - self._start, 3), **record}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in row.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StepProgress:
    """A rich progress bar with step, reward, accuracy and tokens/s; silent when not a TTY."""

    def __init__(self, total: int, description: str = "train") -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
            console=Console(stderr=True), disable=not sys.stderr.isatty(),
        )
        self._task = self._progress.add_task(description, total=total, status="")

    def __enter__(self) -> StepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, completed: int, **fields: float) -> None:
        status = "  ".join(f"{k} {v:.3g}" for k, v in fields.items())
        self._progress.update(self._task, completed=completed, status=status)


@contextlib.contextmanager
def setup_phase(description: str) -> Iterator[None]:
    """A spinner for a long setup step (model build, actor start) on a TTY; always a log line
    with its duration, so non-interactive logs show where start-up time went."""
    console = Console(stderr=True)
    start = time.perf_counter()
    status = console.status(f"{description}…") if sys.stderr.isatty() else contextlib.nullcontext()
    with status:
        yield
    log.info("%s: done in %.1f s", description, time.perf_counter() - start)


def write_ledger(path: Path, entries: list[dict]) -> None:
    """One JSON line per prompt: its fate and its sample ids' fates (pending, trained@VERSION,
    dropped:REASON)."""
    with path.open("w") as out:
        for entry in entries:
            out.write(json.dumps(entry) + "\n")
