"""The reference systems of the router benchmark: the least a Python proxy can do per request.

`python-floor` is a proxy of protocol callbacks only (uvloop + httptools, as fleetwise's
router), with no routing, retries, limits, metrics or tasks: a request goes on a kept
connection to the next backend in turn, the answer comes back whole. `python-floor+ids` adds
migration's per-token work exactly as the router does it: it asks for a stream with token
ids (and, as the router does for an answer it assembles, its text as one event), keeps the
ids (`Tracker`) and assembles the whole answer (`assemble._Answer`).

Neither is a router: a backend that fails fails the request, and nothing bounds a client.
They answer what the language and the event loop cost (`python-floor` against vllm-router),
what migration's per-token work costs (the one against the other), and so what fleetwise's
router spends beyond both (bench/README.md).
"""

import asyncio
import socket
from urllib.parse import urlsplit

import httptools
import orjson

from fleetwise.protocol import COALESCE_HEADER, TOKEN_IDS_HEADER
from fleetwise.router.assemble import _Answer, as_stream
from fleetwise.router.tracker import Tracker

MAX_KEPT = 1 << 17  # the router's default bound on the token ids a stream keeps
_IDS = f"{TOKEN_IDS_HEADER}: 1\r\n{COALESCE_HEADER}: 1\r\n".encode()  # as the router asks


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Upstream(asyncio.Protocol):
    """A kept connection to one backend: one exchange at a time, the answer read whole."""

    def __init__(self, floor: "Floor", address: tuple[str, int]):
        self.floor, self.address = floor, address
        self.parser = httptools.HttpResponseParser(self)
        self.client: _Client | None = None
        self.parts: list[bytes] = []
        self.content_type = b"application/json"

    def connection_made(self, transport):
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.answer(502, b'{"error": "the backend closed the connection"}', b"application/json")
            self.client = None
        idle = self.floor.idle[self.address]
        if self in idle:
            idle.remove(self)

    def on_message_begin(self) -> None:
        self.parts = []
        self.content_type = b"application/json"

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        body, status, client = b"".join(self.parts), self.parser.get_status_code(), self.client
        self.client = None
        self.floor.idle[self.address].append(self)
        if client is None:
            return
        if self.floor.ids and status == 200:
            answer = _Answer(client.kind)
            answer.take(Tracker(MAX_KEPT).feed(body))
            body, self.content_type = answer.whole(), b"application/json"
        client.answer(status, body, self.content_type)


class _Client(asyncio.Protocol):
    """One client connection: each request sent on as it completes, answered whole."""

    def __init__(self, floor: "Floor"):
        self.floor = floor
        self.parser = httptools.HttpRequestParser(self)
        self.parts: list[bytes] = []
        self.url = b""
        self.kind = "completion"
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        _nodelay(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.answer(400, b'{"error": "invalid HTTP request"}', b"application/json")
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.parts, self.url = [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.parts.append(body)

    def on_message_complete(self) -> None:
        body, extra = b"".join(self.parts), b""
        self.kind = "chat" if self.url.startswith(b"/v1/chat/") else "completion"
        if self.floor.ids:
            body, extra = orjson.dumps(as_stream(orjson.loads(body))), _IDS
        head = b"%s %s HTTP/1.1\r\nHost: floor\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n" % (
            self.parser.get_method(), self.url, extra, len(body))
        self.floor.send(self, head + body)

    def answer(self, status: int, body: bytes, content_type: bytes) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                                 % (status, content_type, len(body), body))


class Floor:
    def __init__(self, backends: list[str], ids: bool):
        if not backends:
            raise ValueError("at least one backend")
        self.addresses = []
        for url in backends:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"{url}: a backend is an http:// URL with a host")
            self.addresses.append((parts.hostname, parts.port or 80))
        self.ids = ids
        self.idle: dict[tuple[str, int], list[_Upstream]] = {a: [] for a in self.addresses}
        self.turn = 0
        self.connecting: set[asyncio.Future] = set()  # held until done: the loop keeps only weak references

    def send(self, client: _Client, request: bytes) -> None:
        address = self.addresses[self.turn % len(self.addresses)]
        self.turn += 1
        idle = self.idle[address]
        if idle:
            upstream = idle.pop()
            upstream.client = client
            upstream.transport.write(request)
        else:
            task = asyncio.ensure_future(self._connect(address, client, request))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect(self, address: tuple[str, int], client: _Client, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(lambda: _Upstream(self, address), *address)
        except OSError as e:
            client.answer(502, orjson.dumps({"error": f"cannot connect to {address}: {e}"}), b"application/json")
            return
        upstream.client = client
        upstream.transport.write(request)


def serve_floor(host: str, port: int, backends: list[str], ids: bool) -> None:
    import uvloop

    async def main() -> None:
        floor = Floor(backends, ids)
        server = await asyncio.get_running_loop().create_server(lambda: _Client(floor), host, port, backlog=2048)
        async with server:
            await server.serve_forever()
    uvloop.run(main())
