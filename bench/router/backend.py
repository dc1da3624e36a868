"""The router benchmark's stand-in backend: an OpenAI-completions-shaped HTTP server that
answers at once with a small fixed completion (`python -m fleetwise.bench.router backend`)."""

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

MODEL = "bench-model"

COMPLETION = (b'{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"' + MODEL.encode()
              + b'","choices":[{"index":0,"text":" the quick brown fox jumps over the lazy dog again and again",'
              b'"logprobs":null,"finish_reason":"length","stop_reason":null}],'
              b'"usage":{"prompt_tokens":96,"completion_tokens":16,"total_tokens":112}}')
MODELS = (b'{"object":"list","data":[{"id":"' + MODEL.encode()
          + b'","object":"model","created":0,"owned_by":"fleetwise-bench"}]}')


def _response(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + (b"\r\n\r\n" if keep_alive else b"\r\nconnection: close\r\n\r\n") + body)


_ROUTES = {
    (b"POST", b"/v1/completions"): (b"200 OK", COMPLETION),
    (b"POST", b"/v1/chat/completions"): (b"200 OK", COMPLETION),
    (b"GET", b"/v1/models"): (b"200 OK", MODELS),
    (b"GET", b"/health"): (b"200 OK", b"{}"),
}
_NOT_FOUND = (b"404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}')
_CANNED = {(route, ka): _response(status, body, ka) for route, (status, body) in [*_ROUTES.items(), (None, _NOT_FOUND)]
           for ka in (True, False)}


class _Backend(asyncio.Protocol):
    """HTTP/1.1 over asyncio with httptools: keep-alive and pipelining, a canned answer per
    route, nothing else. Each answer costs tens of microseconds."""

    def __init__(self) -> None:
        import httptools
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        import httptools
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.write(_response(b"400 Bad Request", b"{}", False))
                self.transport.close()

    def eof_received(self) -> bool:
        return False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        route = (self.parser.get_method(), self.url.split(b"?", 1)[0])
        self.url = b""
        keep_alive = self.parser.should_keep_alive()
        if self.transport is None:
            return
        self.transport.write(_CANNED[(route if route in _ROUTES else None, keep_alive)])
        if not keep_alive:
            self.transport.close()


def serve_backend(host: str, port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Backend, host, port, backlog=2048, reuse_address=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()
    run_loop(main())


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """The coroutine to its end, on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
