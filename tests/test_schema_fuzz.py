"""Property-based fuzzing of the published OpenAPI documents (schemathesis) against real
servers: a worker's public and internal listeners, and a router in front of two colocated
workers and a prefill/decode pair. Every answer must be declared by the document and valid
against it (a stream's every event too), no answer may be a 5xx, and afterwards no replica
is marked down. Examples are bounded so the whole file runs in about a minute, with a fixed
seed; FLEETWISE_FUZZ_SCALE=N runs N times as many, from a random seed, to look further."""

import json
import os

import httpx
import jsonschema_rs
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fleetwise.worker.api.openai import RequestLimits
from fleetwise.worker.engine.config import EngineConfig

from .workers import AUTH, start_router, start_worker

SCALE = int(os.environ.get("FLEETWISE_FUZZ_SCALE", "1"))
LIMITS = RequestLimits(max_n=3, max_prompts=3, max_body_bytes=1 << 16)
TUPLE_ANSWERS = ("/internal/prefill",)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def worker_config(model_dir, name: str) -> EngineConfig:
    # a short context bounds every generation the fuzzer asks for (max_tokens defaults to the rest of it)
    return EngineConfig(model=str(model_dir), served_model_name=name, block_size=8, num_blocks=256,
                        max_model_len=96, max_logprobs=3, max_waiting=64)


def fuzz(base_url: str, models: list[str], examples: int, mode: GenerationMode, headers: dict | None = None,
         fixed: dict | None = None) -> dict[int, int]:
    """Runs `examples` generated requests against the document at base_url; returns the
    count of answers by status. Most bodies name a served model, or every one would be a 404;
    `fixed` fields replace the generated ones in those bodies too."""
    doc = httpx.get(base_url + "/openapi.json", headers=headers, timeout=10).raise_for_status().json()
    # schemathesis mangles a tuple's `prefixItems` (PrefillAnswer.first_logprob) when it checks
    # responses: those answers are checked here, against the same document, instead
    original = json.loads(json.dumps(doc))
    own = [path for path in TUPLE_ANSWERS if path in doc["paths"]]
    for path in own:
        doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"] = {}
    # a stream is read whole (the longest one the short context allows is far below this)
    schema = schemathesis.openapi.from_dict(doc, config=schemathesis.Config.from_dict({"max-stream-events": 10_000}))
    seen: dict[int, int] = {}

    @settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode), model=st.sampled_from([*models, *models, None]))
    def run(case, model: str | None) -> None:
        # a negative case may be negative by its model's type alone: that one stays
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) and model is not None:
            case.body["model"] = model
        if isinstance(case.body, dict) and model is not None and mode == GenerationMode.POSITIVE:
            case.body.update({k: v for k, v in (fixed or {}).items() if k in case.body})
        checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
        response = case.call_and_validate(base_url=base_url, headers=headers, checks=checks, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            check_events(doc, case.operation.path, response.text)
        if case.operation.path in own and response.status_code == 200:
            answer = original["paths"][case.operation.path]["post"]["responses"]["200"]["content"]
            validator = jsonschema_rs.validator_for({"components": original["components"],
                                                     **answer["application/json"]["schema"]})
            assert not [e.message for e in validator.iter_errors(response.json())], response.text

    run()
    return seen


def check_events(doc: dict, path: str, text: str) -> None:
    """Each event of a stream is valid against the document (schemathesis checks that too),
    and the stream ends with [DONE], after which nothing comes."""
    content = doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    validator = jsonschema_rs.validator_for({"components": doc["components"], **content["schema"]})
    events = [e for e in text.split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", text[-500:]
    for event in events[:-1]:
        assert event.startswith("data: {"), event
        body = {"data": event.removeprefix("data: ")}
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, (event, errors)
        assert body["data"] != "[DONE]"


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = start_worker(worker_config(tiny_model_dir, "tiny"), limits=LIMITS)
    yield w
    w.stop()


@pytest.mark.parametrize("mode, examples", [(GenerationMode.POSITIVE, 200), (GenerationMode.NEGATIVE, 80)])
def test_the_worker_answers_as_its_document_says(worker, mode, examples):
    seen = fuzz(worker.url, ["tiny"], examples, mode)
    assert not any(status >= 500 for status in seen), seen
    assert mode == GenerationMode.NEGATIVE or seen.get(200, 0) >= examples // 10, seen  # generation is reached
    assert worker.engine.alive and worker.core.failed_steps == 0


def test_the_internal_listener_answers_as_its_document_says(worker):
    # a decode request pulls from the address it names: here always this worker itself
    # (test_internal_api.py checks the address rules), so the handles are the fuzzer's; most
    # bodies carry a client request the worker serves, so the checks after parsing are reached
    client_request = {"model": "tiny", "prompt": "the model serves", "max_tokens": 4}
    seen = fuzz(worker.internal_url, ["tiny"], 80, GenerationMode.POSITIVE, headers=AUTH,
                fixed={"prefill_url": worker.internal_url, "request": client_request})
    assert not any(status >= 500 for status in seen), seen
    assert worker.engine.alive and worker.core.failed_steps == 0


@pytest.fixture(scope="module")
def router(tiny_model_dir, tmp_path_factory):
    workers = {key: start_worker(worker_config(tiny_model_dir, model), role=role, limits=LIMITS)
               for key, model, role in [("tiny", "tiny", "mixed"), ("tiny-2", "tiny", "mixed"),
                                        ("pd-p", "pd", "prefill"), ("pd-d", "pd", "decode")]}
    config = tmp_path_factory.mktemp("router") / "router.yaml"
    config.write_text(yaml.safe_dump({"models": [
        {"name": "tiny", "mixed": [workers["tiny"].internal_url, workers["tiny-2"].internal_url]},
        {"name": "pd", "prefill": [workers["pd-p"].internal_url], "decode": [workers["pd-d"].internal_url]}]}))
    r = start_router(config)
    yield r
    r.stop()
    for w in workers.values():
        w.stop()


@pytest.mark.parametrize("mode, examples", [(GenerationMode.POSITIVE, 80), (GenerationMode.NEGATIVE, 40)])
def test_the_router_answers_as_its_document_says_and_keeps_every_replica(router, mode, examples):
    seen = fuzz(router.url, ["tiny", "pd"], examples, mode)
    assert not any(status >= 500 for status in seen), seen
    assert mode == GenerationMode.NEGATIVE or seen.get(200, 0) >= examples // 10, seen
    metrics = httpx.get(router.url + "/metrics").text
    health = [line for line in metrics.splitlines() if line.startswith("fleetwise_router_replica_healthy{")]
    assert len(health) == 4 and all(line.endswith(" 1.0") for line in health), health



# -- what the fuzzer found, each pinned ------------------------------------------------------------

def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


@pytest.mark.parametrize("field, value", [("stream", 0), ("seed", False), ("n", True), ("max_tokens", 2.5),
                                          ("stop", 5), ("temperature", "1")])
def test_a_value_of_another_json_type_is_a_400_naming_the_field_not_coerced(router, field, value):
    # pydantic's lax mode read `"stream": 0` as False and `"seed": false` as 0, against the document
    for model in ("tiny", "pd"):
        r = post(router.url, "/v1/completions", {"model": model, "prompt": ["a", "b"], "n": 2, "max_tokens": 2,
                                                 field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (model, r.text)


def test_a_whole_number_written_as_a_float_is_an_integer_as_in_the_document(router):
    # JSON Schema's integer takes 2.0; strict types refused it, and the router's fan-out must agree
    for model in ("tiny", "pd"):
        r = post(router.url, "/v1/completions", {"model": model, "prompt": ["a", "b"], "max_tokens": 2.0, "n": 2.0,
                                                 "seed": 3.0})
        assert r.status_code == 200 and len(r.json()["choices"]) == 4, (model, r.text)


@pytest.mark.parametrize("body, param", [
    ({"n": 2, "seed": "x"}, "seed"),                # the router added 1 to a string: a bare 500
    ({"prompt": [["a"], ["b"]]}, "prompt"),         # split into prompts each valid alone: served
    ({"prompt": [[1, 2], "b"]}, "prompt"),
])
def test_a_disaggregated_request_is_refused_as_a_colocated_one_is(router, body, param):
    for model in ("tiny", "pd"):
        r = post(router.url, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (model, r.text)


def test_the_largest_seed_with_several_choices_is_served_in_both_modes(router):
    # seed + choice index passed int64 in the router's sub-requests: a 400 for a valid seed
    for model in ("tiny", "pd"):
        r = post(router.url, "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2, "n": 3,
                                                 "seed": (1 << 63) - 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3, (model, r.text)


def test_a_fault_of_the_routers_own_is_a_500_with_an_error_body(router):
    limits = router.router.limits
    router.router.limits = None  # the router's own bug, whatever the request
    try:
        r = post(router.url, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    finally:
        router.router.limits = limits
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text


@pytest.mark.parametrize("messages", [[{"role": "user", "content": [{"type": "text", "text": None}]}], 5,
                                      [{"role": "user", "content": [{"type": "text", "text": 7}, "x"]}]])
def test_a_malformed_chat_is_a_400_from_the_router_too(router, messages):
    # prefix affinity hashed the messages before any check: joining a None text was a 500
    for model in ("tiny", "pd"):
        r = post(router.url, "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), (model, r.text)


def test_the_router_and_the_worker_publish_the_same_openai_shapes(router, worker):
    docs = [httpx.get(url + "/openapi.json", timeout=10).json() for url in (router.url, worker.url)]
    for path in ("/v1/completions", "/v1/chat/completions"):
        ops = [doc["paths"][path]["post"] for doc in docs]
        assert ops[0]["requestBody"] == ops[1]["requestBody"]
        assert ops[0]["responses"] == ops[1]["responses"]
        assert "422" not in ops[0]["responses"] and "text/event-stream" in ops[0]["responses"]["200"]["content"]
    assert docs[0]["components"]["schemas"]["ErrorResponse"] == docs[1]["components"]["schemas"]["ErrorResponse"]
    assert "/internal/prefill" not in docs[1]["paths"]  # the public listener's document: its routes alone


def test_a_model_that_is_not_a_name_is_a_400_and_unknown_names_add_no_series(router):
    # the router labelled its request counter with whatever `model` held: a list was a 500,
    # and every unknown name a new series
    r = post(router.url, "/v1/chat/completions", {"model": [None], "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    for i in range(3):
        r = post(router.url, "/v1/completions", {"model": f"no-such-model-{i}", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    assert "no-such-model" not in httpx.get(router.url + "/metrics").text
