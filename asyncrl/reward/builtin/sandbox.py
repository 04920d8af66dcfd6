"""Run untrusted Python in a subprocess: resource limits, no network, a fresh directory, a kill.

One `Sandbox.run(code, tests)` starts `python -I -B -c <_harness.py>` (see that module for the
isolation it sets up) with:

- a fresh temporary directory as cwd and HOME, removed afterwards;
- a stripped environment (PATH, LANG, HOME, TMPDIR only) and `-I` (no PYTHON* variables, no
  user site, no script directory on sys.path);
- its own session/process group, killed on the wall-clock deadline: SIGTERM to the harness
  (which SIGKILLs PID 1 of its PID namespace, so the kernel kills and reaps everything inside),
  then SIGKILL to the whole process group as a backstop.

What the program does (exceptions, infinite loops, a fork bomb, running out of memory) is its
outcome, not a sandbox failure: tests that did not report a pass count as failed. Only a harness
that never started the program raises `SandboxError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HARNESS_SOURCE = Path(__file__).with_name("_harness.py").read_text()
STDOUT_CAP = 1 << 20  # result lines; more than this is the program flooding fd 1
STDERR_TAIL = 4096  # kept for debugging
TERM_GRACE_S = 1.0  # after SIGTERM, how long the harness gets to tear its namespace down
STARTUP_TIMEOUT_S = 30.0  # interpreter start-up on a loaded machine; not the program's time
Network = Literal["auto", "namespace", "hook"]


class SandboxError(Exception):
    """The sandbox itself failed (the harness did not start the program)."""


@dataclass(frozen=True, slots=True)
class SandboxResult:
    passed: int
    total: int
    outcome: str  # "done", "timeout", "exit:<code>" (died before finishing), "solution_error"
    isolation: str  # e.g. "netns+pidns" (root), "netns+pidns+userns", "hook"
    stderr: str
    duration_s: float

    @property
    def all_passed(self) -> bool:
        return self.passed == self.total


def _positive(name: str, value: object, kind: type = float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0 or (
            kind is int and not isinstance(value, int)):
        raise ValueError(f"{name}: must be a positive {kind.__name__} (got {value!r})")


class Sandbox:
    """Runs code plus tests with limits; see the module docstring.

    Args:
        timeout_s: wall-clock limit of the program (solution plus tests), counted from the
            moment the harness starts it, so a slow interpreter start-up on a loaded machine
            does not eat into it (the start-up has STARTUP_TIMEOUT_S of its own).
        memory_mb: RLIMIT_AS of the program's processes.
        fsize_mb: largest file the program may write (RLIMIT_FSIZE).
        nproc: most processes/threads the program may hold (RLIMIT_NPROC; counted in its own
            user namespace when not root, for its own uid when root).
        cpu_s: RLIMIT_CPU; default ceil(timeout_s) + 1.
        network: "auto" (namespaces if the kernel allows, else the audit hook), "namespace"
            (fail if unavailable), or "hook".
        python: the interpreter to run (default: this one).
    """

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 1024, fsize_mb: int = 16,
                 nproc: int = 32, cpu_s: int | None = None, network: Network = "auto",
                 python: str = sys.executable) -> None:
        _positive("timeout_s", timeout_s)
        for name, value in (("memory_mb", memory_mb), ("fsize_mb", fsize_mb), ("nproc", nproc)):
            _positive(name, value, int)
        if cpu_s is not None:
            _positive("cpu_s", cpu_s, int)
        if network not in ("auto", "namespace", "hook"):
            raise ValueError(f"network: must be 'auto', 'namespace' or 'hook' (got {network!r})")
        self.timeout_s = float(timeout_s)
        self.limits = dict(cpu_s=cpu_s or math.ceil(timeout_s) + 1, memory_mb=memory_mb,
                           fsize_mb=fsize_mb, nproc=nproc)
        self.network, self.python = network, python

    async def run(self, code: str, tests: list[str]) -> SandboxResult:
        nonce = secrets.token_hex(16)
        payload = json.dumps(dict(code=code, tests=tests, nonce=nonce, limits=self.limits,
                                  network=self.network)).encode()
        workdir = tempfile.mkdtemp(prefix="asyncrl-sandbox-")
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir,
               "TMPDIR": workdir}
        start = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(
                # The source goes on the command line: the sandbox user (maybe not the owner of
                # this checkout) need not be able to read the package's files.
                self.python, "-I", "-B", "-c", HARNESS_SOURCE, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=workdir,
                env=env, start_new_session=True)
            out, err, timed_out = await self._communicate(proc, payload, nonce)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return _parse(out, err, nonce, len(tests), timed_out, proc.returncode,
                      time.monotonic() - start)

    async def _communicate(self, proc: asyncio.subprocess.Process, payload: bytes,
                           nonce: str) -> tuple[bytes, bytes, bool]:
        """Feed the payload; give the harness STARTUP_TIMEOUT_S to start the program, then the
        program `timeout_s`; stop everything. Returns (stdout, stderr tail, timed out)."""
        assert proc.stdin and proc.stdout and proc.stderr
        started = asyncio.Event()
        readers = (asyncio.create_task(_read(proc.stdout, STDOUT_CAP, "head",
                                             f"{nonce} start".encode(), started)),
                   asyncio.create_task(_read(proc.stderr, STDERR_TAIL, "tail")))
        exited = asyncio.create_task(proc.wait())
        starting = asyncio.create_task(started.wait())
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(payload)
                await proc.stdin.drain()
                proc.stdin.close()
            await asyncio.wait({exited, starting}, timeout=STARTUP_TIMEOUT_S,
                               return_when=asyncio.FIRST_COMPLETED)
            if started.is_set():
                await asyncio.wait({exited}, timeout=self.timeout_s)
            timed_out = not exited.done()
        finally:
            starting.cancel()
            exited.cancel()
            await _stop(proc)
            # Pipes close when the last holder dies; one that escaped the group may keep them.
            done, pending = await asyncio.wait(readers, timeout=TERM_GRACE_S)
            for task in pending:
                task.cancel()
        out, err = (t.result() if t in done and not t.cancelled() else b"" for t in readers)
        return out, err, timed_out


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Stop the harness and its process group; reap the harness."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), TERM_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def _read(stream: asyncio.StreamReader, cap: int, keep: Literal["head", "tail"],
                marker: bytes = b"", seen: asyncio.Event | None = None) -> bytes:
    """Read to EOF, keeping at most `cap` bytes (the first or the last ones); set `seen` once
    `marker` has been read."""
    data = bytearray()
    while chunk := await stream.read(1 << 16):
        if keep == "tail":
            data += chunk
            del data[:-cap]
        elif len(data) < cap:
            data += chunk[: cap - len(data)]
        if seen is not None and not seen.is_set() and marker in data:
            seen.set()
    return bytes(data)


def _parse(out: bytes, err: bytes, nonce: str, total: int, timed_out: bool,
           returncode: int | None, duration_s: float) -> SandboxResult:
    passed: set[int] = set()
    isolation, finished, solution_ok = None, False, True
    for line in out.decode(errors="replace").splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != nonce:
            continue
        event = words[1:]
        if event[0] == "start" and len(event) == 2:
            isolation = event[1]
        elif event[0] == "unavailable":
            raise SandboxError("network: 'namespace' isolation is not available here (user or "
                               "network namespaces are not allowed); use 'auto' or 'hook'")
        elif event[:2] == ["solution", "fail"]:
            solution_ok = False
        elif event[0] == "test" and len(event) >= 3 and event[2] == "pass":
            if event[1].isdigit() and int(event[1]) < total:
                passed.add(int(event[1]))
        elif event[0] == "done":
            finished = True
    stderr = err.decode(errors="replace")
    if isolation is None:
        why = "timed out" if timed_out else f"exit code {returncode}"
        raise SandboxError(f"the harness did not start the program ({why}): {stderr[-500:]}")
    if finished:
        outcome = "done" if solution_ok else "solution_error"
    else:
        outcome = "timeout" if timed_out else f"exit:{returncode}"
    return SandboxResult(passed=len(passed), total=total, outcome=outcome, isolation=isolation,
                         stderr=stderr, duration_s=duration_s)
