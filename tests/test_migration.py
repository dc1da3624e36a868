"""Migration: a stream whose worker is killed (SIGKILL, when the client has k tokens) goes on
at another replica, and the client's stream is the one it would have had: the same text,
logprobs, usage and finish reason, in both modes, greedy, seeded and with penalties and
stop strings. Real worker processes behind a real router; each killed one is started again
on its ports in the background (three replicas per role, so that the next test need not
wait for it), and the router takes it back once its probe passes. A drained worker's
streams move with their KV, with the same result."""

import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from fleetwise.procs import wait_healthy

from .workers import (
    TOKEN,
    internal,
    slow_steps,
    start_router,
    start_worker,
    start_worker_process,
    write_router_config,
)

ARGS = ("--block-size", "8", "--max-num-seqs", "16", "--fault", "switches")
RESTARTING: list = []  # killed workers started again, not yet slowed (their switches start off)


@pytest.fixture(scope="module")
def fleets(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("migration")
    procs = {"mixed": [start_worker_process(tiny_model_dir, "mixed", *ARGS, wait=False) for _ in range(3)],
             "prefill": [start_worker_process(tiny_model_dir, "prefill", *ARGS, wait=False)],
             "decode": [start_worker_process(tiny_model_dir, "decode", *ARGS, wait=False) for _ in range(3)]}
    everyone = [p for group in procs.values() for p in group]
    try:
        wait_healthy(everyone, 180, interval=0.1)
    except Exception:
        for p in everyone:
            p.kill()
        raise
    for p in everyone:
        slow_steps(p)
    configs = {"colocated": ({"mixed": procs["mixed"]}, d / "colocated.yaml"),
               "disaggregated": ({"prefill": procs["prefill"], "decode": procs["decode"]}, d / "disaggregated.yaml")}
    for roles, path in configs.values():
        write_router_config(path, "tiny", **{role: [p.internal_url for p in ps] for role, ps in roles.items()})
    routers = {mode: start_router(path, drain_grace=0.2) for mode, (_, path) in configs.items()}
    for mode, router in routers.items():
        router.config = configs[mode]  # type: ignore[attr-defined]  # (roles, path), for drains
    try:
        yield routers, procs
    finally:
        for r in routers.values():
            r.stop()
        for group in procs.values():
            for p in group:
                p.kill()
        RESTARTING.clear()


def read_stream(url: str, body: dict, on_tokens=None) -> dict:
    """The client's view of a streamed completion: per choice its text, token logprobs and
    finish reason, the usage, and whether it ended with [DONE] and no error."""
    out: dict = {"text": {}, "logprobs": {}, "finish": {}, "usage": None, "done": False, "errors": []}
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        buf = ""
        for piece in r.iter_text():
            buf += piece
            while "\n\n" in buf:
                event, buf = buf.split("\n\n", 1)
                assert event.startswith("data: "), event  # nothing else reaches the client
                if event == "data: [DONE]":
                    out["done"] = True
                    continue
                data = json.loads(event[6:])
                if "error" in data:
                    out["errors"].append(data["error"])
                    continue
                if data.get("usage"):
                    out["usage"] = data["usage"]
                for ch in data["choices"]:
                    i = ch["index"]
                    out["text"][i] = out["text"].get(i, "") + ch["text"]
                    if ch.get("logprobs"):
                        out["logprobs"].setdefault(i, []).extend(ch["logprobs"]["token_logprobs"])
                    if ch["finish_reason"]:
                        out["finish"][i] = ch["finish_reason"]
                    tokens += 1
                if on_tokens is not None:
                    on_tokens(tokens)
    return out


def killing(router, procs: list, k: int):
    """A callback that kills the worker serving the stream once the client has k events."""
    killed: list = []

    def on_tokens(n: int) -> None:
        if killed or n < k:
            return
        route = router.router.source.models()["tiny"]
        role = "mixed" if route.mode == "colocated" else "decode"
        busy = [r.url for r in route.replicas[role] if r.outstanding > 0]
        assert busy
        proc = next(p for p in procs if p.internal_url == busy[0])
        proc.kill()
        killed.append(proc)
    return on_tokens, killed


def migrations(router) -> float:
    return router.router.metrics.migrations.labels("tiny", "worker_failed")._value.get()


def routes(router, draining: list[str] | tuple[()] = ()) -> None:
    """The router's endpoints file: every worker, those restarting (their steps not slowed
    yet) and those in `draining` out of routing."""
    roles, path = router.config
    out = {p.internal_url for p in RESTARTING} | set(draining)
    write_router_config(path, "tiny", **{r: [p.internal_url if p.internal_url not in out else
                                             {"url": p.internal_url, "state": "draining", "reason": "scale-down"}
                                             for p in ps] for r, ps in roles.items()})


def restart(killed: list, router) -> None:
    """The killed worker again, on its ports, in the background, out of routing until
    `settle` has slowed its steps."""
    for proc in killed:
        proc.start()
        RESTARTING.append(proc)
    routes(router)


def settle(routers: dict, mode: str) -> None:
    """Restarted workers that are up get their slow steps and go back into routing; then
    until the router has two routable healthy replicas of the role that migrates (one to
    lose, one to take over)."""
    role = "mixed" if mode == "colocated" else "decode"
    deadline = time.monotonic() + 120
    while True:
        up = [proc for proc in RESTARTING if proc.healthy()]
        for proc in up:
            slow_steps(proc)
            RESTARTING.remove(proc)
        if up:
            for r in routers.values():
                routes(r)
        if sum(r.healthy and r.routable for r in routers[mode].router.source.models()["tiny"].replicas[role]) >= 2:
            return
        assert time.monotonic() < deadline, "the router has fewer than two healthy replicas"
        time.sleep(0.1)


def migrated(fleets, mode: str, body: dict, k: int) -> tuple[dict, dict]:
    """(the uninterrupted stream, the same stream with its worker killed at k events)."""
    routers, procs = fleets
    router = routers[mode]
    settle(routers, mode)
    want = read_stream(router.url, body)
    before = migrations(router)
    on_tokens, killed = killing(router, procs["mixed" if mode == "colocated" else "decode"], k)
    try:
        got = read_stream(router.url, body, on_tokens)
    finally:
        restart(killed, router)
    assert killed, "the stream ended before the kill"
    assert migrations(router) >= before + 1
    return want, got


def same(want: dict, got: dict) -> None:
    assert got["done"] and not got["errors"], got["errors"]
    assert got["text"] == want["text"]
    assert got["finish"] == want["finish"]
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
    for i, lps in want["logprobs"].items():
        assert got["logprobs"][i] == pytest.approx(lps, abs=1e-4)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_greedy_stream_migrated_at_token_k_is_the_uninterrupted_one(fleets, mode, k):
    body = {"model": "tiny", "prompt": f"the migration of a stream at {k}", "max_tokens": k + 80,
            "temperature": 0, "ignore_eos": True, "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    want, got = migrated(fleets, mode, body, k)
    same(want, got)
    assert got["usage"]["completion_tokens"] == k + 80


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_seeded_sampling_with_two_choices_migrates_exactly(fleets, mode):
    body = {"model": "tiny", "prompt": "seeded choices", "max_tokens": 60, "temperature": 1.0, "seed": 1234,
            "n": 2, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    want, got = migrated(fleets, mode, body, 10)
    same(want, got)
    assert len(got["text"]) == 2 and got["text"][0] != got["text"][1]


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_penalties_and_stop_strings_migrate_exactly(fleets, mode):
    routers, _ = fleets
    body = {"model": "tiny", "prompt": "penalised and stopped", "max_tokens": 90, "temperature": 0,
            "frequency_penalty": 0.7, "presence_penalty": 0.4, "repetition_penalty": 1.3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    free = read_stream(routers[mode].url, body)["text"][0]
    stop = free[60:63]  # a stop string the text reaches well after the kill
    assert len(stop) == 3 and free.index(stop) >= 40
    want, got = migrated(fleets, mode, {**body, "stop": [stop, "\x00never"]}, 5)
    same(want, got)
    assert got["finish"][0] == "stop" and got["text"][0] == free[:free.index(stop)]


def test_a_completion_with_several_prompts_migrates_exactly(fleets):
    body = {"model": "tiny", "prompt": ["the first of two prompts", "and the second"], "n": 2, "max_tokens": 70,
            "temperature": 0.8, "seed": 7, "ignore_eos": True, "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    want, got = migrated(fleets, "colocated", body, 12)
    same(want, got)
    assert sorted(got["text"]) == [0, 1, 2, 3] and got["usage"]["completion_tokens"] == 4 * 70


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_a_whole_answer_whose_worker_is_killed_midway_is_the_uninterrupted_one(fleets, mode):
    """A request answered whole is a coalesced stream between the router and the worker, its
    ids held and sent a few times a second: the worker killed after several of those, the
    answer is the one it would have been, and the client never sees the move."""
    routers, procs = fleets
    router = routers[mode]
    role = "mixed" if mode == "colocated" else "decode"
    body = {"model": "tiny", "prompt": f"an answer assembled whole, {mode}", "max_tokens": 150, "temperature": 0,
            "ignore_eos": True}
    settle(routers, mode)
    want = httpx.post(router.url + "/v1/completions", json=body, timeout=120).json()
    before = migrations(router)
    killed: list = []
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.post, router.url + "/v1/completions", json=body, timeout=120)
        deadline = time.monotonic() + 30
        while not (busy := [r.url for r in router.router.source.models()["tiny"].replicas[role] if r.outstanding]):
            assert time.monotonic() < deadline and not answer.done(), "the request never reached a worker"
            time.sleep(0.01)
        time.sleep(0.7)  # 150 steps of at least 10 ms: mid-way, after a few held lines went
        assert not answer.done(), "the answer came before the kill"
        proc = next(p for p in procs[role] if p.internal_url == busy[0])
        proc.kill()
        killed.append(proc)
        got = answer.result()
    restart(killed, router)
    assert got.status_code == 200, got.text
    got_body = got.json()
    assert got_body["choices"][0]["text"] == want["choices"][0]["text"]
    assert got_body["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"] == "length"
    assert got_body["usage"]["completion_tokens"] == want["usage"]["completion_tokens"] == 150
    assert migrations(router) >= before + 1


def draining(router, k: int):
    """A callback that drains the workers serving the stream once the client has k events
    (their state in the router's endpoints file), and the list of those drained."""
    roles, _ = router.config
    role = "mixed" if "mixed" in roles else "decode"
    drained: list[str] = []

    def on_tokens(n: int) -> None:
        if drained or n < k:
            return
        drained.extend(r.url for r in router.router.source.models()["tiny"].replicas[role] if r.outstanding > 0)
        assert drained
        routes(router, drained)
    return on_tokens, drained


def undrain(router) -> None:
    routes(router)
    restarting = {p.internal_url for p in RESTARTING}
    deadline = time.monotonic() + 10
    while not all(r.routable for rs in router.router.source.models()["tiny"].replicas.values() for r in rs
                  if r.url not in restarting):
        assert time.monotonic() < deadline, "the router did not take the drained workers back"
        time.sleep(0.05)


def scraped(procs: list, name: str) -> float:
    """The sum of a metric's samples over the workers' /metrics (dead ones count 0)."""
    total = 0.0
    for p in procs:
        try:
            text = httpx.get(p.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            continue
        total += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))
    return total


DRAINED = {"greedy": {"prompt": "a stream that a drain moves", "max_tokens": 120, "temperature": 0, "logprobs": 1},
           "seeded": {"prompt": "seeded and drained", "max_tokens": 90, "temperature": 1.0, "seed": 4321, "n": 2},
           "prompts": {"prompt": ["two prompts", "drained together"], "max_tokens": 90, "temperature": 0}}
CASES = [(mode, case) for mode in ("colocated", "disaggregated") for case in sorted(DRAINED)
         if (mode, case) != ("disaggregated", "prompts")]  # the router fans those out: greedy again


@pytest.mark.parametrize(("mode", "case"), CASES)
def test_a_drained_workers_streams_move_with_their_kv_and_go_on_exactly(fleets, mode, case):
    """The drain's grace period ends mid-stream: the draining worker exports the stream's
    choices with their KV, another pulls it and decodes on without recomputing, and the
    client's stream is the uninterrupted one, greedy, seeded and with several prompts."""
    routers, procs = fleets
    router = routers[mode]
    role = "mixed" if mode == "colocated" else "decode"
    body = {"model": "tiny", **DRAINED[case], "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    settle(routers, mode)
    want = read_stream(router.url, body)
    before = [scraped(procs[role], m) for m in ("fleetwise_kv_exported_total", "fleetwise_kv_recomputes_total")]
    drains = router.router.metrics.migrations.labels("tiny", "drain")._value.get()
    on_tokens, drained = draining(router, 10)
    try:
        got = read_stream(router.url, body, on_tokens)
    finally:
        undrain(router)
    assert drained, "the stream ended before the drain"
    same(want, got)
    exported, recomputed = (scraped(procs[role], m) - b for m, b in
                            zip(("fleetwise_kv_exported_total", "fleetwise_kv_recomputes_total"), before))
    choices = len(want["text"])
    assert (exported, recomputed) == (choices, 0)
    assert router.router.metrics.migrations.labels("tiny", "drain")._value.get() >= drains + 1
    for url in drained:  # its leases pulled and let go: nothing holds the drained worker any more
        [proc] = [p for p in procs[role] if p.internal_url == url]
        health = httpx.get(proc.url + "/health", timeout=5).json()
        assert (health["running"], health["waiting"], health["kv_leases"], health["kv_exported"] > 0) == \
            (0, 0, 0, True)


def test_resume_requests_are_checked_field_by_field(tiny_model_dir):
    from fleetwise.worker.engine.config import EngineConfig
    worker = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                       num_blocks=128), "mixed", token=TOKEN)
    try:
        request = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}
        base = {"kind": "completion", "request": request, "prompt_token_ids": [5, 6],
                "choices": [{"index": 0, "output_token_ids": [7], "draws": 1}], "response_id": "cmpl-1", "created": 1}
        cases = [({"prompt_token_ids": [5, 10 ** 6]}, "prompt_token_ids"),
                 ({"choices": [{"index": 0, "output_token_ids": [10 ** 6]}]}, "choices"),
                 ({"choices": [{"index": 0, "output_token_ids": [7, 7, 7, 7]}]}, "choices"),
                 ({"choices": [{"index": 0, "output_token_ids": [7], "draws": 2}]}, "choices"),
                 ({"choices": [{"index": 1, "output_token_ids": [7]}]}, "choices"),
                 ({"choices": [{"index": 0, "output_token_ids": []}, {"index": 0, "output_token_ids": []}]},
                  "choices"),
                 ({"request": {**request, "stream": False}}, "request.stream"),
                 ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
                 ({"prompt_list": [[5, 6], [8]]}, "request.prompt"),  # the request has one prompt
                 ({"prompt_list": [[9], [8]], "request": {**request, "prompt": ["x", "y"]}}, "prompt_list"),
                 ({"prompt_list": [[5, 6], []]}, "prompt_list"),
                 ({"prompt_list": [[5, 6], [10 ** 6]], "request": {**request, "prompt": ["x", "y"]}}, "prompt_list"),
                 ({"kv_url": "http://127.0.0.1:1/path"}, "kv_url"),
                 ({"choices": [{"index": 0, "output_token_ids": [7], "draws": 1, "kv_handle": "a b"}]}, "choices")]
        for change, field in cases:
            r = internal("POST", worker, "/internal/resume", json={**base, **change})
            assert r.status_code == 400, (change, r.text)
            assert field in (r.json()["error"]["param"] or "") + r.json()["error"]["message"], (change, r.text)
        r = internal("POST", worker, "/internal/resume", json=base)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        worker.wait_idle()
    finally:
        worker.stop()


def kv_moves(worker) -> tuple[float, float, float]:
    """A worker's (choices exported with their KV, KV bytes received, handed-over KV recomputed)."""
    m = worker.core.metrics
    recomputed = sum(s.value for f in m.kv_recomputes.collect() for s in f.samples if s.name.endswith("_total"))
    return (m.kv_exported.labels(**m._mr)._value.get(), m.kv_bytes.labels(direction="received", **m._mr)._value.get(),
            recomputed)


def test_a_drained_workers_streams_move_when_the_grace_period_ends(tiny_model_dir, tmp_path):
    """A worker taken out of routing (draining) keeps its streams for the grace period, then
    the router moves them with their KV; here the KV arrives corrupt and the new worker
    recomputes instead: the client's stream is unchanged, the old worker idle at once (its
    lease let go) and not taken for unwell. (The KV moving whole: the tests on processes.)"""
    from fleetwise.worker.engine.config import EngineConfig
    corrupt = True
    faults = frozenset({"corrupt-kv"})
    workers = [start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                         num_blocks=256), faults=faults) for _ in range(2)]
    for w in workers:
        w.core.fault_hook = lambda batch: time.sleep(0.01)
    path = tmp_path / "r.yaml"
    write_router_config(path, "tiny", mixed=[w.internal_url for w in workers])
    router = start_router(path, policy="round_robin", probe_interval=0.1, drain_grace=0.5)
    body = {"model": "tiny", "prompt": "a stream outliving its worker's drain", "max_tokens": 150,
            "temperature": 0, "ignore_eos": True, "logprobs": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    # the reference stream from a third worker: had either of the two served it, the new
    # worker could hold the whole context in its prefix cache and pull nothing
    reference = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                          num_blocks=256))
    try:
        want = read_stream(reference.url, body)
    finally:
        reference.stop()
    try:
        drained: list = []

        def drain(n: int) -> None:
            if drained or n < 10:
                return
            route = router.router.source.models()["tiny"]
            [busy] = [r for r in route.replicas["mixed"] if r.outstanding > 0]
            entries = [w.internal_url if w.internal_url != busy.url else
                       {"url": w.internal_url, "state": "draining", "reason": "scale-down"} for w in workers]
            write_router_config(path, "tiny", mixed=entries)
            drained.append(next(w for w in workers if w.internal_url == busy.url))
        t0 = time.monotonic()
        got = read_stream(router.url, body, drain)
        same(want, got)
        metrics = router.router.metrics
        assert metrics.migrations.labels("tiny", "drain")._value.get() == 1
        assert metrics.migrations.labels("tiny", "worker_failed")._value.get() == 0
        [gone] = drained
        gone.wait_idle()  # its stream moved: nothing holds it any more, its KV lease released
        replica = next(r for r in router.router.source.models()["tiny"].replicas["mixed"]
                       if r.url == gone.internal_url)
        assert replica.healthy and not replica.routable
        assert time.monotonic() - t0 < 30
        [target] = [w for w in workers if w is not gone]
        assert kv_moves(gone)[0] == 1
        _, received, recomputed = kv_moves(target)
        assert (received > 0, recomputed) == ((False, 1) if corrupt else (True, 0))
    finally:
        router.stop()
        for w in workers:
            w.core.fault_hook = None
            w.stop()


def test_the_tracker_keeps_ids_strips_their_lines_and_knows_its_bounds():
    from fleetwise.router.tracker import Tracker

    def event(fw: dict, text: str) -> bytes:
        return b"fw: " + json.dumps(fw).encode() + b"\ndata: " + json.dumps({"choices": [{"text": text}]}).encode() \
            + b"\n\n"
    stream = (event({"index": 0, "token_ids": [5], "prompt_token_ids": [1, 2, 3], "id": "cmpl-1", "created": 7}, "a")
              + b"fw: " + json.dumps({"index": 0, "token_ids": [6]}).encode() + b"\n\n"  # held-back text: no data
              + event({"index": 0, "token_ids": [7], "finish_reason": "length"}, "b") + b"data: [DONE]\n\n")
    t = Tracker(max_kept=100)
    out = b"".join(t.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))  # events cut anywhere
    assert b"fw:" not in out and out.count(b"data: ") == 3 and out.endswith(b"data: [DONE]\n\n")
    assert (t.prompt, t.choices[0].token_ids, t.choices[0].finished) == ([1, 2, 3], [5, 6, 7], True)
    assert (t.response_id, t.created, t.done, t.why_not) == ("cmpl-1", 7, True, None)
    body = json.loads(t.resume_body("completion", {"model": "tiny", "prompt": "x"}))
    assert body["choices"] == [{"index": 0, "output_token_ids": [5, 6, 7], "draws": 3, "finished": True}]
    assert body["request"]["stream"] is True
    # beyond the bound: nothing more is kept and the request says it cannot move
    small = Tracker(max_kept=4)
    small.feed(stream)
    assert small.why_not == "too_long" and small.prompt is None
    # the worker saying its engine is gone ends the relay there, the error not passed on
    gone = Tracker(max_kept=100)
    dead = b'data: {"error": {"message": "x", "type": "server_error", "param": null, "code": "engine_unavailable"}}\n\n'
    assert gone.feed(stream[:stream.index(b"fw: ", 10)] + dead).count(b"data: ") == 1 and gone.engine_gone


def read_chat(url: str, body: dict) -> dict:
    """A streamed chat's choices as the client sees them: text, roles sent, logprobs, finish."""
    out: dict = {"text": {}, "roles": {}, "logprobs": {}, "finish": {}, "usage": None, "errors": [], "ids": set()}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
    for line in r.text.splitlines():
        assert not line or line.startswith("data: "), line
        if not line.startswith("data: {"):
            continue
        data = json.loads(line[6:])
        if "error" in data:
            out["errors"].append(data["error"])
            continue
        out["ids"].add(data["id"])
        out["usage"] = data.get("usage") or out["usage"]
        for ch in data["choices"]:
            i = ch["index"]
            out["text"][i] = out["text"].get(i, "") + (ch["delta"].get("content") or "")
            out["roles"][i] = out["roles"].get(i, 0) + ("role" in ch["delta"])
            if ch["logprobs"]:
                out["logprobs"].setdefault(i, []).extend(c["logprob"] for c in ch["logprobs"]["content"])
            if ch["finish_reason"]:
                out["finish"][i] = ch["finish_reason"]
    return out


def test_a_seeded_chat_whose_engine_dies_moves_with_its_logprobs_and_usage(tiny_model_dir, tmp_path):
    from fleetwise.worker.engine.config import EngineConfig
    workers = [start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                         num_blocks=256)) for _ in range(2)]
    path = tmp_path / "r.yaml"
    write_router_config(path, "tiny", mixed=[w.internal_url for w in workers])
    router = start_router(path, policy="round_robin", probe_interval=60)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "say something"}], "max_tokens": 50,
            "temperature": 1.0, "seed": 99, "n": 2, "logprobs": True, "top_logprobs": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        want = read_chat(router.url, body)
        steps: list[int] = []

        def die_later(batch) -> None:
            steps.append(1)
            if len(steps) == 12:
                raise SystemExit("the engine loop dies")
        for w in workers:
            w.core.fault_hook = die_later
        got = read_chat(router.url, body)
        assert not got["errors"] and len(got["ids"]) == 1  # one response id, as one stream
        assert got["text"] == want["text"] and got["finish"] == want["finish"]
        assert got["roles"] == {0: 1, 1: 1}  # each choice's role once
        for i, lps in want["logprobs"].items():
            assert got["logprobs"][i] == pytest.approx(lps, abs=1e-4)
        assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
        assert router.router.metrics.migrations.labels("tiny", "worker_failed")._value.get() == 1
    finally:
        router.stop()
        for w in workers:
            w.core.fault_hook = None
            w.stop()


def test_a_stream_whose_engine_dies_moves_and_the_error_never_reaches_the_client(tiny_model_dir, tmp_path):
    from fleetwise.worker.engine.config import EngineConfig
    workers = [start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                         num_blocks=256)) for _ in range(2)]
    path = tmp_path / "r.yaml"
    write_router_config(path, "tiny", mixed=[w.internal_url for w in workers])
    router = start_router(path, policy="round_robin", probe_interval=60)
    body = {"model": "tiny", "prompt": "an engine that dies", "max_tokens": 60, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        want = read_stream(router.url, body)  # on one worker; round robin sends the next to the other
        steps: list[int] = []

        def die_later(batch) -> None:  # the engine serving the stream dies at its 20th step
            steps.append(1)
            if len(steps) == 20:
                raise SystemExit("the engine loop dies")
        for w in workers:
            w.core.fault_hook = die_later
        got = read_stream(router.url, body)
        same(want, got)
        assert router.router.metrics.migrations.labels("tiny", "worker_failed")._value.get() == 1
        assert sum(not w.engine.alive for w in workers) == 1
    finally:
        router.stop()
        for w in workers:
            w.core.fault_hook = None
            w.stop()


def test_a_drain_moves_only_streams_that_can_move_and_only_after_the_grace_period():
    from fleetwise.router.metrics import RouterMetrics
    from fleetwise.router.migrate import Mover
    from fleetwise.router.replica import Replica
    from fleetwise.router.upstream import Upstream

    aborted: list[str] = []
    async def never(*args):
        raise AssertionError("a drain itself sends nothing")
    mover = Mover(call=never, broken=lambda replica, e: None, metrics=RouterMetrics(), max_kept=10, max_migrations=3,
                  drain_grace=5.0)
    leaving, staying = Replica("http://a:1", "tiny", "mixed"), Replica("http://b:1", "tiny", "mixed")
    can = mover.track(Upstream(200, "text/event-stream", replica=leaving, abort=lambda: aborted.append("can")),
                      lambda: True)
    cannot = mover.track(Upstream(200, "text/event-stream", replica=leaving, abort=lambda: aborted.append("cannot")),
                         lambda: False)
    mover.track(Upstream(200, "text/event-stream", replica=staying, abort=lambda: aborted.append("stays")),
                lambda: True)
    mover.drain([staying], now=100.0)  # `leaving` is out of routing from now on
    mover.drain([staying], now=104.9)
    assert aborted == []
    mover.drain([staying], now=105.0)
    assert aborted == ["can"] and can.drained and not cannot.drained
    mover.untrack(can)
    mover.untrack(cannot)
    assert leaving not in mover.streams


def test_a_drain_exports_streams_with_their_kv_and_breaks_off_only_those_it_cannot():
    import asyncio

    from fleetwise.router.metrics import RouterMetrics
    from fleetwise.router.migrate import Mover
    from fleetwise.router.replica import Replica
    from fleetwise.router.upstream import Upstream

    aborted: list[str] = []
    asked: list[list[str]] = []

    async def never(*args):
        raise AssertionError("a drain itself sends nothing")

    async def export(replica, ids):
        asked.append(ids)
        return None if ids == ["refused"] else {0: "rid.m0"}

    async def main() -> None:
        mover = Mover(call=never, broken=lambda replica, e: None, metrics=RouterMetrics(), max_kept=10,
                      max_migrations=3, drain_grace=0.0, export=export)
        leaving = Replica("http://a:1", "tiny", "mixed")

        def track(name: str, ids):
            return mover.track(Upstream(200, "text/event-stream", replica=leaving,
                                        abort=lambda: aborted.append(name)), lambda: True, lambda: ids)
        ok, refused, unknown = track("ok", ["rid"]), track("refused", ["refused"]), track("unknown", None)
        mover.drain([], now=1.0)
        assert aborted == ["unknown"]  # its ids not known yet: recomputed, as without export
        assert await ok.exporting == {0: "rid.m0"} and await refused.exporting is None
        assert sorted(aborted) == ["refused", "unknown"] and ok.drained and refused.drained and unknown.drained
        assert sorted(asked) == [["refused"], ["rid"]]
    asyncio.run(main())


def test_the_tracker_keeps_every_prompt_and_names_the_kv_in_a_resume():
    from fleetwise.router.tracker import Tracker
    lines = [{"index": 0, "token_ids": [5], "prompt": 0, "prompt_token_ids": [1, 2], "request_id": "a", "id": "c-1",
              "created": 3},
             {"index": 1, "token_ids": [6], "prompt": 1, "prompt_token_ids": [3, 4], "request_id": "b"},
             {"index": 0, "token_ids": [7]}]
    t = Tracker(max_kept=100)
    t.feed(b"".join(b"fw: " + json.dumps(d).encode() + b"\n\n" for d in lines))
    request = {"model": "tiny", "prompt": ["x", "y"]}
    assert t.complete(request) and t.request_ids == {0: "a", 1: "b"}
    body = json.loads(t.resume_body("completion", request, ("http://a:1", {0: "a.m0", 1: "b.m0"})))
    assert body["prompt_token_ids"] == [1, 2] and body["prompt_list"] == [[1, 2], [3, 4]]
    assert [(c["output_token_ids"], c["kv_handle"]) for c in body["choices"]] == [([5, 7], "a.m0"), ([6], "b.m0")]
    assert body["kv_url"] == "http://a:1"
    assert not Tracker(max_kept=100, prompt=[1, 2]).complete(request)  # the second prompt's ids not in yet


def test_a_stream_moves_to_the_replicas_discovery_has_now_not_those_of_when_it_began():
    """In a rollout every replica a stream could have gone to when it began is replaced: it
    moves among those the router knows now."""
    import asyncio

    from fleetwise.router.metrics import RouterMetrics
    from fleetwise.router.migrate import Mover, Where, migrating
    from fleetwise.router.replica import Replica
    from fleetwise.router.upstream import Upstream, UpstreamError

    old = [Replica(f"http://old-{i}:1", "tiny", "mixed") for i in range(2)]
    new = [Replica("http://new-0:1", "tiny", "mixed")]
    now = {"routes": old}
    sent_to: list[list[str]] = []
    trace = {"id": "c-1", "created": 1, "index": 0, "token_ids": [5], "prompt": 0, "prompt_token_ids": [1, 2],
             "request_id": "r"}

    async def broken() -> AsyncIterator[bytes]:
        now["routes"] = new  # the old replicas leave discovery meanwhile
        raise UpstreamError("connection closed: by the replica")
        yield b""

    async def rest() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"index": 0, "text": "b"}]}\n\ndata: [DONE]\n\n'

    async def call(model, role, replicas, payload, keys, coalesce) -> Upstream:
        sent_to.append([r.url for r in replicas])
        return Upstream(200, "text/event-stream", b"", rest(), replica=replicas[0])

    async def main() -> bytes:
        mover = Mover(call=call, broken=lambda replica, e: None, metrics=RouterMetrics(), max_kept=100,
                      max_migrations=3, current=lambda model, role: now["routes"])
        first = b"fw: " + json.dumps(trace).encode() + b'\ndata: {"choices": [{"index": 0, "text": "a"}]}\n\n'
        up = migrating(Upstream(200, "text/event-stream", first, broken(), replica=old[0]),
                       Where("tiny", "mixed", old, "completion", {"model": "tiny", "prompt": "x"}, []), mover)
        assert up.rest is not None
        return b"".join([chunk async for chunk in up.rest])
    out = asyncio.run(main())
    assert sent_to == [["http://new-0:1"]]
    assert b'"text": "a"' in out and b'"text": "b"' in out and out.endswith(b"data: [DONE]\n\n")
