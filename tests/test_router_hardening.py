"""The router under faults, over real workers: what takes a replica out of rotation, what is
tried on another replica and what is the client's error, streams that lose a sequence,
prefill leases that the decode step did not take, bounds on one request's work, and
replica URLs the router cannot speak to."""

import asyncio
import json
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from fleetwise.net import free_port
from fleetwise.router.endpoints import StaticEndpoints
from fleetwise.router.fanout import merge_streams
from fleetwise.router.limits import Limits
from fleetwise.router.proxy import Router
from fleetwise.router.replica import Replica
from fleetwise.router.upstream import NotSent, Pool, Upstream, UpstreamError

from .workers import slow_steps, start_router, start_worker, start_worker_process, write_router_config

BAD = [7] * 9  # a prompt the fault hooks below fail on


def config(model_dir, **kw):
    from fleetwise.worker.engine.config import EngineConfig
    return EngineConfig(model=str(model_dir), served_model_name="tiny", block_size=8, num_blocks=256, **kw)


def fail_on_bad_prompt(batch):
    if any(seq.token_ids[:seq.num_prompt_tokens] == BAD for seq in batch.seqs):
        raise RuntimeError("this request breaks the model")


def replica(router, url):
    return next(r for r in router.router.source.models()["tiny"].all() if r.url == url)


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()


def served(worker) -> float:
    return worker.core.metrics.prompt_tokens.labels(model_name="tiny")._value.get()


def post(url, timeout=60, **body):
    return httpx.post(url + "/v1/completions", json={"model": "tiny", **body}, timeout=timeout)


def stop(*parts):
    for p in parts:
        p.stop()


def test_a_request_that_fails_everywhere_takes_no_replica_out(tiny_model_dir, tmp_path):
    """A worker's 500 that belongs to the request goes to the client unchanged and is
    counted; the replica stays in rotation (the next good request is served)."""
    a, b = start_worker(config(tiny_model_dir)), start_worker(config(tiny_model_dir))
    a.core.fault_hook = b.core.fault_hook = fail_on_bad_prompt
    write_router_config(tmp_path / "r.yaml", "tiny", mixed=[a.internal_url, b.internal_url])
    router = start_router(tmp_path / "r.yaml", policy="round_robin", probe_interval=60)  # no probe heals them
    try:
        r = post(router.url, prompt=BAD, max_tokens=4)
        assert r.status_code == 500 and "generation failed" in r.json()["error"]["message"], r.text
        assert all(replica(router, w.internal_url).healthy for w in (a, b))
        assert post(router.url, prompt="a good one", max_tokens=4).status_code == 200
        m = router.router.metrics
        assert sum(counter(m.server_errors, "tiny", "mixed", w.internal_url) for w in (a, b)) == 1
        assert counter(m.retries, "tiny", "mixed") == 0
        text = httpx.get(router.url + "/metrics").text
        assert "fleetwise_router_replica_server_errors_total{" in text
        promtool = shutil.which("promtool")
        assert promtool, "promtool (Debian package prometheus) is needed to lint /metrics"
        lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        stop(router, a, b)


def test_a_dead_engine_or_an_unreachable_replica_is_taken_out_and_skipped(tiny_model_dir, tmp_path):
    dead, good = start_worker(config(tiny_model_dir)), start_worker(config(tiny_model_dir))

    def die(batch):
        raise SystemExit("the engine loop dies")
    dead.core.fault_hook = die
    assert post(dead.url, prompt="x", max_tokens=2).json()["error"]["code"] == "engine_unavailable"
    nobody = f"http://127.0.0.1:{free_port()}"
    write_router_config(tmp_path / "r.yaml", "tiny", mixed=[good.internal_url, dead.internal_url])
    router = start_router(tmp_path / "r.yaml", policy="round_robin", probe_interval=60)
    try:
        replica(router, dead.internal_url).healthy = True  # as if the last probe had found it well
        r = post(router.url, prompt="hello", max_tokens=2)  # round robin tries `dead` first
        assert r.status_code == 200, r.text
        assert not replica(router, dead.internal_url).healthy
        assert counter(router.router.metrics.retries, "tiny", "mixed") == 1
        write_router_config(tmp_path / "r.yaml", "tiny", mixed=[good.internal_url, nobody])
        router.router.source.refresh()
        for _ in range(4):  # round robin comes to `nobody` within a few
            assert post(router.url, prompt="hello", max_tokens=2).status_code == 200
        assert not replica(router, nobody).healthy
    finally:
        stop(router, dead, good)


def test_a_non_streamed_generation_that_times_out_is_not_restarted(tiny_model_dir, tmp_path):
    slow, other = start_worker(config(tiny_model_dir)), start_worker(config(tiny_model_dir))
    slow.core.fault_hook = lambda batch: time.sleep(2.0)
    write_router_config(tmp_path / "r.yaml", "tiny", mixed=[other.internal_url, slow.internal_url])
    router = start_router(tmp_path / "r.yaml", policy="round_robin", probe_interval=60, request_timeout=1.0)
    try:
        before = served(other)
        r = post(router.url, prompt="a long generation", max_tokens=4)
        assert r.status_code == 504, r.text
        assert "not restarted" in r.json()["error"]["message"] and r.json()["error"]["code"] == "upstream_timeout"
        assert served(other) == before  # not run a second time elsewhere
        assert not replica(router, slow.internal_url).healthy
        assert counter(router.router.metrics.timeouts, "tiny", "mixed", slow.internal_url) == 1
    finally:
        slow.core.fault_hook = None
        stop(router, slow, other)


def test_the_pool_reuses_a_connection_the_replica_keeps_open(tiny_model_dir):
    worker = start_worker(config(tiny_model_dir))

    async def two() -> tuple[object, object]:
        pool = Pool()
        conns = []
        try:
            for _ in range(2):
                r = await pool.post(worker.url, "/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 2}')
                conns.append(r._conn)
                assert r.status == 200 and await r.read()
                r.release()
        finally:
            pool.close()
        return conns[0], conns[1]
    try:
        first, second = asyncio.run(two())
        assert first is second
    finally:
        worker.stop()


@pytest.mark.parametrize("logprobs", [1, None])
def test_a_non_streamed_generation_whose_replica_dies_moves_to_another(tiny_model_dir, tmp_path, logprobs):
    """The router reads a non-streamed request as a stream (assemble.py): when its worker
    dies mid-generation the rest comes from another, and the client gets the whole answer
    the uninterrupted worker gives, choices, logprobs and usage. Without logprobs the stream
    is coalesced (its text in the `fw:` lines, fleetwise/protocol.py): the text the dead
    worker generated comes from those lines."""
    doomed = start_worker_process(tiny_model_dir, "mixed", "--block-size", "8", "--fault", "switches")
    slow_steps(doomed)
    other = start_worker(config(tiny_model_dir))
    write_router_config(tmp_path / "r.yaml", "tiny", mixed=[other.internal_url, doomed.internal_url])
    router = start_router(tmp_path / "r.yaml", policy="round_robin", probe_interval=60)
    body = {"prompt": "a long generation", "n": 2, "max_tokens": 200, "ignore_eos": True, "temperature": 0,
            **({"logprobs": logprobs} if logprobs else {})}
    try:
        want = httpx.post(other.url + "/v1/completions", json={"model": "tiny", **body}, timeout=60).json()
        # round robin: `doomed`, `other`, then `doomed` again on the connection the first left open
        for _ in range(2):
            assert post(router.url, prompt="warm up", max_tokens=2).status_code == 200
        result = []
        sender = threading.Thread(target=lambda: result.append(post(router.url, **body)))
        sender.start()
        assert wait_for(lambda: running(doomed.url) > 0, 30), "the generation never started"
        time.sleep(0.5)  # well into the generation
        doomed.kill()
        sender.join(60)
        [r] = result
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["usage"]["completion_tokens"] == 400 and got["usage"] == {**want["usage"], "prompt_tokens_details":
                                                                              got["usage"]["prompt_tokens_details"]}
        for g, w in zip(got["choices"], want["choices"]):
            assert (g["index"], g["text"], g["finish_reason"]) == (w["index"], w["text"], w["finish_reason"])
            if not logprobs:
                assert g["logprobs"] is None and len(g["text"]) > 0
                continue
            assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]
            assert g["logprobs"]["text_offset"] == w["logprobs"]["text_offset"]
            assert g["logprobs"]["token_logprobs"] == pytest.approx(w["logprobs"]["token_logprobs"], abs=1e-4)
        assert got["object"] == "text_completion" and got["id"].startswith("cmpl-")
        assert counter(router.router.metrics.migrations, "tiny", "worker_failed") == 1
        assert not replica(router, doomed.internal_url).healthy
    finally:
        doomed.kill()
        stop(router, other)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def running(url) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:num_requests_running{"))


def sse_events(text):
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_a_fanned_out_stream_that_loses_a_sequence_ends_with_an_error(tiny_model_dir, tmp_path):
    p, d = start_worker(config(tiny_model_dir), "prefill"), start_worker(config(tiny_model_dir), "decode")
    steps = []

    def fail_later(batch):
        steps.append(1)
        if len(steps) > 3:
            raise RuntimeError("the decode worker fails mid-stream")
    d.core.fault_hook = fail_later
    write_router_config(tmp_path / "r.yaml", "tiny", prefill=[p.internal_url], decode=[d.internal_url])
    router = start_router(tmp_path / "r.yaml")
    try:
        r = post(router.url, prompt="stream me", n=2, max_tokens=50, ignore_eos=True, stream=True,
                 stream_options={"include_usage": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert "error" in last and last["error"]["message"], events[-3:]
        assert not any(json.loads(e).get("usage") for e in events[:-1]), "usage as if the stream were complete"
    finally:
        stop(router, p, d)


def test_a_merged_stream_whose_upstream_breaks_ends_with_an_error():
    async def run():
        def event(index, text):
            return b'data: {"id": "x", "choices": [{"index": %d, "text": "%s"}]}\n\n' % (index, text.encode())

        async def whole():
            yield event(0, "b")
            yield b"data: [DONE]\n\n"

        async def broken():
            yield event(0, "b")
            raise UpstreamError("connection closed: by the replica")
        lost = Replica("http://127.0.0.1:1", "tiny", "decode")
        ups = [Upstream(200, "text/event-stream", event(0, "a"), whole()),
               Upstream(200, "text/event-stream", event(0, "a"), broken(), replica=lost)]
        heard = []
        merged = merge_streams(ups, [0, 1], [True, False], True, lambda r, e: heard.append(r))
        assert merged.rest is not None
        return [chunk async for chunk in merged.rest], heard
    chunks, heard = asyncio.run(run())
    events = [e for c in chunks for e in sse_events(c.decode())]
    assert events[-1] == "[DONE]" and "connection closed" in json.loads(events[-2])["error"]["message"]
    assert not any(json.loads(e).get("usage") for e in events[:-1])
    assert [r.url for r in heard] == ["http://127.0.0.1:1"]


def test_a_prefill_lease_the_decode_step_did_not_take_is_released(tiny_model_dir, tmp_path):
    """Every decode worker busy (429), a decode answer that is an error (400): the prefill
    worker's lease goes at once, not when it expires."""
    p = start_worker(config(tiny_model_dir, kv_lease_seconds=120), "prefill")
    busy = start_worker(config(tiny_model_dir), "decode")
    busy.core.config.max_waiting = 1
    busy.engine.num_waiting = lambda: 1  # its queue is full: every decode request gets 429 queue_full
    wrong = start_worker(config(tiny_model_dir), "prefill")  # listed as decode: 400 wrong_role
    leases = p.core.kv_connector.leases
    write_router_config(tmp_path / "busy.yaml", "tiny", prefill=[p.internal_url], decode=[busy.internal_url])
    write_router_config(tmp_path / "wrong.yaml", "tiny", prefill=[p.internal_url], decode=[wrong.internal_url])
    routers = [start_router(tmp_path / "busy.yaml"), start_router(tmp_path / "wrong.yaml")]
    try:
        for router, status in zip(routers, (429, 400)):
            r = post(router.url, prompt="hold my prompt", max_tokens=8)
            assert r.status_code == status, r.text
            assert wait_for(lambda: not leases), f"{len(leases)} leases left after a {status}"
    finally:
        stop(*routers, p, busy, wrong)


def test_a_prefill_retried_elsewhere_leaves_no_lease_behind(tiny_model_dir, tmp_path):
    slow = start_worker(config(tiny_model_dir, kv_lease_seconds=120), "prefill")
    fast = start_worker(config(tiny_model_dir), "prefill")
    d = start_worker(config(tiny_model_dir), "decode")
    once = []

    def stall_once(batch):
        if not once:
            once.append(1)
            time.sleep(1.5)  # past the router's timeout, within the time it waits for a late answer
    slow.core.fault_hook = stall_once
    write_router_config(tmp_path / "r.yaml", "tiny", prefill=[fast.internal_url, slow.internal_url],
                        decode=[d.internal_url])
    router = start_router(tmp_path / "r.yaml", policy="round_robin", probe_interval=60, request_timeout=1.0)
    try:
        r = post(router.url, prompt="retried prefill", max_tokens=8)  # round robin: `slow` first
        assert r.status_code == 200, r.text
        assert once and counter(router.router.metrics.retries, "tiny", "prefill") == 1
        leases = slow.core.kv_connector.leases
        time.sleep(0.6)  # `slow` finishes its prefill late and takes a lease
        assert wait_for(lambda: not leases), "the abandoned prefill's lease is left to expire"
    finally:
        stop(router, slow, fast, d)


def test_bounds_on_one_request(tiny_model_dir, tmp_path):
    p, d = start_worker(config(tiny_model_dir), "prefill"), start_worker(config(tiny_model_dir), "decode")
    gate = threading.Event()
    d.core.fault_hook = lambda batch: gate.wait(10)
    write_router_config(tmp_path / "r.yaml", "tiny", prefill=[p.internal_url], decode=[d.internal_url])
    router = start_router(tmp_path / "r.yaml", max_inflight=4,
                          limits=Limits(max_body_bytes=4096, max_n=8, max_prompts=3))
    try:
        url = router.url + "/v1/completions"
        big = json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode()
        r = httpx.post(url, content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = httpx.post(url, content=iter([big[:3000], big[3000:]]))  # chunked: no Content-Length
        assert r.status_code == 413
        r = post(router.url, prompt="x", n=9)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = post(router.url, prompt=["a", "b", "c", "d"])
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = post(router.url, prompt=["a", "b"], n=3)  # 6 sequences: more than the bound of 4
        assert r.status_code == 400 and "fans out to 6" in r.json()["error"]["message"]

        async def two():  # 3 sequences in flight, then 2 more: past the bound of 4
            async with httpx.AsyncClient(timeout=30) as c:
                first = asyncio.create_task(c.post(url, json={"model": "tiny", "prompt": "x", "n": 3, "max_tokens": 2}))
                await asyncio.sleep(0.5)
                second = await c.post(url, json={"model": "tiny", "prompt": "y", "n": 2, "max_tokens": 2})
                gate.set()
                return await first, second
        first, second = asyncio.run(two())
        assert first.status_code == 200 and len(first.json()["choices"]) == 3, first.text
        assert second.status_code == 429 and second.json()["error"]["code"] == "router_full"
        assert router.router.inflight == 0
    finally:
        gate.set()
        stop(router, p, d)


def test_an_https_replica_is_refused_not_spoken_to_in_plain_http(tiny_model_dir, tmp_path):
    write_router_config(tmp_path / "tls.yaml", "tiny", mixed=["https://127.0.0.1:8443"])
    with pytest.raises(ValueError, match="https:// is not supported"):
        Router(StaticEndpoints(tmp_path / "tls.yaml"))

    async def send():
        pool = Pool()
        try:
            await pool.post("https://127.0.0.1:8443", "/v1/completions", b"{}")
        finally:
            pool.close()
    with pytest.raises(NotSent, match="https:// is not supported"):
        asyncio.run(send())
    # one that a reload brings in is taken out, and requests go to the others
    good = start_worker(config(tiny_model_dir))
    write_router_config(tmp_path / "r.yaml", "tiny", mixed=[good.internal_url])
    router = start_router(tmp_path / "r.yaml", policy="round_robin")
    try:
        write_router_config(tmp_path / "r.yaml", "tiny", mixed=[good.internal_url, "https://127.0.0.1:8443"])
        assert wait_for(lambda: any(r.url.startswith("https") and not r.healthy
                                    for r in router.router.source.models()["tiny"].all()))
        for _ in range(3):
            assert post(router.url, prompt="hello", max_tokens=2).status_code == 200
    finally:
        stop(router, good)


def test_a_prefill_refused_for_full_kv_leases_is_sent_again_not_passed_on(tiny_model_dir, tmp_path):
    """One lease at a time on the only prefill worker, and a decode worker slow to take
    them: prefills meet kv_leases_full, and the router sends them again after a short
    back-off until a lease is free, so every client gets its answer and none a 429."""
    p = start_worker(config(tiny_model_dir, max_kv_leases=1), "prefill")
    d = start_worker(config(tiny_model_dir), "decode")
    d.core.fault_hook = lambda batch: time.sleep(0.08)
    write_router_config(tmp_path / "r.yaml", "tiny", prefill=[p.internal_url], decode=[d.internal_url])
    router = start_router(tmp_path / "r.yaml")

    async def one(c, i):
        await asyncio.sleep(0.05 * i)  # arriving while the leases before are still held
        return await c.post(router.url + "/v1/completions", json={"model": "tiny", "prompt": f"lease {i}",
                                                                  "max_tokens": 6, "ignore_eos": True})

    async def load():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(one(c, i) for i in range(12)))
    try:
        rs = asyncio.run(load())
        assert [r.status_code for r in rs] == [200] * 12, [r.text for r in rs if r.status_code != 200]
        assert all(r.json()["usage"]["completion_tokens"] == 6 for r in rs)
        assert counter(router.router.metrics.handoff_retries, "tiny") > 0
    finally:
        d.core.fault_hook = None
        stop(router, p, d)
