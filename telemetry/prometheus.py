"""Reading Prometheus: instant and range queries over its HTTP API, with timeouts, and
answers that say when a series is missing or stale instead of reading as zero.

An instant query gives each series' value at the evaluation time, stamped with that time,
however old the sample behind it is (up to Prometheus' five-minute lookback). `latest` asks
for `timestamp(...)` of the same selector too, so a caller learns each series' true age and
how many series answered; the power controller holds its caps on a stale or partial reading
rather than trusting a number that stopped moving.
"""

import math
from dataclasses import dataclass

import httpx


class PrometheusError(Exception):
    """The query could not be answered: unreachable, timed out, refused (bad PromQL), or an
    answer of an unexpected shape. The message says which."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float
    timestamp: float  # seconds since the epoch


@dataclass(frozen=True)
class Latest:
    """The newest samples of a selector's series at `at`, with their true timestamps."""
    samples: list[Sample]
    at: float

    @property
    def missing(self) -> bool:
        return not self.samples

    @property
    def age_seconds(self) -> float:
        """Age of the oldest of the newest samples (inf when there is none)."""
        return self.at - min(s.timestamp for s in self.samples) if self.samples else math.inf

    def total(self) -> float | None:
        """The sum over the series; None (never 0) when there is none."""
        return sum(s.value for s in self.samples) if self.samples else None


class PrometheusClient:
    def __init__(self, base_url: str, timeout: float = 5.0, client: httpx.Client | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.http = client or httpx.Client(timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _get(self, path: str, params: dict[str, str]) -> dict:
        url = f"{self.base_url}{path}"
        try:
            r = self.http.get(url, params=params, timeout=self.timeout)
        except httpx.TimeoutException:
            raise PrometheusError(f"{url}: no answer within {self.timeout:g} s")
        except httpx.HTTPError as e:
            raise PrometheusError(f"{url}: {type(e).__name__}: {e}")
        try:
            body = r.json()
        except ValueError:
            raise PrometheusError(f"{url} answered {r.status_code} without JSON: {r.text[:200]!r}")
        if body.get("status") != "success":
            raise PrometheusError(f"{params.get('query', '')!r}: {body.get('errorType', r.status_code)}: "
                                  f"{body.get('error', 'no error message')}")
        return body["data"]

    def instant(self, query: str, at: float | None = None) -> list[Sample]:
        """A vector query at `at` (default: now, on the server's clock)."""
        params = {"query": query} | ({"time": repr(at)} if at is not None else {})
        data = self._get("/api/v1/query", params)
        if data.get("resultType") != "vector":
            raise PrometheusError(f"{query!r}: expected a vector, got {data.get('resultType')}")
        return [Sample(r["metric"], float(r["value"][1]), float(r["value"][0])) for r in data["result"]]

    def range(self, query: str, start: float, end: float, step: float) -> dict[tuple, list[tuple[float, float]]]:
        """(timestamp, value) points per series (keyed by its sorted labels) from start to end."""
        data = self._get("/api/v1/query_range", {"query": query, "start": repr(start), "end": repr(end),
                                                 "step": f"{step:g}"})
        if data.get("resultType") != "matrix":
            raise PrometheusError(f"{query!r}: expected a matrix, got {data.get('resultType')}")
        return {tuple(sorted(r["metric"].items())): [(float(t), float(v)) for t, v in r["values"]]
                for r in data["result"]}

    def latest(self, selector: str, at: float | None = None) -> Latest:
        """The newest sample of each series `selector` (a plain selector, no aggregation) picks,
        with the time it was scraped."""
        values = self.instant(selector, at)
        scraped = {_key(s.labels): s.value for s in self.instant(f"timestamp({selector})", at)}
        evaluated = values[0].timestamp if values else (at if at is not None else self.server_time())
        return Latest([Sample(s.labels, s.value, scraped.get(_key(s.labels), s.timestamp)) for s in values],
                      evaluated)

    def server_time(self) -> float:
        """Now, on the server's clock (ages are measured against it)."""
        data = self._get("/api/v1/query", {"query": "time()"})
        if data.get("resultType") != "scalar":
            raise PrometheusError(f"time(): expected a scalar, got {data.get('resultType')}")
        return float(data["result"][0])


def _key(labels: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in labels.items() if k != "__name__"))
