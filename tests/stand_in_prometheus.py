"""A stand-in for Prometheus' instant-query API, for tests of the fault loops: `GET
/api/v1/query` answers each query with the series the test set for the first metric name the
query contains (the way `fleetwise/fault_signals.py` asks: one metric per query, summed by
`instance`), and records the queries. Set `series` while it runs to change what the workers
look like."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class StandInPrometheus:
    def __init__(self) -> None:
        self.series: dict[str, list[tuple[dict[str, str], float]]] = {}
        self.queries: list[str] = []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query).get("query", [""])[0]
                if parts.path != "/api/v1/query" or not query:
                    self._answer(400, {"status": "error", "errorType": "bad_data", "error": "no query"})
                    return
                self._answer(200, {"status": "success",
                                   "data": {"resultType": "vector", "result": stand_in.answer(query)}})

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "StandInPrometheus":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def set(self, series: dict[str, list[tuple[dict[str, str], float]]]) -> None:
        with self.lock:
            self.series = series

    def answer(self, query: str) -> list[dict]:
        with self.lock:
            self.queries.append(query)
            name = next((n for n in self.series if n in query), None)
            found = self.series.get(name, []) if name else []
        now = time.time()
        return [{"metric": labels, "value": [now, repr(value)]} for labels, value in found]
