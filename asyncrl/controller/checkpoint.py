"""Whole-job checkpoints: trainer (weights, optimizer, version), DataManager state (groups,
partials, ledger), the prompt stream's cursor and the prompts still in play.

Written atomically: into a temporary directory, then renamed, so a crash mid-write leaves the
previous checkpoint intact. The producer is paused while the state is read, so the prompt
cursor and the DataManager agree; requests still in flight are saved as partials (resumed from
where they were dispatched), so nothing is lost or counted twice.
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

CHECKPOINT_DIR, TRAINER_DIR, STATE_FILE = "checkpoint", "trainer", "job_state.pkl"


async def write_checkpoint(
    path: Path, *, save_trainer: Callable[[Path], Awaitable[None]], state: dict[str, Any]
) -> Path:
    """`save_trainer(dir)` saves the trainer into dir; `state` is pickled beside it."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    await save_trainer(tmp / TRAINER_DIR)
    (tmp / STATE_FILE).write_bytes(pickle.dumps(state))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def read_state(path: Path) -> dict[str, Any]:
    return pickle.loads((path / STATE_FILE).read_bytes())
