"""Several server processes on consecutive ports, started and kept alive: `r1kit serve --replicas N`.

    commands = replica_commands("r1kit/nano", 2, grpc_port=50051, http_port=8000)   # 50051-50052, 8000-8001
    with ReplicaSet(commands, grpc_ports=[50051, 50052]) as replicas:
        replicas.wait_ready()
        client = R1Client(replicas.targets)        # round_robin over both, dead ones out of rotation
    run_replicas(commands, [50051, 50052])         # the blocking form: until SIGTERM / Ctrl-C

Each replica is its own process with its own model and engine (one per GPU, or CPU cores split between
them). The supervisor thread restarts a replica that exits (with backoff, up to ``max_restarts`` times),
except one that exits with the CLI's error code 2 (a bad flag, a busy port, no such model: a restart would
fail the same way); ``wait_ready`` raises at once for a replica that is not restarted. Clients ride through
the gap because their channel's health checking takes the dead replica out of rotation and retries calls
that it refused. Stopping sends SIGTERM (each server drains its in-flight requests) and SIGKILL after the
grace period.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from r1kit.serve.client import SERVICE_NAME
from r1kit.serve.ports import PortError, check_free

log = logging.getLogger("r1kit.serve")
STABLE_SECONDS = 60.0  # a replica that ran this long before exiting is restarted without backoff
EXIT_USAGE = 2  # the exit code of `r1kit serve` (and the gRPC server) for a bad command line: never restarted


class ReplicaError(RuntimeError):
    """A replica could not be started or did not become healthy."""


def replica_commands(model: str, n: int, *, grpc_port: int, http_port: int | None = None, host: str = "127.0.0.1",
                     extra_args: Sequence[str] = ()) -> list[list[str]]:
    """Command lines of ``n`` replicas, replica i on ``grpc_port + i`` (and ``http_port + i``).

    With ``http_port`` each replica is a full `r1kit serve` (HTTP + gRPC); without it a gRPC-only server
    (`python -m r1kit.serve.grpc_service`). ``extra_args`` are passed to each (e.g. ["--max-queue", "32"]).
    """
    if n < 1:
        raise ValueError(f"replicas = {n}: need at least 1")
    commands = []
    for i in range(n):
        if http_port is None:
            cmd = [sys.executable, "-m", "r1kit.serve.grpc_service", model, "--port", str(grpc_port + i)]
        else:
            cmd = [sys.executable, "-m", "r1kit", "serve", model, "--port", str(http_port + i),
                   "--grpc-port", str(grpc_port + i)]
        commands.append([*cmd, "--host", host, *extra_args])
    return commands


def check_ports(host: str, n: int, *, grpc_port: int, http_port: int | None = None) -> None:
    """PortError unless every replica's ports (``grpc_port + i``, ``http_port + i``) are fixed, valid and free now,
    named by the `r1kit serve` flag they come from."""
    for flag, base in (("--grpc-port", grpc_port), ("--port", http_port)):
        if base is None:
            continue
        if base == 0:
            raise PortError(f"{flag} 0: replicas need fixed ports (replica i listens on {flag} + i)")
        for i in range(n):
            try:
                check_free(host, base + i, flag)
            except PortError as e:
                raise PortError(f"{e} (replica {i} of {n} listens on {flag} {base} + {i})") from None


@dataclass
class Replica:
    """One supervised server process."""

    index: int
    command: list[str]
    grpc_port: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0  # monotonic time of the last start
    restarts: int = 0  # in total
    crashes: int = 0  # exits in a row, each within STABLE_SECONDS of its start (sets the backoff)
    next_start: float | None = None  # when an exited replica is started again (None: none scheduled)
    exit_codes: list[int] = field(default_factory=list)
    given_up: bool = False  # exited and will not be restarted


class ReplicaSet:
    """Start ``commands`` (one per replica; replica i answers gRPC on ``grpc_ports[i]``) and supervise them.

    ``restart``: start a replica again when it exits, after 0.5, 1, 2, ... s while it keeps exiting within
    STABLE_SECONDS of its start, and not after ``max_restarts`` such exits in a row. ``stdout``: where the
    replicas' output goes (None: this process's stdout/stderr).
    """

    def __init__(self, commands: Sequence[Sequence[str]], grpc_ports: Sequence[int], *, host: str = "127.0.0.1",
                 restart: bool = True, max_restarts: int = 5, stdout: IO | int | None = None):
        if len(commands) != len(grpc_ports):
            raise ValueError(f"{len(commands)} commands but {len(grpc_ports)} gRPC ports: need one port per replica")
        self.replicas = [Replica(i, list(c), p) for i, (c, p) in enumerate(zip(commands, grpc_ports, strict=True))]
        self.host, self.restart, self.max_restarts, self.stdout = host, restart, max_restarts, stdout
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def targets(self) -> list[str]:
        """The replicas' gRPC addresses, for R1Client."""
        return [f"{self.host}:{r.grpc_port}" for r in self.replicas]

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start every replica and the supervisor thread."""
        with self._lock:
            for replica in self.replicas:
                self._spawn(replica)
        self._supervisor = threading.Thread(target=self._supervise, name="r1kit-replicas", daemon=True)
        self._supervisor.start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every replica reports SERVING on grpc.health.v1; ReplicaError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        for replica, target in zip(self.replicas, self.targets, strict=True):
            with grpc.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ReplicaError(f"replica {replica.index} ({' '.join(replica.command)}) did not report "
                                           f"SERVING on {target} within {timeout:.0f} s")
                    try:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                           timeout=min(left, 1.0), wait_for_ready=True)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.RpcError:
                        pass  # not listening yet (the model is loading)
                    self._check_not_given_up(replica)
                    time.sleep(0.2)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM every replica (they drain in-flight requests), SIGKILL those still running after ``grace`` s."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        with self._lock:
            running = [r.process for r in self.replicas if r.process is not None and r.process.poll() is None]
        for process in running:
            process.terminate()
        deadline = time.monotonic() + grace
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("replica pid %d still running %.0f s after SIGTERM: killing it", process.pid, grace)
                process.kill()
                process.wait()

    def __enter__(self) -> ReplicaSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ supervision
    def _check_not_given_up(self, replica: Replica) -> None:
        """ReplicaError if ``replica`` exited and will not be started again (restart off, or given up on)."""
        process = replica.process
        code = process.poll() if process is not None and not self.restart else None
        if replica.given_up or code is not None:
            code = replica.exit_codes[-1] if code is None else code
            raise ReplicaError(f"replica {replica.index} exited with code {code} before serving (its output says "
                               f"why) and is not restarted: {' '.join(replica.command)}")

    def _spawn(self, replica: Replica) -> None:
        log.info("replica %d: starting on gRPC port %d: %s", replica.index, replica.grpc_port,
                 " ".join(replica.command))
        replica.started_at = time.monotonic()
        replica.process = subprocess.Popen(replica.command, stdout=self.stdout,
                                           stderr=subprocess.STDOUT if self.stdout is not None else None)

    def _supervise(self) -> None:
        """Restart replicas that exited, with backoff, until stop()."""
        while not self._stopping.wait(0.2):
            with self._lock:
                for replica in self.replicas:
                    process = replica.process
                    if process is None or process.poll() is None:
                        continue
                    now = time.monotonic()
                    if replica.next_start is None:  # an exit not handled yet
                        replica.exit_codes.append(process.returncode)
                        replica.crashes = 0 if now - replica.started_at >= STABLE_SECONDS else replica.crashes + 1
                        if (not self.restart or replica.crashes > self.max_restarts
                                or process.returncode == EXIT_USAGE):
                            why = ("its command line is at fault" if process.returncode == EXIT_USAGE
                                   else f"{replica.crashes} quick exits in a row")
                            log.error("replica %d exited with code %d; not restarting (%s)", replica.index,
                                      process.returncode, why)
                            replica.process, replica.given_up = None, True
                            continue
                        replica.next_start = now + (0.0 if replica.crashes == 0 else 0.5 * 2 ** (replica.crashes - 1))
                        log.warning("replica %d exited with code %d; restarting in %.1f s", replica.index,
                                    process.returncode, replica.next_start - now)
                    if now >= replica.next_start:
                        replica.restarts += 1
                        replica.next_start = None
                        self._spawn(replica)


def run_replicas(commands: Sequence[Sequence[str]], grpc_ports: Sequence[int], *, host: str = "127.0.0.1",
                 grace: float = 30.0, ready_timeout: float = 300.0) -> None:
    """Run the replicas until SIGTERM or SIGINT, then stop them (the blocking form for the CLI)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    replicas = ReplicaSet(commands, grpc_ports, host=host)
    replicas.start()
    try:
        replicas.wait_ready(ready_timeout)
        log.info("%d replicas serving gRPC on %s (client: R1Client(%r))", len(commands),
                 ", ".join(replicas.targets), replicas.targets)
        stop.wait()
    finally:
        replicas.stop(grace)
