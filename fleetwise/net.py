"""Loopback ports for the processes fleetwise starts on one machine."""

import socket
import threading
from collections import deque

# Ports handed out lately: the OS may pick a port again as soon as the socket that asked for
# it closes, before the process it was for has bound it. Several ports asked for in a row (a
# fleet's workers) must not share one.
_RECENT: deque[int] = deque(maxlen=4096)
_LOCK = threading.Lock()


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it), never one this process was
    handed lately."""
    with _LOCK:
        for _ in range(100):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _RECENT:
                _RECENT.append(port)
                return port
    raise OSError("no free loopback port that was not handed out lately")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
