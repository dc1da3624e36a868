"""The pd benchmark's KV transfer measurement: a prompt's keys and values pulled from a
prefill worker exactly as the decode worker pulls them, into a decode worker's paged cache
through the real connector (KVConnector.reserve_kv, kv_transfer.pull with the worker's
client, KVConnector.write_kv into the reserved blocks), against a plain loopback TCP copy of
the same number of bytes between two processes (sendall from one buffer, recv_into
another). A third kind of trial only reads the same stream off the wire, which splits the
pull's time into the sender and HTTP on one side and the receiver's checks and copies on the
other. Trials rotate their order so that load from elsewhere hits all alike.

The decode side is a decode worker's engine and connector built in this process (the
worker's own classes and settings: `DecodeSide`), so the pull is timed without an HTTP hop
of its own and the blocks it fills are freed after each trial."""

import json
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from rich.progress import Progress, TaskID

from fleetwise.bench.harness import process_cpu_seconds, summary

MIN_KV_TRIALS = 5         # KV pulls (and socket copies) per prompt length, at least
# short streams get more trials, so that each kind moves at least this many bytes per length:
# a short pull's time is a few scheduler waits on a busy machine, and its median needs more of them
KV_TRIAL_BYTES = 128 << 20
MAX_KV_TRIALS = 41
# per KV trial: the full pull as the decode worker does it, the same stream only read off the
# wire (what the prefill side and HTTP cost without the receiver's checks and copies), and the
# raw socket copy of the same number of bytes
KV_TRIAL_KINDS = ("kv", "http_read", "socket")


def kv_trials(stream_bytes: int, at_least: int = MIN_KV_TRIALS) -> int:
    """Trials of each kind for a stream of `stream_bytes`: `at_least`, more for short streams."""
    return max(at_least, min(MAX_KV_TRIALS, -(-KV_TRIAL_BYTES // max(1, stream_bytes))))


def stats(values: Sequence[float | None]) -> dict | None:
    return summary(values, "mean", "median", "min", "max", "std", "n")


# -- the raw socket baseline ----------------------------------------------------------------

# A separate process, as the prefill worker is: on each request (8 bytes, little-endian
# length) it sends that many bytes of one random buffer. It exits when its stdin closes,
# so that it never outlives the benchmark.
_SOCKET_SERVER = r"""
import os, socket, struct, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
size = int(sys.argv[1])
buf = memoryview(bytearray(os.urandom(size)))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(4)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = b""
            while len(head) < 8:
                part = conn.recv(8 - len(head))
                if not part:
                    break
                head += part
            if len(head) < 8:
                break
            (n,) = struct.unpack("<Q", head)
            conn.sendall(buf[:n])
"""


class SocketCopy:
    """Client side of the baseline: one connection, reads with 4 MiB recv_into calls."""

    def __init__(self, max_bytes: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _SOCKET_SERVER, str(max_bytes)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert self.proc.stdout is not None  # a pipe
            line = self.proc.stdout.readline()
            if not line.strip():
                raise SystemExit("error: the loopback socket server did not start")
            self.sock = socket.create_connection(("127.0.0.1", int(line)))
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.buf = bytearray(max_bytes)

    def copy(self, n: int) -> float:
        view = memoryview(self.buf)
        t0 = time.perf_counter()
        self.sock.sendall(struct.pack("<Q", n))
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], min(n - got, 4 << 20))
            if k == 0:
                raise RuntimeError("the socket server closed the connection")
            got += k
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.sock.close()
            assert self.proc.stdin is not None  # a pipe
            self.proc.stdin.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the KV pull ----------------------------------------------------------------------------


async def prefill(http: Any, url: str, model: str, prompt: list[int]) -> dict:
    """The prompt prefilled on the prefill worker, its KV held there under a handle."""
    r = await http.post(url + "/internal/prefill", json={"kind": "completion", "request": {
        "model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True}})
    if r.status_code != 200:
        raise RuntimeError(f"prefill at {url} answered {r.status_code}: {r.text[:500]}")
    first = r.json()
    if not first.get("handle"):
        raise RuntimeError(f"the prefill worker holds no KV for the prompt: {first}")
    return first


async def pull_kv(side: "DecodeSide", url: str, handle: str, prompt: list[int],
                  first_token: int) -> tuple[int, float]:
    """Exactly as the decode worker pulls (Handoff._pull): blocks reserved by the connector,
    the stream checked layer by layer and written into them. Returns (bytes, seconds of the
    pull); the blocks are freed afterwards."""
    return await side.pull(url, handle, prompt, first_token)


class StreamReader:
    """The stream read off the wire and dropped, over one kept-alive connection with a
    plain socket (recv_into one scratch buffer): what the prefill side and HTTP cost,
    without the receiver's checks and copies."""

    def __init__(self, url: str, headers: dict[str, str]):
        parts = urllib.parse.urlsplit(url)
        self.address = (parts.hostname, parts.port)
        self.sock = self._connect()
        self.head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.netloc = parts.netloc
        self.buf = memoryview(bytearray(4 << 20))

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def read(self, handle: str) -> tuple[int, float]:
        """(bytes of the body, seconds); on a new connection when the worker closed the
        kept one meanwhile (its keep-alive timeout), as the decode side's client does."""
        try:
            return self._read(handle)
        except ConnectionError:
            self.sock.close()
            self.sock = self._connect()
            return self._read(handle)

    def _read(self, handle: str) -> tuple[int, float]:
        from fleetwise.worker.kv.transfer import NEWEST
        t0 = time.perf_counter()
        self.sock.sendall(f"GET /internal/kv/{handle}?kv_version={NEWEST} HTTP/1.1\r\n"
                          f"Host: {self.netloc}\r\n{self.head}\r\n".encode())
        data = b""
        while (end := data.find(b"\r\n\r\n")) < 0:
            part = self.sock.recv(65536)
            if not part:
                raise ConnectionResetError("the prefill worker closed the connection")
            data += part
        head = data[:end].decode("latin-1").lower()
        if not head.startswith("http/1.1 200"):
            raise RuntimeError(f"the prefill worker answered {head.splitlines()[0]}")
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        left = length - (len(data) - end - 4)
        while left > 0:
            k = self.sock.recv_into(self.buf, min(left, len(self.buf)))
            if k == 0:
                raise RuntimeError("the prefill worker closed the connection")
            left -= k
        return length, time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()


class DecodeSide:
    """A decode worker's engine, paged cache and KV connector in this process, with the
    client a decode worker pulls with (kv/pull.py's KVClient)."""

    def __init__(self, model_dir: str, kv_cache_mib: int, max_num_batched_tokens: int, headers: dict[str, str]):
        from fleetwise.worker.engine.config import EngineConfig
        from fleetwise.worker.engine.engine import LLMEngine
        from fleetwise.worker.kv.connector import KVConnector
        from fleetwise.worker.kv.pull import KVClient
        self.engine = LLMEngine(EngineConfig(model=model_dir, kv_cache_bytes=kv_cache_mib << 20,
                                             max_num_batched_tokens=max_num_batched_tokens))
        self.engine.kv_connector = self.connector = KVConnector(self.engine)
        self.client = KVClient(headers)
        self.headers = headers
        self.readers: dict[str, StreamReader] = {}
        self.count = 0

    def read(self, url: str, handle: str) -> tuple[int, float]:
        """The stream only read off the wire (StreamReader)."""
        if url not in self.readers:
            self.readers[url] = StreamReader(url, self.headers)
        return self.readers[url].read(handle)

    async def pull(self, url: str, handle: str, prompt: list[int], first_token: int) -> tuple[int, float]:
        from fleetwise.worker.engine.sequence import SamplingParams
        from fleetwise.worker.kv.pull import pull
        self.count += 1
        rid = f"bench-{self.count}"
        connector = self.connector
        res = connector.reserve_kv(rid, prompt, first_token, SamplingParams(max_tokens=2))
        try:
            if res is None or res.start != 0:
                raise RuntimeError(f"the decode side reserved {res}: no blocks, or a prefix it had cached")
            expect = connector.header(res.start, res.num_tokens)
            t0 = time.perf_counter()
            received = await pull(self.client, url, handle, expect, connector.kv_sink(res))
            return received, time.perf_counter() - t0
        finally:
            self.engine.abort_request(rid)  # frees the blocks: nothing was activated, nothing cached

    async def close(self) -> None:
        self.client.close()
        for reader in self.readers.values():
            reader.close()


def _framing(h: Any) -> int:
    """Bytes of a KV stream that are not keys and values: preamble, header, layer frames, end."""
    from fleetwise.worker.kv import transfer as kt
    head = json.dumps(asdict(h)).encode()
    return kt._PREAMBLE.size + len(head) + h.num_layers * kt._LAYER.size + kt._DONE.size


# -- the measurement ------------------------------------------------------------------------


async def _trials(side: DecodeSide, url: str, handle: str, prompt: list[int], first_token: int, trials: int,
                  sock: SocketCopy, progress: Progress, task: TaskID,
                  sender_pid: int | None) -> tuple[int, dict[str, list[float]], dict[str, float]]:
    """Bytes of the stream, the seconds of every trial of each kind, and the CPU seconds of
    the KV pulls summed on each side (the receiver: this process; the sender: the prefill
    worker's process, all its threads)."""
    times: dict[str, list[float]] = {k: [] for k in KV_TRIAL_KINDS}
    cpu = {"receiver": 0.0, "sender": 0.0}
    nbytes, _ = await pull_kv(side, url, handle, prompt, first_token)  # warm
    L = len(prompt)
    for i in range(trials):
        progress.update(task, description=f"KV transfer {L}: trial {i + 1}/{trials}")
        k = i % len(KV_TRIAL_KINDS)  # rotate the order, so that drift hits all alike
        for kind in KV_TRIAL_KINDS[k:] + KV_TRIAL_KINDS[:k]:
            if kind == "socket":
                times[kind].append(sock.copy(nbytes))
            else:
                if kind == "kv":
                    c0, s0 = time.process_time(), process_cpu_seconds(sender_pid) or 0.0
                    n, t = await pull_kv(side, url, handle, prompt, first_token)
                    cpu["receiver"] += time.process_time() - c0
                    cpu["sender"] += (process_cpu_seconds(sender_pid) or 0.0) - s0
                else:
                    n, t = side.read(url, handle)
                if n != nbytes:
                    raise RuntimeError(f"KV stream sizes differ between pulls: {nbytes} vs {n}")
                times[kind].append(t)
            progress.advance(task)
    return nbytes, times, cpu


async def measure_length(http: Any, side: DecodeSide, prefill_url: str, name: str, mid: str, prompt: list[int],
                         trials: int, sock: SocketCopy, progress: Progress, task: TaskID, notes: list[str],
                         sender_pid: int | None = None) -> dict:
    """One prompt's KV, prefilled once and pulled `kv_trials(its stream, trials)` times of
    each kind: the row of its length in the result. `mid`: the model id of the files the workers serve; `sender_pid`:
    the prefill worker's process, whose CPU time the pulls take is measured."""
    L = len(prompt)
    progress.update(task, description=f"KV transfer: prefill {L}")
    first = await prefill(http, prefill_url, name, prompt)
    if first["model_id"] != mid:
        notes.append(f"the prefill worker's model id {first['model_id']} differs from the files' {mid}")
    progress.advance(task)
    expect = side.connector.header(0, L)
    trials = kv_trials(expect.payload_bytes * expect.num_layers, trials)
    try:
        nbytes, times, cpu = await _trials(side, prefill_url, first["handle"], prompt, first["first_token"],
                                           trials, sock, progress, task, sender_pid)
    finally:
        await http.delete(f"{prefill_url}/internal/kv/{first['handle']}")
    if nbytes != expect.payload_bytes * expect.num_layers + _framing(expect):
        notes.append(f"{L} tokens: {nbytes} bytes on the wire, not the payload plus framing")
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "bytes": nbytes, "payload_bytes": expect.payload_bytes * expect.num_layers,
        "kv_s": stats(times["kv"]), "http_read_s": stats(times["http_read"]),
        "socket_s": stats(times["socket"]),
        "kv_trials_s": times["kv"], "http_read_trials_s": times["http_read"],
        "socket_trials_s": times["socket"],
        "kv_bps": nbytes / med["kv"], "http_read_bps": nbytes / med["http_read"],
        "socket_bps": nbytes / med["socket"],
        "kv_bps_best": nbytes / min(times["kv"]), "socket_bps_best": nbytes / min(times["socket"]),
        "ratio": med["socket"] / med["kv"], "ratio_best": min(times["socket"]) / min(times["kv"]),
        "http_read_ratio": med["socket"] / med["http_read"],
        "trials": trials,
        "cpu_ms_per_pull": {side: 1e3 * seconds / trials for side, seconds in cpu.items()},
    }


def overall(kv_rows: dict[str, dict]) -> dict:
    """All lengths together: the sums of the medians."""
    tot_b = sum(r["bytes"] for r in kv_rows.values())
    tot_kv = sum(r["kv_s"]["median"] for r in kv_rows.values())
    tot_rd = sum(r["http_read_s"]["median"] for r in kv_rows.values())
    tot_so = sum(r["socket_s"]["median"] for r in kv_rows.values())
    return {"bytes": tot_b, "kv_s": tot_kv, "http_read_s": tot_rd, "socket_s": tot_so,
            "kv_bps": tot_b / tot_kv, "http_read_bps": tot_b / tot_rd, "socket_bps": tot_b / tot_so,
            "ratio": tot_so / tot_kv, "http_read_ratio": tot_so / tot_rd}
