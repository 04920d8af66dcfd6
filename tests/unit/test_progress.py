"""Progress output: bars and spinners on a terminal, nothing when stderr is not a TTY (logs,
CI, `ray job submit`); setup steps always log their duration."""

from __future__ import annotations

import logging
import os
import pty
import subprocess
import sys
import time

from asyncrl.metrics.report import setup_phase

SCRIPT = """
import time
from asyncrl.metrics.report import StepProgress, setup_phase
with setup_phase("building the model"):
    time.sleep(0.3)
with StepProgress(3, "train (sync)") as bar:
    for step in range(1, 4):
        bar.update(step, reward=0.5, acc=0.25)
        time.sleep(0.1)
"""


def _stderr_of(script: str, *, tty: bool) -> str:
    """What `script` writes to stderr, with stderr a pseudo-terminal or a pipe."""
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    if not tty:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=60, check=True)
        return done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                            stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(60) == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_draw_on_a_terminal_and_stay_quiet_otherwise():
    drawn = _stderr_of(SCRIPT, tty=True)
    assert "train (sync)" in drawn and "3/3" in drawn and "reward 0.5" in drawn
    assert _stderr_of(SCRIPT, tty=False) == ""


def test_a_setup_phase_logs_what_it_did_and_how_long_it_took(caplog):
    with caplog.at_level(logging.INFO, logger="asyncrl.metrics.report"):
        with setup_phase("warming up"):
            time.sleep(0.05)
    (record,) = [r for r in caplog.records if "warming up" in r.getMessage()]
    seconds = float(record.getMessage().split("done in ")[1].split(" s")[0])
    assert 0.0 < seconds < 5.0
