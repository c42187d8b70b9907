"""Run untrusted Python (model-written code) in a sandbox that contains it.

Every run is its own process tree in a fresh temporary directory, which is removed afterwards. Isolation, best
first (`isolation()` says which one this machine has):

  bwrap    bubblewrap: new mount, pid, network, ipc and uts namespaces. The child's whole file system is /usr
           and the Python installation (read-only), /proc, a minimal /dev, an empty /tmp, and the run's directory
           as /sandbox (its cwd and HOME): no /home, /root, /work or any other file of the user's.
  unshare  util-linux unshare: new network and pid namespaces only. No network and no signals to processes
           outside, but the file system is the host's (read as the sandbox uid when run as root, so /root stays
           closed; world-readable files do not). `scripts/install_sandbox.sh` installs bubblewrap on Debian.

In both the environment is scrubbed (PATH, HOME, LANG only) and the child sets, before the program runs: CPU
seconds, address space, file size (its output included: stdout/stderr go to a file the parent reads), process
count, open files, no core files. The parent enforces the wall time and kills the namespace's whole tree.

Run as root, the child drops to a uid of its own (`SANDBOX_UID` + worker slot): root is exempt from the process
limit, and per-slot uids keep a fork bomb in one worker from starving another of processes.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from r1kit.eval import EvalError

log = logging.getLogger("r1kit")
SANDBOX_UID = 1_500_000  # + worker slot; an unused range: no user owns files or processes there
SANDBOX_DIR = "/sandbox"  # where the run's directory appears under bwrap
FAIL_MARK = "__r1kit_sandbox_failed__ "
DONE_MARK = "__r1kit_sandbox_done__ "  # + a per-run nonce, written by the runner once the program has run to the end
OUTPUT_TAIL = 2000  # characters of the program's output kept in the result

# Runs in the sandbox before the program: drop to the sandbox uid (root only), set the limits, run program.py,
# exit 0 only when it ran to the end, writing DONE_MARK + the run's nonce last (so that a program ending itself
# early with os._exit(0) does not pass). argv: uid (-1: keep), cpu s, memory MB, file MB, processes, open files,
# nonce.
RUNNER = f"""
import os, resource, sys
uid, cpu, mem, fsize, nproc, nofile = map(int, sys.argv[1:7])
done = ("\\n{DONE_MARK}" + sys.argv[7]).encode()
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
for limit, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem << 20, mem << 20),
                          (resource.RLIMIT_FSIZE, fsize << 20, fsize << 20), (resource.RLIMIT_NPROC, nproc, nproc),
                          (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(limit, (soft, hard))
sys.argv = ["program.py"]
try:
    with open("program.py") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {{"__name__": "__main__"}})
    sys.stdout.flush()
except BaseException as e:
    try:
        sys.stdout.flush()
        os.write(2, ("\\n{FAIL_MARK}" + type(e).__name__ + (": " + str(e)[:300] if str(e) else "")).encode())
    except (OSError, ValueError):  # the output is at its size limit (the parent says so), or stdout is closed
        pass
    os._exit(1)
try:
    os.write(2, done)
except OSError:  # the output is at its size limit: the parent reports that
    os._exit(1)
os._exit(0)
"""


class SandboxError(EvalError):
    """No way to sandbox code on this machine (neither bubblewrap nor unshare works)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, enforced by the parent
    cpu_s: int = 10
    memory_mb: int = 1024  # address space
    file_mb: int = 4  # largest file written, the program's output included
    processes: int = 16  # of the sandbox uid (root) or in the sandbox's user namespace
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s", "memory_mb", "file_mb", "processes", "open_files"):
            if not getattr(self, name) > 0:
                raise EvalError(f"sandbox limit {name} = {getattr(self, name)!r}: must be > 0")


DEFAULT_LIMITS = SandboxLimits()


@dataclass(frozen=True)
class RunResult:
    passed: bool
    result: str  # "passed", or why not: the exception, the limit hit, the exit status
    output: str  # the last OUTPUT_TAIL characters of stdout + stderr


def _python() -> tuple[str, str]:
    """(interpreter, installation prefix): the base interpreter, not a virtual environment's (the program needs
    the standard library only, and the sandbox shows it no site-packages)."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return exe, os.path.realpath(sys.base_prefix)


def _bwrap_prefix(workdir: str, as_root: bool) -> list[str]:
    exe, prefix = _python()
    cmd = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try", "--clearenv", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):  # merged-/usr symlinks, or real folders elsewhere
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in [prefix] + ([] if exe.startswith(prefix + "/") else [os.path.dirname(exe)]):
        if path != "/usr" and not path.startswith("/usr/"):  # a Python outside /usr (pyenv, conda)
            cmd += _open_parents(path) + ["--ro-bind", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", workdir, SANDBOX_DIR,
            "--chdir", SANDBOX_DIR]
    for key, value in _env(SANDBOX_DIR).items():
        cmd += ["--setenv", key, value]
    # root: no user namespace (root in one is still exempt from RLIMIT_NPROC), just the right to drop to the
    # sandbox uid; others: a user namespace, in which the process count starts at zero
    return cmd + (["--cap-add", "CAP_SETUID,CAP_SETGID"] if as_root else ["--unshare-user"])


def _open_parents(path: str) -> list[str]:
    """bwrap arguments that create path's parent folders traversable (bwrap would copy the host's modes: /root's
    0700 would keep the sandbox uid out of a Python installed under it)."""
    parents = [p for p in Path(path).parents if str(p) != "/"][::-1]
    return [arg for p in parents for arg in ("--perms", "0755", "--dir", str(p))]


def _unshare_prefix(as_root: bool) -> list[str]:
    return ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"] + ([] if as_root else ["-r"])


def _env(home: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _command(kind: str, workdir: str, limits: SandboxLimits, slot: int, nonce: str) -> list[str]:
    as_root = os.geteuid() == 0
    prefix = _bwrap_prefix(workdir, as_root) if kind == "bwrap" else _unshare_prefix(as_root)
    uid = SANDBOX_UID + slot if as_root else -1
    return prefix + [_python()[0], "-I", "-S", "-c", RUNNER, str(uid), str(limits.cpu_s), str(limits.memory_mb),
                     str(limits.file_mb), str(limits.processes), str(limits.open_files), nonce]


@cache
def isolation() -> str:
    """'bwrap' or 'unshare': the best isolation that runs here (probed once). SandboxError when neither does."""
    reasons = []
    for kind in ("bwrap", "unshare"):
        if shutil.which(kind) is None:
            reasons.append(f"{kind}: not installed")
            continue
        res = _run(kind, "import json, typing", SandboxLimits(timeout_s=30), 0)  # the standard library is readable
        if res.passed:
            if kind != "bwrap":
                log.warning("sandbox: %s only (no network, no signals out, but the host's files are visible): %s",
                            kind, "; ".join(reasons))
            return kind
        reasons.append(f"{kind}: {res.result}")
    raise SandboxError("no sandbox for model-written code: " + "; ".join(reasons) +
                       " (scripts/install_sandbox.sh installs bubblewrap on Debian)")


def run_python(source: str, limits: SandboxLimits = DEFAULT_LIMITS, slot: int = 0) -> RunResult:
    """Run `source` as a Python program in the sandbox (see the module docstring); passed when it runs to the
    end (exit status 0) within the limits. `slot` picks the sandbox uid: one per concurrent run."""
    return _run(isolation(), source, limits, slot)


def _run(kind: str, source: str, limits: SandboxLimits, slot: int) -> RunResult:
    workdir = tempfile.mkdtemp(prefix="r1kit-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(source)
        os.chmod(workdir, 0o755)
        if os.geteuid() == 0:
            os.chown(workdir, SANDBOX_UID + slot, SANDBOX_UID + slot)
        with tempfile.TemporaryFile() as out:  # outside the sandbox's folder; the file-size limit caps it
            nonce = secrets.token_hex(8)
            proc = subprocess.Popen(_command(kind, workdir, limits, slot, nonce), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=workdir, env=_env(workdir), start_new_session=True)
            timed_out = _wait(proc, limits.timeout_s)
            size = out.seek(0, os.SEEK_END)
            out.seek(max(0, size - 4 * OUTPUT_TAIL))
            output = out.read().decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    verdict = _verdict(proc.returncode, timed_out, output, size >= limits.file_mb << 20, limits,
                       f"{DONE_MARK}{nonce}" in output[-(len(DONE_MARK) + 64):])
    output = output.replace(f"\n{DONE_MARK}{nonce}", "")
    return RunResult(verdict == "passed", verdict, output[-OUTPUT_TAIL:])


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the sandbox; True when it ran past timeout_s and was killed.

    The kill goes to the new pid namespace's first process (bwrap's or unshare's child): the kernel then kills
    everything in the namespace and that process exits only once all of it is gone, so when bwrap/unshare
    (waiting for it) returns, nothing of the run is left. Its process group is killed too, in case it is stuck.
    """
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        for pid in (children.read_text().split() if children.exists() else []):
            _kill(os.kill, int(pid))
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(os.killpg, proc.pid)
            proc.wait()
        return True


def _kill(kill: Callable[[int, int], None], pid: int) -> None:
    try:
        kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _verdict(rc: int, timed_out: bool, output: str, full_output: bool, limits: SandboxLimits, done: bool) -> str:
    """Why a run passed or failed, in a few words (``done``: the runner's end mark, with this run's nonce)."""
    if timed_out:
        return f"timed out after {limits.timeout_s:g} s"
    if rc == 0 and done:
        return "passed"
    if rc == 0:
        return "exited before the end (os._exit)"
    if full_output:
        return f"output over the file size limit ({limits.file_mb} MB)"
    if FAIL_MARK in output:
        return output.rsplit(FAIL_MARK, 1)[1].strip().splitlines()[0]
    sig = -rc if rc < 0 else rc - 128 if 128 < rc < 160 else 0  # bwrap reports a killed child as 128 + signal
    if sig == signal.SIGXCPU:
        return f"killed: CPU time limit ({limits.cpu_s} s)"
    if sig == signal.SIGKILL:
        return f"killed (SIGKILL): CPU time hard limit ({limits.cpu_s + 1} s) or out of memory"
    if sig in signal.valid_signals():
        return f"killed by {signal.Signals(sig).name}"
    return f"exit status {rc}"


def run_many(sources: Sequence[str], limits: SandboxLimits = DEFAULT_LIMITS, workers: int = 4) -> list[RunResult]:
    """`run_python` for each source, at most `workers` at a time (each with its own slot), in order."""
    if not isinstance(workers, int) or workers < 1:
        raise EvalError(f"workers = {workers!r}: must be an integer >= 1")
    kind = isolation()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(source: str) -> RunResult:
        slot = slots.get()
        try:
            return _run(kind, source, limits, slot)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, sources))
