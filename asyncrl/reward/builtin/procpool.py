"""A small pool of worker processes whose calls can be killed: one stuck call costs one worker.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot kill the one process running a stuck
call, and a worker that dies breaks the whole executor. Here every call has a wall-clock deadline;
past it (or when the caller is cancelled) the worker running it is SIGKILLed and a fresh one is
started in the background, while the other workers keep serving.

Each worker is a fresh interpreter (fork + exec, as multiprocessing's "spawn" does, so no
threads or locks are inherited) running this file as a script with a *handler* file: a
standalone module defining `handle(*args)` and optionally `init()`. Unlike multiprocessing's
spawn, the worker does not re-import the parent's `__main__` (pytest, the CLI, or Ray's worker
script) nor the asyncrl package (torch): it imports only the standard library and the handler,
which matters when a worker is replaced mid-run. (`python -P` keeps this directory, whose
math.py and code.py are named like standard modules, off sys.path.) Calls and results travel
pickled over a socket pair (`multiprocessing.connection.Connection`). A worker serves one call
at a time in its main thread, so libraries that time themselves out with SIGALRM work there.

The pool is used from one event loop at a time; a new loop keeps the idle workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SPAWN_RETRIES = 3  # a replacement that fails to start this often in a row breaks the pool


class CallTimeout(Exception):
    """The call ran past its deadline; its worker was killed and is being replaced."""


class WorkerCrashed(Exception):
    """The worker died (or could not start) while serving the call."""


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


class ProcessPool:
    """`size` worker processes serving a handler file; `await call(*args, timeout_s=...)`.

    Args:
        handler: path of a standalone module (standard library plus what it imports itself)
            defining `handle(*args)` and optionally `init()`, run once before the worker
            reports ready (imports, warm-up; not counted against any call).
        size: number of worker processes.
        memory_mb: RLIMIT_AS of each worker (None: unlimited).
        startup_timeout_s: how long a worker may take to become ready.
    """

    def __init__(self, handler: Path, *, size: int, memory_mb: int | None = None,
                 startup_timeout_s: float = 120.0) -> None:
        self._handler, self._memory_mb = Path(handler), memory_mb
        self._size, self._startup_timeout_s = size, startup_timeout_s
        self._workers: set[_Worker] = set()
        self._idle: list[_Worker] = []
        self._available: asyncio.Queue[_Worker | None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._broken: str | None = None
        self._replacing: set[asyncio.Task[None]] = set()
        self.replaced = 0  # workers killed (deadline, cancellation) or lost, and replaced

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids."""
        return [w.process.pid for w in self._workers]

    async def call(self, *args: Any, timeout_s: float) -> Any:
        """Run `handle(*args)` in a worker, at most `timeout_s` seconds of wall clock.

        Raises:
            CallTimeout: past the deadline (the worker is killed and replaced).
            WorkerCrashed: the worker died, or the pool cannot start workers.
            RuntimeError: `handle` raised (its type and message); the worker is fine.
        """
        queue = await self._queue()
        worker = await queue.get()
        if worker is None:  # the pool is broken: pass the marker on to the next waiter
            queue.put_nowait(None)
            raise WorkerCrashed(self._broken or "the pool is closed")
        self._idle.remove(worker)
        try:
            worker.conn.send(args)
            if not await asyncio.to_thread(worker.conn.poll, timeout_s):
                self._replace(worker, "ran past its deadline")
                raise CallTimeout(f"no answer within {timeout_s}s; worker killed and replaced")
            status, payload = worker.conn.recv()
        except (EOFError, OSError) as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):  # the pipe closes first
                await asyncio.to_thread(worker.process.wait, 1.0)
            code = worker.process.returncode
            self._replace(worker, "died")
            raise WorkerCrashed(f"worker died (exit code {code}): {type(exc).__name__}") from None
        except asyncio.CancelledError:
            self._replace(worker, "was cancelled")  # its call may still run: not reusable
            raise
        self._release(worker)
        if status == "raise":
            raise RuntimeError(payload)
        return payload

    async def _queue(self) -> asyncio.Queue[_Worker | None]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop: keep the idle workers
            for worker in self._workers - set(self._idle):
                self._discard(worker)  # busy in a loop that is gone: state unknown
            self._loop, self._available = loop, asyncio.Queue()
            for worker in self._idle:
                self._available.put_nowait(worker)
            if self._broken is not None:
                self._available.put_nowait(None)
        if not self._started:
            self._started = True
            workers = await asyncio.gather(*(self._spawn() for _ in range(self._size)),
                                           return_exceptions=True)
            for worker in workers:
                if isinstance(worker, _Worker):
                    self._release(worker)
            if not self._workers:
                self._break(f"workers failed to start: {workers[0]}")
        assert self._available is not None
        return self._available

    async def _spawn(self) -> _Worker:
        parent, child = Pipe()
        memory = "none" if self._memory_mb is None else str(self._memory_mb)
        process = subprocess.Popen(
            [sys.executable, "-P", "-B", __file__, str(child.fileno()), str(self._handler), memory],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        worker = _Worker(process, parent)
        self._workers.add(worker)
        try:
            if not await asyncio.to_thread(parent.poll, self._startup_timeout_s):
                raise WorkerCrashed(f"not ready within {self._startup_timeout_s}s")
            status, payload = parent.recv()
            if status != "ready":
                raise WorkerCrashed(f"init failed: {payload}")
        except (EOFError, OSError):
            self._discard(worker)
            raise WorkerCrashed(f"exited while starting (exit code {process.poll()})") from None
        except BaseException:
            self._discard(worker)
            raise
        return worker

    def _release(self, worker: _Worker) -> None:
        self._idle.append(worker)
        assert self._available is not None
        self._available.put_nowait(worker)

    def _discard(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        worker.kill()

    def _replace(self, worker: _Worker, why: str) -> None:
        log.warning("reward worker pid %s %s; replacing it", worker.process.pid, why)
        self._discard(worker)
        self.replaced += 1
        task = asyncio.get_running_loop().create_task(self._respawn())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _respawn(self) -> None:
        error: BaseException | None = None
        for attempt in range(SPAWN_RETRIES):
            try:
                self._release(await self._spawn())
                return
            except WorkerCrashed as exc:
                error = exc
                await asyncio.sleep(0.5 * 2**attempt)
        self._break(f"a replacement worker failed to start {SPAWN_RETRIES} times: {error}")

    def _break(self, reason: str) -> None:
        if self._broken is None and not self._workers:
            self._broken = reason
            log.error("reward process pool is broken: %s", reason)
            if self._available is not None:
                self._available.put_nowait(None)

    async def close(self) -> None:
        """Stop every worker (idle ones are asked to exit; busy ones are killed)."""
        for task in list(self._replacing):
            task.cancel()
        for worker in list(self._workers):
            if worker in self._idle:
                try:
                    worker.conn.send(None)
                    await asyncio.to_thread(worker.process.wait, 2)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            self._discard(worker)
        self._idle.clear()
        self._broken = "the pool is closed"
        if self._available is not None:
            self._available.put_nowait(None)


def _serve(fd: int, handler_path: str, memory_mb: str) -> None:
    """Worker main: limit memory, load the handler, init, answer ("ready",), serve until None."""
    import ctypes
    import importlib.util
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    libc = ctypes.CDLL(None)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: do not outlive the parent
    conn = Connection(fd)
    try:
        if memory_mb != "none":
            limit = int(memory_mb) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        spec = importlib.util.spec_from_file_location("_asyncrl_pool_handler", handler_path)
        assert spec is not None and spec.loader is not None
        handler = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(handler)
        if hasattr(handler, "init"):
            handler.init()
    except Exception as exc:  # tell the parent why, instead of dying silently
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            args = conn.recv()
        except EOFError:  # the parent went away
            return
        if args is None:
            return
        try:
            conn.send(("ok", handler.handle(*args)))
        except Exception as exc:  # report it; the caller decides what a raised call means
            conn.send(("raise", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    os._exit(0)
