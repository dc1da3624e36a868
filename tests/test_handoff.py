"""Prefill -> decode handoff between two real workers: same tokens as one mixed worker,
corrupt or mismatched KV streams are recomputed, abandoned leases come back."""

import time

import httpx
import pytest

from fleetwise.worker.api.kv_stream import CORRUPT_KV
from fleetwise.worker.engine.config import EngineConfig
from fleetwise.worker.model.files import write_model

from .workers import internal, start_worker


def config(model_dir, **kw):
    return EngineConfig(model=str(model_dir), served_model_name="tiny", block_size=8, num_blocks=256, **kw)


@pytest.fixture(scope="module")
def fleet(tiny_model_dir):
    workers = {"mixed": start_worker(config(tiny_model_dir), "mixed"),
               "prefill": start_worker(config(tiny_model_dir), "prefill"),
               "decode": start_worker(config(tiny_model_dir), "decode")}
    yield workers
    for w in workers.values():
        w.stop()


def prefill_call(worker, request: dict) -> httpx.Response:
    return internal("POST", worker, "/internal/prefill", json={"kind": "completion", "request": request})


def handoff(prefill, decode, kind: str, request: dict, early: bool = False) -> httpx.Response:
    """As the router hands a request over; `early`: the prefill answers at admission and the
    decode worker's pull runs while the prompt is computed, the first token at its end."""
    p = internal("POST", prefill, "/internal/prefill", json={"kind": kind, "request": request, "kv_early": early},
                 timeout=30)
    assert p.status_code == 200, p.text
    first = p.json()
    assert (first["first_token"] is None and first["handle"]) if early else first["first_token"] is not None
    body = {"kind": kind, "request": request, "prompt_token_ids": first["prompt_token_ids"],
            "first_token": first["first_token"], "first_logprob": first["first_logprob"],
            "prefill_url": prefill.internal_url, "handle": first["handle"], "kv_early": early}
    return internal("POST", decode, "/internal/decode", json=body, timeout=30)


def recomputes(worker, reason: str) -> float:
    return worker.core.metrics.kv_recomputes.labels(model_name="tiny", role=worker.core.metrics.role,
                                                    reason=reason)._value.get()


PROMPTS = ["the router hands prompts to", "a decode worker generates " * 9, "x", "café 🙂 " * 20]


@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_handoff_gives_the_mixed_workers_tokens(fleet, prompt, early):
    request = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 1}
    want = httpx.post(fleet["mixed"].url + "/v1/completions", json=request, timeout=30).json()
    recomputed = sum(recomputes(fleet["decode"], r) for r in ("corrupt", "mismatch", "refused", "unreachable"))
    got = handoff(fleet["prefill"], fleet["decode"], "completion", request, early)
    assert got.status_code == 200, got.text
    got = got.json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    assert got["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        want["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    assert got["usage"]["completion_tokens"] == want["usage"]["completion_tokens"]
    assert sum(recomputes(fleet["decode"], r) for r in ("corrupt", "mismatch", "refused", "unreachable")) == recomputed
    fleet["prefill"].wait_idle()  # the decode worker released the lease
    fleet["decode"].wait_idle()
    assert not fleet["prefill"].core.kv_connector.early or early  # an early one goes in the next round


@pytest.mark.parametrize("early", [False, True])
def test_streamed_chat_handoff_and_seeded_sampling(fleet, early):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 20,
               "temperature": 0.9, "seed": 42, "stream": True}
    want = httpx.post(fleet["mixed"].url + "/v1/chat/completions", json=request, timeout=30).text
    got = handoff(fleet["prefill"], fleet["decode"], "chat", request, early)

    def content(sse: str) -> str:
        import json
        chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert got.status_code == 200 and got.text.rstrip().endswith("data: [DONE]")
    assert content(got.text) == content(want) != ""


def test_handoff_recomputes_the_prompt_when_transfer_fails(tiny_model_dir, tmp_path, fleet):
    request = {"model": "tiny", "prompt": "the same prompt every time " * 5, "max_tokens": 16, "temperature": 0}
    want = httpx.post(fleet["mixed"].url + "/v1/completions", json=request, timeout=30).json()["choices"][0]["text"]
    decode = fleet["decode"]

    corrupt = start_worker(config(tiny_model_dir), "prefill", faults=frozenset({CORRUPT_KV}))
    other = write_model(tmp_path / "other", "tiny", seed=9)  # same shapes, other weights
    stranger = start_worker(EngineConfig(model=str(other), served_model_name="tiny", block_size=8,
                                         num_blocks=256), "prefill")
    try:
        for prefill, reason in [(corrupt, "corrupt"), (stranger, "mismatch")]:
            before = recomputes(decode, reason)
            first = prefill_call(prefill, request).json()
            # the stranger's tokenizer and first token come from other files: hand over the
            # right ones, so that only the KV differs
            ours = prefill_call(fleet["prefill"], request).json()
            internal("DELETE", fleet["prefill"], f"/internal/kv/{ours['handle']}")
            body = {"kind": "completion", "request": request, "prompt_token_ids": ours["prompt_token_ids"],
                    "first_token": ours["first_token"], "prefill_url": prefill.internal_url, "handle": first["handle"]}
            r = internal("POST", decode, "/internal/decode", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
            assert recomputes(decode, reason) == before + 1
            prefill.wait_idle()
        # an early prefill whose stream is corrupt: its prompt and first token are computed here
        before = recomputes(decode, "corrupt")
        r = handoff(corrupt, decode, "completion", request, early=True)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
        assert recomputes(decode, "corrupt") == before + 1
        # a handle nobody holds: refused, recomputed
        before = recomputes(decode, "refused")
        body["handle"], body["prefill_url"] = "no-such-handle", corrupt.internal_url
        r = internal("POST", decode, "/internal/decode", json=body, timeout=30)
        assert r.json()["choices"][0]["text"] == want and recomputes(decode, "refused") == before + 1
        decode.wait_idle()
    finally:
        corrupt.stop()
        stranger.stop()


def test_abandoned_lease_comes_back(tiny_model_dir):
    prefill = start_worker(config(tiny_model_dir, kv_lease_seconds=0.5), "prefill")
    try:
        r = internal("POST", prefill, "/internal/prefill", json={"kind": "completion", "request": {
            "model": "tiny", "prompt": "nobody comes for this " * 4, "max_tokens": 8, "ignore_eos": True}})
        handle = r.json()["handle"]
        bm = prefill.core.block_manager
        assert handle and bm.num_free_blocks < bm.num_blocks
        time.sleep(0.8)
        prefill.wait_idle(timeout=2)
        assert internal("GET", prefill, f"/internal/kv/{handle}").status_code == 404
        expired = prefill.core.metrics.kv_leases_expired.labels(model_name="tiny", role="prefill")._value.get()
        assert expired == 1
    finally:
        prefill.stop()


def test_roles_and_bad_handoff_requests(fleet):
    request = {"model": "tiny", "prompt": "x", "max_tokens": 4}
    r = prefill_call(fleet["decode"], request)
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_role"
    r = prefill_call(fleet["prefill"], {**request, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = prefill_call(fleet["prefill"], {**request, "max_tokens": 99999})
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = prefill_call(fleet["prefill"], {"model": "tiny"})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    # max_tokens=1: the prefill finishes the request and holds nothing
    r = prefill_call(fleet["prefill"], {**request, "max_tokens": 1})
    assert r.status_code == 200 and r.json()["handle"] is None
    fleet["prefill"].wait_idle()


def test_internal_calls_in_another_protocol_version_are_refused_before_any_work(fleet):
    request = {"kind": "completion", "request": {"model": "tiny", "prompt": "hello", "max_tokens": 4,
                                                 "ignore_eos": True}}  # a lease to let go: no EOS first
    r = internal("POST", fleet["prefill"], "/internal/prefill", json=request, timeout=30,
                   headers={"x-fleetwise-protocol": "99"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "unsupported_protocol_version" and error["param"] == "x-fleetwise-protocol"
    assert "speaks version 1" in error["message"]
    assert not fleet["prefill"].core.requests and not fleet["prefill"].core.kv_connector.leases
    ok = internal("POST", fleet["prefill"], "/internal/prefill", json=request, timeout=30,
                    headers={"x-fleetwise-protocol": "1"})
    assert ok.status_code == 200, ok.text
    internal("DELETE", fleet["prefill"], f"/internal/kv/{ok.json()['handle']}", timeout=10)
    fleet["prefill"].wait_idle()


def test_the_request_id_names_the_engine_request_and_comes_back(fleet):
    # ignore_eos: a sampled first token may be EOS (1 in the vocabulary's 512), which ends the
    # request there and leaves no lease, so no handle to carry the id
    request = {"kind": "completion", "request": {"model": "tiny", "prompt": "hello", "max_tokens": 4,
                                                 "ignore_eos": True}}
    r = internal("POST", fleet["prefill"], "/internal/prefill", json=request, timeout=30,
                   headers={"x-request-id": "trace-42"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "trace-42"
    assert r.json()["handle"].startswith("trace-42-")  # the engine's id, in its log lines too
    internal("DELETE", fleet["prefill"], f"/internal/kv/{r.json()['handle']}", timeout=10)
    unusable = httpx.get(fleet["decode"].url + "/health", headers={"x-request-id": "a b\tc"}, timeout=10)
    assert len(unusable.headers["x-request-id"]) == 32 and " " not in unusable.headers["x-request-id"]
    fleet["prefill"].wait_idle()


@pytest.mark.parametrize("field, value", [("first_token", -1), ("prompt_token_ids", [])])
def test_a_decode_request_outside_the_protocol_is_refused_naming_the_field(fleet, field, value):
    body = {"kind": "completion", "request": {"model": "tiny", "prompt": "hi", "max_tokens": 4},
            "prompt_token_ids": [1, 2, 3], "first_token": 5, field: value}
    r = internal("POST", fleet["decode"], "/internal/decode", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_a_decode_request_with_a_handle_but_no_prefill_url_is_refused(fleet):
    body = {"kind": "completion", "request": {"model": "tiny", "prompt": "hi", "max_tokens": 4},
            "prompt_token_ids": [1, 2, 3], "first_token": 5, "handle": "h-1"}
    r = internal("POST", fleet["decode"], "/internal/decode", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prefill_url" and "handle" in error["message"]
    assert not fleet["decode"].core.requests
