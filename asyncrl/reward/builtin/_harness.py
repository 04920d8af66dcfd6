"""Child side of the code sandbox: isolate, limit, drop privileges, then run solution and tests.

Standard library only; run as `python -I -B _harness.py` in a fresh temporary directory, with a
JSON payload on stdin (see `sandbox.py`). Results are lines `<nonce> <event> ...` on stdout; the
program's own stdout is redirected to stderr, so it cannot interleave with them by accident.

Isolation, best first (`network` = "auto" takes the first that works):

1. Namespaces. Not root: `unshare(NEWUSER | NEWNET | NEWPID)` and map our own uid/gid. Root:
   `unshare(NEWNET | NEWPID)` directly. The new network namespace has only a loopback device,
   which is down: no connection can be made, not even to 127.0.0.1 of the host. The harness then
   forks; the child is PID 1 of the new PID namespace and runs the program. When PID 1 dies, the
   kernel kills every process left in the namespace, so nothing escapes the kill (not even a
   process that called setsid), and everything is reaped.
2. "hook": an audit hook in the program's process refuses socket use, exec and ctypes. Best
   effort: it stops ordinary code, not a determined attacker. Without a PID namespace the
   program runs in a forked child with its own process group, and the harness is a child
   subreaper: on exit or SIGTERM it kills that group and every orphan re-parented to it, and
   reaps them all (a process that left the group is still found among the orphans).

Limits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, no core dumps. Linux
does not enforce RLIMIT_NPROC for uid 0, so a root harness switches to a uid of its own
(UID_BASE + its pid, so concurrent sandboxes do not share a process budget) before running the
program, keeping only CAP_DAC_READ_SEARCH when the interpreter's files are not world-readable
(e.g. a Python under /root). no_new_privs is set in every mode.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 8, 36, 38
CAP_DAC_READ_SEARCH = 2
CAPABILITY_VERSION_3 = 0x20080522
UID_BASE, UID_SPAN = 1_000_000_000, 1_000_000  # far from real users' uids
BLOCKED_EVENTS = ("socket.", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                  "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "pty.spawn")

libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(result, what):
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _capset(caps):
    header = _CapHeader(CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = caps
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unshare(root):
    """Enter new namespaces; returns (labels, pid_namespace) or None if none are available."""
    user = 0 if root else CLONE_NEWUSER
    for flags, labels in ((CLONE_NEWNET | CLONE_NEWPID, ["netns", "pidns"]),
                          (CLONE_NEWNET, ["netns"])):
        if libc.unshare(flags | user) == 0:
            if not root:
                uid, gid = os.getuid(), os.getgid()
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"{uid} {uid} 1")
                _write("/proc/self/gid_map", f"{gid} {gid} 1")
                labels = [*labels, "userns"]
            return labels, "pidns" in labels
    return None


def _world_readable(path):
    """Every directory up to `path` is world-searchable (and the last one world-readable)."""
    path = os.path.realpath(path)
    while True:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _drop_root(uid, keep_read):
    """Become `uid` (enforcing RLIMIT_NPROC); keep only CAP_DAC_READ_SEARCH if asked."""
    os.chown(".", uid, uid)
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(KEEPCAPS)")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _capset(1 << CAP_DAC_READ_SEARCH if keep_read else 0)


def _limit(limits):
    cpu, memory, fsize = limits["cpu_s"], limits["memory_mb"] << 20, limits["fsize_mb"] << 20
    for which, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1),
                              (resource.RLIMIT_AS, memory, memory),
                              (resource.RLIMIT_FSIZE, fsize, fsize),
                              (resource.RLIMIT_NPROC, limits["nproc"], limits["nproc"]),
                              (resource.RLIMIT_NOFILE, 256, 256),
                              (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(which, (soft, hard))


def _audit(event, args):
    if event.startswith(BLOCKED_EVENTS):
        raise PermissionError(f"{event} is not allowed in the sandbox")


def _explain(what, exc):
    """One line on stderr (whose tail the sandbox keeps) saying why something failed."""
    try:
        os.write(2, f"{what}: {type(exc).__name__}: {exc}"[:300].encode() + b"\n")
    except Exception:  # the program may have closed fd 2, or exc may not print
        pass


def _run(payload, out, isolation):
    nonce = payload["nonce"]

    def emit(*words):
        os.write(out, (" ".join([nonce, *map(str, words)]) + "\n").encode())

    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    emit("start", "+".join(isolation))
    try:
        exec(compile(payload["code"], "solution.py", "exec"), namespace)
        emit("solution", "ok")
    except BaseException as exc:  # the program's failure is a result, not the harness's
        emit("solution", "fail", type(exc).__name__)
        _explain("solution", exc)
    for i, test in enumerate(payload["tests"]):
        try:
            exec(compile(test, f"test_{i}.py", "exec"), namespace)
            emit("test", i, "pass")
        except BaseException as exc:
            emit("test", i, "fail", type(exc).__name__)
            _explain(f"test {i}", exc)
    emit("done")


def _child(payload, out, isolation, slot, pid_one):
    """Runs the program: limits, privileges, then the code. Never returns.

    `slot` (the harness's pid, unique among running harnesses) picks a root harness's uid.
    """
    if pid_one:  # PID 1 of the namespace: die with the harness (getppid() is 0
        # in a new PID namespace, so the harness dying before this line cannot be detected;
        # the sandbox's group kill covers that window)
        _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
    _limit(payload["limits"])
    if os.geteuid() == 0:
        paths = [p for p in [sys.executable, *sys.path] if p and os.path.exists(p)]
        keep_read = not all(_world_readable(p) for p in paths)
        _drop_root(UID_BASE + slot % UID_SPAN, keep_read)
        if keep_read:
            isolation = [*isolation, "dac_read"]
    else:
        _capset(0)  # in a new user namespace we hold every capability there: drop them
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    if "hook" in isolation:
        sys.addaudithook(_audit)
    _run(payload, out, isolation)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced them
            pass
    os._exit(0)


def _children():
    """Pids whose parent is this process (orphans come here: we are a child subreaper)."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == me:
                pids.append(int(entry))
    return pids


def _kill_all(group, deadline_s=2.0):
    """Kill the program's process group and every descendant left, and reap them all."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.01)


def main():
    payload = json.loads(sys.stdin.buffer.read())
    out = os.dup(1)
    os.dup2(2, 1)  # the program's prints go to stderr
    mode = payload["network"]
    entered = None if mode == "hook" else _unshare(os.geteuid() == 0)
    if entered is None and mode == "namespace":
        os.write(out, f"{payload['nonce']} unavailable namespaces\n".encode())
        os._exit(3)
    isolation, pid_namespace = entered or (["hook"], False)
    if not pid_namespace:  # orphans of the program are re-parented to us, to be killed
        _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    parent = os.getpid()
    child = os.fork()  # with a PID namespace: PID 1 there
    if child == 0:
        if not pid_namespace:
            os.setpgid(0, 0)
        _child(payload, out, isolation, parent, pid_namespace)
    if not pid_namespace:
        try:
            os.setpgid(child, child)  # also here: no race with the kill below
        except (PermissionError, ProcessLookupError):
            pass
        os.write(out, f"{payload['nonce']} group {child}\n".encode())

    def stop(*_):  # SIGTERM from the sandbox: PID 1's death takes the namespace down with it
        if pid_namespace:
            os.kill(child, signal.SIGKILL)
        else:
            _kill_all(child)
            os._exit(128 + signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    _, status = os.waitpid(child, 0)
    if not pid_namespace:
        _kill_all(child)
    code = os.waitstatus_to_exitcode(status)
    os._exit(128 - code if code < 0 else code)  # a signal number as a shell would show it


if __name__ == "__main__":
    main()
