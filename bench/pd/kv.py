"""The pd benchmark's KV transfer measurement: a prompt's keys and values pulled from a
prefill worker exactly as the decode worker pulls them (GET /internal/kv/{handle}, checked
by kv_transfer.decode, copied into a cache-shaped buffer), against a plain loopback TCP copy
of the same number of bytes between two processes (sendall from one buffer, recv_into
another). A third kind of trial only reads the same stream off the wire, which splits the
pull's time into the sender and HTTP on one side and the receiver's checks and copies on the
other. Trials rotate their order so that load from elsewhere hits all alike."""

import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
from rich.progress import Progress, TaskID

from fleetwise.bench.harness import summary

MIN_KV_TRIALS = 5         # KV pulls (and socket copies) per prompt length, at least
# per KV trial: the full pull as the decode worker does it, the same stream only read off the
# wire (what the prefill side and HTTP cost without the receiver's checks and copies), and the
# raw socket copy of the same number of bytes
KV_TRIAL_KINDS = ("kv", "http_read", "socket")


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


async def pull_kv(session: Any, url: str, handle: str, expect: Any, sink: "_Sink") -> tuple[int, float]:
    """Exactly as the decode worker pulls (kv_transfer.pull): stream, check every layer,
    copy it into cache-shaped tensors. Returns (bytes on the wire, seconds)."""
    from fleetwise.worker.kv.transfer import pull
    t0 = time.perf_counter()
    received = await pull(session, url, handle, expect, sink.slot_copy)
    return received, time.perf_counter() - t0


async def read_kv(session: Any, url: str, handle: str) -> tuple[int, float]:
    """The stream read off the wire with the same client and dropped: no checks, no copies."""
    received = 0
    t0 = time.perf_counter()
    async with session.get(f"{url}/internal/kv/{handle}") as r:
        if r.status != 200:
            raise RuntimeError(f"the prefill worker answered {r.status}")
        async for chunk in r.content.iter_any():
            received += len(chunk)
    return received, time.perf_counter() - t0


class _Sink:
    """Stand-in for the decode worker's cache. The worker copies whole blocks at a time
    (KVConnector.write_kv); blocks here are consecutive, so one copy per layer and kind."""

    def __init__(self, num_layers: int, num_tokens: int, heads: int, head_dim: int, dtype: Any):
        import torch
        self.caches = [torch.empty(2, num_tokens, heads, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.slots = torch.arange(num_tokens)

    def slot_copy(self, layer: int, k: Any, v: Any) -> None:
        cache = self.caches[layer]
        cache[0].copy_(k)
        cache[1].copy_(v)


def _framing(h: Any) -> int:
    """Bytes of a KV stream that are not keys and values: preamble, header, layer frames, end."""
    from fleetwise.worker.kv import transfer as kt
    head = json.dumps(asdict(h)).encode()
    return kt._PREAMBLE.size + len(head) + h.num_layers * kt._LAYER.size + kt._DONE.size


# -- the measurement ------------------------------------------------------------------------


async def _trials(kv_session: Any, url: str, handle: str, expect: Any, sink: _Sink, trials: int,
                  sock: SocketCopy, progress: Progress, task: TaskID, L: int) -> tuple[int, dict[str, list[float]]]:
    """Bytes of the stream, and the seconds of every trial of each kind."""
    times: dict[str, list[float]] = {k: [] for k in KV_TRIAL_KINDS}
    nbytes, _ = await pull_kv(kv_session, url, handle, expect, sink)  # warm
    for i in range(trials):
        progress.update(task, description=f"KV transfer {L}: trial {i + 1}/{trials}")
        k = i % len(KV_TRIAL_KINDS)  # rotate the order, so that drift hits all alike
        for kind in KV_TRIAL_KINDS[k:] + KV_TRIAL_KINDS[:k]:
            if kind == "socket":
                times[kind].append(sock.copy(nbytes))
            else:
                if kind == "kv":
                    n, t = await pull_kv(kv_session, url, handle, expect, sink)
                else:
                    n, t = await read_kv(kv_session, url, handle)
                if n != nbytes:
                    raise RuntimeError(f"KV stream sizes differ between pulls: {nbytes} vs {n}")
                times[kind].append(t)
            progress.advance(task)
    return nbytes, times


async def measure_length(http: Any, kv_session: Any, prefill_url: str, name: str, mid: str, prompt: list[int],
                         cfg: dict, dtype: Any, trials: int, sock: SocketCopy, progress: Progress, task: TaskID,
                         notes: list[str]) -> dict:
    """One prompt's KV, prefilled once and pulled `trials` times of each kind: the row of its
    length in the result. `mid`: the model id of the files the workers serve."""
    from fleetwise.worker.kv.transfer import DTYPE_NAMES, DTYPES, KVHeader
    L = len(prompt)
    progress.update(task, description=f"KV transfer: prefill {L}")
    first = await prefill(http, prefill_url, name, prompt)
    if first["model_id"] != mid:
        notes.append(f"the prefill worker's model id {first['model_id']} differs from the files' {mid}")
    progress.advance(task)
    expect = KVHeader(first["model_id"], DTYPE_NAMES[dtype], cfg["num_hidden_layers"],
                      cfg["num_key_value_heads"], cfg["head_dim"], 0, L)
    sink = _Sink(cfg["num_hidden_layers"], L, cfg["num_key_value_heads"], cfg["head_dim"], DTYPES[expect.dtype])
    try:
        nbytes, times = await _trials(kv_session, prefill_url, first["handle"], expect, sink, trials, sock,
                                      progress, task, L)
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
