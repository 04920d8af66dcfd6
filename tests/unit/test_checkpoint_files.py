"""Checkpoint files: written atomically (a crash mid-write leaves the older ones as they were)
and only the newest `keep` survive."""

from __future__ import annotations

import pytest

from asyncrl.controller.checkpoint import (
    STATE_FILE,
    TRAINER_DIR,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    write_checkpoint,
)


async def _save_trainer(path):
    path.mkdir()
    (path / "weights.bin").write_bytes(b"w")


async def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        await write_checkpoint(checkpoint_path(tmp_path, step), save_trainer=_save_trainer,
                               state={"step": step}, keep=2)
    kept = list_checkpoints(tmp_path)
    assert [p.name for p in kept] == ["step-000004", "step-000005"]
    assert read_state(latest_checkpoint(tmp_path)) == {"step": 5}
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [p.name for p in kept]


async def test_a_crash_mid_write_leaves_the_previous_checkpoints_whole(tmp_path):
    await write_checkpoint(checkpoint_path(tmp_path, 1), save_trainer=_save_trainer,
                           state={"step": 1}, keep=2)

    async def crash(path):
        await _save_trainer(path)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await write_checkpoint(checkpoint_path(tmp_path, 2), save_trainer=crash,
                               state={"step": 2}, keep=2)
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    assert read_state(checkpoint_path(tmp_path, 1)) == {"step": 1}
    assert not (checkpoint_path(tmp_path, 2) / STATE_FILE).exists()
    # The next write of that step replaces the half-written leftover.
    await write_checkpoint(checkpoint_path(tmp_path, 2), save_trainer=_save_trainer,
                           state={"step": 2}, keep=2)
    assert read_state(latest_checkpoint(tmp_path)) == {"step": 2}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]


async def test_a_crash_while_rewriting_a_step_keeps_the_old_copy_of_it(tmp_path):
    """A resumed run may write a step it already has: the old copy stays until the new one is
    complete (a write in place would have destroyed it)."""
    path = checkpoint_path(tmp_path, 3)
    await write_checkpoint(path, save_trainer=_save_trainer, state={"version": "old"}, keep=2)

    async def crash(trainer_dir):
        trainer_dir.mkdir()
        raise OSError("killed")

    with pytest.raises(OSError):
        await write_checkpoint(path, save_trainer=crash, state={"version": "new"}, keep=2)
    assert read_state(path) == {"version": "old"}
    assert (path / TRAINER_DIR / "weights.bin").read_bytes() == b"w"
