"""The ports the servers listen on: one range check and one bind, whose errors name the flag and the address.

    check_port(99999, "--port")                      # PortError: "--port 99999: not a port: use 0..65535 ..."
    sock = listen_socket("127.0.0.1", 8000, "--port")  # bound (not listening yet), for uvicorn's sockets=[...]
    # PortError: "--port 8000: address 127.0.0.1:8000 is already in use"

`r1kit serve` binds its HTTP socket and checks its gRPC port before loading the model, so a bad or busy port
fails in a second with one line instead of after the model load with a traceback.
"""

from __future__ import annotations

import errno
import socket

MAX_PORT = 65535


class PortError(ValueError):
    """A port that cannot be served: out of range, in use, or not bindable on the host; names the flag."""


def check_port(port: int, flag: str) -> None:
    """PortError unless ``port`` is in 0..65535 (0: any free port)."""
    if not 0 <= port <= MAX_PORT:
        raise PortError(f"{flag} {port}: not a port: use 0..{MAX_PORT} (0: any free port)")


def listen_socket(host: str, port: int, flag: str) -> socket.socket:
    """A TCP socket bound to ``host:port`` (SO_REUSEADDR, as uvicorn's own); PortError naming ``flag`` if the port
    is out of range, in use, or the host has no such address."""
    check_port(port, flag)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortError(f"{flag} {port}: address {address} is already in use") from None
        raise PortError(f"{flag} {port}: cannot listen on {address}: {e.strerror or e}") from None
    return sock


def check_free(host: str, port: int, flag: str) -> None:
    """PortError (as listen_socket) unless ``host:port`` can be bound now (checked, then released)."""
    listen_socket(host, port, flag).close()


__all__ = ["PortError", "check_port", "listen_socket", "check_free", "MAX_PORT"]
