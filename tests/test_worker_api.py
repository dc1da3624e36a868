"""The worker's HTTP API against a real server: the official openai client, error shapes,
back-pressure, disconnects, failures inside the engine, health and metrics."""

import concurrent.futures as cf
import random
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest

from fleetwise.worker.engine.config import EngineConfig

from .workers import start_worker


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8,
                                  num_blocks=512))
    yield w
    w.stop()


@pytest.fixture
def client(worker):
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)


def post(worker, path, body, **kw):
    return httpx.post(worker.url + path, json=body, timeout=30, **kw)


def test_openai_client_completions_stream_and_not(worker, client):
    full = client.completions.create(model="tiny", prompt="the scheduler keeps", max_tokens=20, temperature=0)
    choice = full.choices[0]
    assert choice.finish_reason in ("length", "stop")
    assert full.usage.prompt_tokens == len(worker.core.tokenizer.encode("the scheduler keeps"))
    assert 1 <= full.usage.completion_tokens <= 20
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.completions.create(model="tiny", prompt="the scheduler keeps", max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    worker.wait_idle()


def test_openai_client_chat_stream_and_not(worker, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello, café 🙂"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    worker.wait_idle()


def test_n_choices_seeded_and_logprobs(worker, client):
    a = client.completions.create(model="tiny", prompt="power budgets limit", max_tokens=12, n=3,
                                  temperature=1.0, seed=7, logprobs=2)
    b = client.completions.create(model="tiny", prompt="power budgets limit", max_tokens=12, n=3,
                                  temperature=1.0, seed=7, logprobs=2)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1, "the n choices should be independent samples"
    for c in a.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    worker.wait_idle()


def test_models_and_health(worker):
    models = httpx.get(worker.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    health = httpx.get(worker.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("body, status, param, words", [
    ({"model": "tiny", "prompt": "", "max_tokens": 4}, 400, "prompt", "empty"),
    ({"model": "tiny", "prompt": [], "max_tokens": 4}, 400, "prompt", "empty"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens", "maximum context length"),
    ({"model": "tiny", "prompt": "word " * 1100, "max_tokens": 1}, 400, "max_tokens", "maximum context length"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt", "valid string"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ({"model": "tiny", "prompt": [999999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "tiny"}, 400, "prompt", "Field required"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
])
def test_bad_completion_requests_get_clear_errors(worker, body, status, param, words):
    r = post(worker, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"]


def raw_post(worker, path, body: str) -> httpx.Response:
    """A body as written: Python's json reads Infinity, NaN and lone surrogates, httpx would not send them."""
    return httpx.post(worker.url + path, content=body.encode(), headers={"content-type": "application/json"},
                      timeout=30)


@pytest.mark.parametrize("path, fields, param, words", [
    ("/v1/completions", '"prompt": "x", "seed": 18446744073709551616', "seed", "less than or equal to"),
    ("/v1/completions", '"prompt": "x", "seed": -9223372036854775809', "seed", "greater than or equal to"),
    ("/v1/completions", '"prompt": "x", "top_k": 100000000000000000000', "top_k", "less than or equal to"),
    ("/v1/completions", '"prompt": "x", "temperature": Infinity', "temperature", "finite"),
    ("/v1/completions", '"prompt": "x", "temperature": NaN', "temperature", "finite"),
    ("/v1/completions", '"prompt": "x", "top_p": NaN', "top_p", "finite"),
    ("/v1/completions", '"prompt": "x", "repetition_penalty": Infinity', "repetition_penalty", "finite"),
    ("/v1/completions", '"prompt": "x", "presence_penalty": -Infinity', "presence_penalty", "finite"),
    ("/v1/completions", '"prompt": "x", "frequency_penalty": NaN', "frequency_penalty", "finite"),
    ("/v1/completions", '"prompt": "x", "min_p": NaN', "min_p", "finite"),
    ("/v1/completions", '"prompt": "\\ud800"', "prompt", "lone surrogate"),
    ("/v1/completions", '"prompt": ["fine", "\\udfff"]', "prompt.1", "lone surrogate"),
    ("/v1/completions", '"prompt": "x", "stop": ["\\ud800"]', "stop.0", "lone surrogate"),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "a\\ud800"}]', "messages.0.content",
     "lone surrogate"),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]',
     "messages.0.content.0.text", "lone surrogate"),
    ("/v1/chat/completions", '"messages": [{"role": "user", "content": "x"}], "temperature": NaN', "temperature",
     "finite"),
])
def test_client_mistakes_in_the_raw_body_are_400_naming_the_field(worker, path, fields, param, words):
    r = raw_post(worker, path, '{"model": "tiny", "max_tokens": 2, ' + fields + "}")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


def test_the_extreme_seeds_and_a_tiny_temperature_still_sample(worker):
    for seed in (-(1 << 63), (1 << 63) - 1):  # seed + choice index stays inside torch's seed range
        r = raw_post(worker, "/v1/completions", '{"model": "tiny", "prompt": "x", "max_tokens": 3, "n": 2, '
                                                f'"seed": {seed}}}')
        assert r.status_code == 200, r.text
    r = post(worker, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 3, "temperature": 1e-300})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text


def test_every_openai_prompt_form_gives_the_same_completion(worker):
    text = "the scheduler keeps"
    ids = worker.core.tokenizer.encode(text)

    def complete(prompt) -> tuple[list[str], int]:
        r = post(worker, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        return [c["text"] for c in r.json()["choices"]], r.json()["usage"]["prompt_tokens"]
    want = complete(text)
    assert want[1] == len(ids)
    assert complete(ids) == want
    assert complete([text, text]) == (want[0] * 2, 2 * len(ids))
    assert complete([ids, ids]) == (want[0] * 2, 2 * len(ids))
    for empty in ([""], [[]], [text, ""]):
        r = post(worker, "/v1/completions", {"model": "tiny", "prompt": empty, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_the_served_name_defaults_to_the_model_folder():
    assert EngineConfig(model="/models/llama-3-8b", served_model_name=None).served_name == "llama-3-8b"
    assert EngineConfig(model="/models/llama-3-8b", served_model_name="chat").served_name == "chat"


def test_bad_chat_and_body_errors(worker):
    r = httpx.post(worker.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(worker, "/v1/chat/completions", {"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(worker, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["param"]
    # the engine keeps serving after all of these
    ok = post(worker, "/v1/completions", {"model": "tiny", "prompt": "still here", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_full_queue_is_refused_with_retry_after(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", max_waiting=2,
                                  max_num_seqs=1))
    gate, held = threading.Event(), threading.Event()

    def hold(batch):  # holds the engine inside a step until the queue has been tried
        held.set()
        gate.wait(60)
    w.core.fault_hook = hold
    try:
        body = {"model": "tiny", "prompt": "queued", "max_tokens": 2}
        with cf.ThreadPoolExecutor(8) as pool:
            first = pool.submit(post, w, "/v1/completions", body)
            assert held.wait(30), "the first request never reached the engine"
            rest = [pool.submit(post, w, "/v1/completions", body) for _ in range(6)]
            deadline = time.monotonic() + 30  # two wait in the queue; the other four are answered at once
            while sum(f.done() for f in rest) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            gate.set()
            responses = [first.result()] + [f.result() for f in rest]
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) == 3 and codes.count(429) == 4, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        w.wait_idle()
    finally:
        gate.set()
        w.stop()


def test_client_disconnect_mid_stream_frees_blocks(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny"))
    w.core.fault_hook = lambda batch: time.sleep(0.01)  # ~100 tokens/s: 800 tokens take 8 s
    try:
        body = {"model": "tiny", "prompt": "a long story", "max_tokens": 800, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", w.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert w.core.block_manager.num_free_blocks < w.core.block_manager.num_blocks
        t0 = time.monotonic()
        w.wait_idle(timeout=3)
        assert time.monotonic() - t0 < 3
        aborted = w.core.metrics.success.labels(model_name="tiny", finished_reason="abort")._value.get()
        assert aborted == 1
    finally:
        w.stop()


def test_a_request_that_fails_in_the_engine_fails_alone(tiny_model_dir, worker):
    expected = {}
    prompts = [f"prompt number {i} for the batch" for i in range(6)]
    for p in prompts:
        expected[p] = post(worker, "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 12,
                                                       "temperature": 0}).json()["choices"][0]["text"]
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=512))

    def poison(batch):
        if any(s.params.seed == 666 for s in batch.seqs):
            raise RuntimeError("injected fault")

    w.core.fault_hook = poison
    try:
        def call(body):
            return post(w, "/v1/completions", body)

        with cf.ThreadPoolExecutor(8) as pool:
            good = {p: pool.submit(call, {"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0})
                    for p in prompts}
            bad = pool.submit(call, {"model": "tiny", "prompt": "poisoned", "max_tokens": 12,
                                     "temperature": 0, "seed": 666})
            for p, f in good.items():
                r = f.result()
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == expected[p]
            r = bad.result()
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        w.wait_idle()
        assert httpx.get(w.url + "/health").status_code == 200
    finally:
        w.stop()


def test_health_turns_503_when_the_loop_stalls_or_dies(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny"), health_stall_seconds=0.5)
    try:
        w.core.fault_hook = lambda batch: time.sleep(2.0)
        with cf.ThreadPoolExecutor(1) as pool:
            f = pool.submit(post, w, "/v1/completions", {"model": "tiny", "prompt": "slow", "max_tokens": 1})
            time.sleep(1.0)
            stalled = httpx.get(w.url + "/health")
            assert stalled.status_code == 503 and stalled.json()["status"] == "stalled"
            assert f.result().status_code == 200
        assert httpx.get(w.url + "/health").status_code == 200
        w.core.fault_hook = None

        def broken():
            raise RuntimeError("scheduler bug")
        w.core.scheduler.schedule = broken
        r = post(w, "/v1/completions", {"model": "tiny", "prompt": "dies", "max_tokens": 1})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        dead = httpx.get(w.url + "/health")
        assert dead.status_code == 503 and dead.json()["status"] == "dead"
        again = post(w, "/v1/completions", {"model": "tiny", "prompt": "after", "max_tokens": 1})
        assert again.status_code == 503
    finally:
        w.stop()


@pytest.fixture(scope="module")
def long_text():
    """A million characters of words the tokenizer has not seen: a second or so to tokenise."""
    rng = random.Random(5)
    letters = rng.choices("abcdefghijklmnopqrstuvwxyz ", k=1_000_000)
    return "".join(letters)


@pytest.mark.parametrize("path, field", [("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")])
def test_tokenising_a_long_prompt_does_not_hold_the_event_loop(worker, long_text, path, field):
    """While one request's long prompt is tokenised, the worker goes on answering others.
    (The prompt is then too long for the model: a 400.)"""
    value = long_text if field == "prompt" else [{"role": "user", "content": long_text}]
    t0 = time.monotonic()
    worker.core.tokenizer.encode(long_text)
    alone = time.monotonic() - t0
    assert alone > 0.3, f"the text should take a while to tokenise, not {alone:.2f} s"
    with cf.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, worker, path, {"model": "tiny", field: value, "max_tokens": 2})
        time.sleep(0.1)  # sent and parsed: tokenising now
        t0 = time.monotonic()
        assert httpx.get(worker.url + "/health", timeout=10).status_code == 200
        waited, finished = time.monotonic() - t0, slow.done()
        assert slow.result().status_code == 400
    assert waited < alone / 3, f"/health waited {waited:.2f} s behind a {alone:.2f} s tokenisation"
    assert not finished, "the long prompt should still have been tokenising"


def test_metrics_are_named_like_vllm_and_lint_clean(worker):
    post(worker, "/v1/completions", {"model": "tiny", "prompt": "count me", "max_tokens": 5})
    text = httpx.get(worker.url + "/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total",
                 "fleetwise_step_seconds_bucket", "fleetwise_batch_tokens_bucket", "fleetwise_kv_blocks_used",
                 "fleetwise_kv_blocks_free"]:
        assert f"\n{name}" in text, name
    assert 'model_name="tiny"' in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed to lint /metrics"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    # vLLM's names contain ':' (a promtool lint rule for recorded series); they are the
    # contract that dashboards and endpoint pickers read, so only that rule may complain
    problems = [line for line in (lint.stdout + lint.stderr).splitlines()
                if line.strip() and not (line.startswith("vllm:") and "should not contain ':'" in line)]
    assert not problems, "\n".join(problems)
