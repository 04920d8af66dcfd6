"""Whole-job checkpoints: trainer (weights, optimizer, version), DataManager state (groups,
partials, ledger), the prompt stream's cursor and the prompts still in play.

Layout: run_dir/checkpoint/step-000042/{trainer/, job_state.pkl}; the newest `run.keep_checkpoints`
are kept and `--resume` takes the newest. Written atomically: into a temporary directory, then
renamed, so a crash mid-write leaves the previous checkpoints intact. The producer is paused
while the state is read, so the prompt cursor and the DataManager agree; requests still in
flight are saved as partials (resumed from where they were dispatched), so nothing is lost or
counted twice. The trainer process's random generators are saved too (rng_state.pt).
"""

from __future__ import annotations

import pickle
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR, TRAINER_DIR, STATE_FILE = "checkpoint", "trainer", "job_state.pkl"
RNG_FILE = "rng_state.pt"  # in TRAINER_DIR: the trainer process's generators


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*")
                  if p.suffix != ".tmp" and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


async def write_checkpoint(
    path: Path, *, save_trainer: Callable[[Path], Awaitable[None]], state: dict[str, Any],
    keep: int,
) -> Path:
    """`save_trainer(dir)` saves the trainer into dir; `state` is pickled beside it. Then only
    the newest `keep` checkpoints beside `path` are kept."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    await save_trainer(tmp / TRAINER_DIR)
    (tmp / STATE_FILE).write_bytes(pickle.dumps(state))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    for old in list_checkpoints(path.parent.parent)[:-keep]:
        shutil.rmtree(old)
    return path


def read_state(path: Path) -> dict[str, Any]:
    return pickle.loads((path / STATE_FILE).read_bytes())


def save_rng_state(path: str) -> None:
    """Save this process's random generators (run inside the trainer's process)."""
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()},
               Path(path) / RNG_FILE)


def load_rng_state(path: str) -> None:
    state = torch.load(Path(path) / RNG_FILE, weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
