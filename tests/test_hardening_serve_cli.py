"""`r1kit serve` startup errors as real subprocesses: bad and busy ports (one line, exit code 2, before the model
loads), replicas that cannot start (reported once, not restarted forever), and model paths that mean the same
folder from any working directory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from r1kit.api import BUNDLED_DIR
from r1kit.serve.replicas import ReplicaError, ReplicaSet

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1kit", "serve", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=REPO)




@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_out_of_range_ports_are_one_line_errors():
    """Refused before the model loads (the three commands run side by side)."""
    cases = [(["--port", "99999"], "--port 99999"), (["--port", "-1"], "--port -1"),
             (["--port", "0", "--grpc-port", "70000"], "--grpc-port 70000")]
    with ThreadPoolExecutor(len(cases)) as pool:
        procs = list(pool.map(lambda flags: serve("r1kit/nano", "--device", "cpu", *flags), [f for f, _ in cases]))
    for proc, (_, flag) in zip(procs, cases, strict=True):
        assert_one_line_error(proc, f"{flag}: not a port: use 0..65535")
        assert "loaded" not in proc.stderr


def test_busy_http_and_grpc_ports_are_one_line_errors(busy_port):
    assert_one_line_error(serve("r1kit/nano", "--device", "cpu", "--port", str(busy_port)),
                          f"--port {busy_port}: address 127.0.0.1:{busy_port} is already in use")
    assert_one_line_error(serve("r1kit/nano", "--device", "cpu", "--port", "0", "--grpc-port", str(busy_port)),
                          f"--grpc-port {busy_port}: address 127.0.0.1:{busy_port} is already in use")


def test_replicas_refuse_a_busy_port_before_starting(busy_port):
    """Replica 1's HTTP port (--port + 1) is busy: refused at once, naming the flag and the replica."""
    start = time.monotonic()
    proc = serve("r1kit/nano", "--device", "cpu", "--replicas", "2", "--grpc-port", str(free_port()),
                 "--port", str(busy_port - 1))
    assert_one_line_error(proc, f"--port {busy_port}: address 127.0.0.1:{busy_port} is already in use", "replica 1")
    assert time.monotonic() - start < 30
    assert_one_line_error(serve("r1kit/nano", "--replicas", "2", "--grpc-port", "0"), "--grpc-port 0", "fixed ports")


def test_replicas_that_cannot_start_are_reported_not_restarted():
    """Replicas that exit with the CLI's error code (here: a bad --dtype, found while loading) are not restarted:
    each prints its error once, then the supervisor reports it in one line and exits 2 (it used to restart them
    with backoff, then wait minutes for them to become healthy)."""
    start = time.monotonic()
    proc = serve("r1kit/nano", "--device", "cpu", "--dtype", "bogus", "--replicas", "2", "--grpc-port",
                 str(free_port()), "--port", str(free_port()), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert sum("unknown dtype 'bogus'" in line for line in errors) == 2, proc.stderr[-3000:]  # once per replica
    assert "exited with code 2 before serving" in errors[-1] and "not restarted" in errors[-1], errors
    assert "restarting in" not in proc.stderr
    assert time.monotonic() - start < 90


def test_replicas_refuse_a_missing_model_before_starting(tmp_path):
    assert_one_line_error(serve(str(tmp_path / "nope"), "--replicas", "2", "--grpc-port", str(free_port()),
                                "--port", str(free_port())), "no model at")


def test_supervisor_does_not_restart_a_usage_error():
    replicas = ReplicaSet([[sys.executable, "-c", "raise SystemExit(2)"]], [free_port()], stdout=subprocess.DEVNULL)
    replicas.start()
    try:
        with pytest.raises(ReplicaError, match="exited with code 2 before serving"):
            replicas.wait_ready(timeout=20)
        assert replicas.replicas[0].restarts == 0 and replicas.replicas[0].exit_codes == [2]
    finally:
        replicas.stop(grace=1)


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_model_paths_are_absolute_from_any_working_directory(tmp_path, where):
    (tmp_path / "local-model").mkdir()
    cwd = REPO if where == "repo" else tmp_path
    code = ("import sys; from r1kit.api import resolve_model_path as r; "
            "print(r('r1kit/nano')); print(r(sys.argv[1]))")
    local = "local-model" if where == "elsewhere" else os.path.relpath(tmp_path / "local-model", REPO)
    out = subprocess.run([sys.executable, "-c", code, local], capture_output=True, text=True, cwd=cwd, env=ENV,
                         timeout=60, check=True).stdout.split("\n")
    assert Path(out[0]) == (BUNDLED_DIR / "nano").resolve() and Path(out[0]).is_absolute()
    assert Path(out[1]) == (tmp_path / "local-model").resolve() and Path(out[1]).is_absolute()
