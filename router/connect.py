"""A connection to a replica, timed by the kernel's answer rather than by the router's loop.

A connect timeout measured on an event loop that is busy (a CPU-starved router: a loaded
node, a CPU limit's throttling) expires before the loop looks at a connection the kernel had
made long before; blamed on the replica, it marks a healthy replica down and a request gets
503. So when the timeout passes, the socket itself says whether it connected.
"""

import asyncio
import ipaddress
import socket
from typing import Any


async def connected_socket(loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float) -> socket.socket:
    """A non-blocking socket connected to (host, port), or TimeoutError (no connection within
    `timeout`) or OSError (refused, unreachable)."""
    address: Any = (host, port)
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name: resolved as create_connection would
        family, _, _, _, address = (await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
        except TimeoutError as e:
            try:
                sock.getpeername()  # the kernel made the connection: the delay was this loop's
            except OSError:
                raise e from None
        return sock
    except BaseException:
        sock.close()
        raise
