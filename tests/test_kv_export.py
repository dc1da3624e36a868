"""`POST /internal/export` on a real worker: a running stream handed over with its KV ends
with a `migrated` event after every token sampled before it, its context waits under a KV
lease (which a drain counts as held, and which another worker pulls as it would a
prompt's), bad exports are refused naming the field, and the operator's drain Event on
the pod says how many sequences moved."""

import json

import httpx
import pytest

from fleetwise.addresses import ADDRESS_MAP_ENV
from fleetwise.operator.inflight import exported, in_flight
from fleetwise.operator.reconcile import Operator
from fleetwise.protocol import TOKEN_IDS_HEADER
from fleetwise.worker.engine.config import EngineConfig

from .workers import AUTH, internal, slow_steps, start_worker


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    w = start_worker(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=256),
                     "mixed", faults=frozenset({"switches"}))
    slow_steps(w)
    yield w
    w.stop()


class Events:
    """The one Kube call a drained pod's Event makes."""

    def __init__(self) -> None:
        self.recorded: list[tuple[dict, str, str, str]] = []

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.recorded.append((involved, type_, reason, message))


def test_an_exported_stream_ends_after_its_tokens_and_its_kv_waits_under_a_lease(worker, tmp_path, monkeypatch):
    addresses = tmp_path / "addresses.json"
    addresses.write_text(json.dumps({"models/w-0": worker.url}))
    monkeypatch.setenv(ADDRESS_MAP_ENV, str(addresses))
    pod = {"metadata": {"name": "w-0", "namespace": "models", "annotations": {"fleetwise.dev/draining-since": "1"}}}
    body = {"model": "tiny", "prompt": "a stream to hand over", "max_tokens": 200, "ignore_eos": True,
            "temperature": 0, "stream": True}
    ids: list[int] = []
    events: list[str] = []
    with httpx.stream("POST", worker.internal_url + "/v1/completions", json=body, timeout=60,
                      headers={**AUTH, TOKEN_IDS_HEADER: "1"}) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines)[4:])
        prompt, rid = first["prompt_token_ids"], first["request_id"]
        ids += first["token_ids"]
        a = internal("POST", worker, "/internal/export", json={"request_ids": [rid]})
        assert a.status_code == 200, a.text
        [choice] = a.json()["choices"]
        for line in lines:
            if line.startswith("fw: "):
                ids += json.loads(line[4:])["token_ids"]
            elif line.startswith("data: "):
                events.append(line)
    assert '"code": "migrated"' in events[-2] and events[-1] == "data: [DONE]"
    assert not any('"finish_reason": "length"' in e for e in events)
    assert 0 < len(ids) < 200 and choice["index"] == 0
    assert choice["num_tokens"] == len(prompt) + len(ids) - 1  # the last token is not in the cache yet
    assert in_flight(pod) == 1 and exported(pod) == 1  # a drain waits for the lease to be pulled
    kube = Events()
    Operator(kube=kube)._drained_event(pod)  # type: ignore[arg-type]  # only its event() is called
    [(involved, type_, reason, message)] = kube.recorded
    assert (involved["kind"], involved["metadata"]["name"], type_, reason) == ("Pod", "w-0", "Normal", "Drained")
    assert "1 running sequence(s)" in message
    kv = internal("GET", worker, f"/internal/kv/{choice['handle']}")
    assert kv.status_code == 200 and len(kv.content) > 0
    assert internal("DELETE", worker, f"/internal/kv/{choice['handle']}").status_code == 204
    worker.wait_idle()
    assert in_flight(pod) == 0


def test_bad_exports_are_refused_naming_the_field(worker):
    for body, status, field in (({"request_ids": []}, 400, "request_ids"),
                                ({"request_ids": ["x", "x"]}, 400, "request_ids"),
                                ({"request_ids": ["no-such-request"]}, 404, "request_ids"),
                                ({}, 400, "request_ids")):
        r = internal("POST", worker, "/internal/export", json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert field in (error["param"] or "") + error["message"], (body, r.text)
    assert httpx.post(worker.url + "/internal/export", json={"request_ids": ["x"]}).status_code == 404  # public port
    assert httpx.post(worker.internal_url + "/internal/export", json={"request_ids": ["x"]}).status_code == 401


def test_only_decoding_choices_are_exported_and_their_blocks_go_with_them(tiny_model_dir):
    from fleetwise.worker.engine.engine import LLMEngine, RequestError
    from fleetwise.worker.engine.migration import MIGRATED, export_running
    from fleetwise.worker.engine.sequence import SamplingParams
    core = LLMEngine(EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=64))
    core.add_request("r", list(range(1, 20)), SamplingParams(max_tokens=30, temperature=0, n=2))
    with pytest.raises(RequestError, match="not decoding"):
        export_running(core, ["r"])  # waiting: nothing in its blocks yet
    with pytest.raises(RequestError, match="no request"):
        export_running(core, ["other"])
    while not all(s.num_output_tokens >= 3 for s in core.requests["r"]):
        core.step()
    held = core.block_manager.num_blocks - core.block_manager.num_free_blocks
    contexts, outs = export_running(core, ["r"])
    assert [o.finish_reason for o in outs] == [MIGRATED, MIGRATED] and not core.requests and not core.has_work()
    # prompt and output but the last token
    assert [c.num_tokens for c in contexts] == [19 + o.num_output_tokens - 1 for o in outs]
    assert core.block_manager.num_blocks - core.block_manager.num_free_blocks == held  # the contexts hold them
    for c in contexts:
        core.block_manager.free(c)
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def _events(lines, ids: dict[int, list[int]], text: dict[int, str]) -> list[dict]:
    """A worker's stream lines read: each choice's token ids (`fw:`) and text, and the `fw:` notes."""
    notes = []
    for line in lines:
        if line.startswith("fw: "):
            notes.append(note := json.loads(line[4:]))
            ids.setdefault(note.get("index", 0), []).extend(note.get("token_ids") or [])
        elif line.startswith("data: {") and '"choices"' in line:
            for ch in json.loads(line[6:])["choices"]:
                text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
    return notes


def test_a_moved_request_with_two_choices_pulls_their_common_prompt_once(tiny_model_dir):
    """n=2, seeded: the new worker pulls the prompt's full blocks with the first choice only
    and shares them with the second (their bytes on the wire say so), and both choices go on
    exactly as in an undisturbed run."""
    from fleetwise.router.tracker import Tracker
    from fleetwise.worker.kv.transfer import stream_size

    from .test_migration import kv_moves
    config = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=256)
    source, target = (start_worker(config, "mixed", faults=frozenset({"switches"})) for _ in range(2))
    slow_steps(source)
    body = {"model": "tiny", "prompt": " ".join(["a prompt long enough for several blocks"] * 4), "max_tokens": 60,
            "n": 2, "temperature": 1.0, "seed": 7, "ignore_eos": True, "stream": True}
    try:
        want: dict[int, str] = {}
        with httpx.stream("POST", source.internal_url + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
            _events(r.iter_lines(), {}, want)
        tracker, ids, text = Tracker(max_kept=10_000, n=2), {}, {}
        with httpx.stream("POST", source.internal_url + "/v1/completions", json=body, timeout=60,
                          headers={**AUTH, TOKEN_IDS_HEADER: "1"}) as r:
            lines = r.iter_lines()
            seen: list[str] = []
            for line in lines:  # until both choices have a few tokens
                seen.append(line)
                _events([line], ids, {})
                if len(ids) == 2 and min(map(len, ids.values())) >= 5:
                    break
            rid = json.loads(seen[0][4:])["request_id"]
            a = internal("POST", source, "/internal/export", json={"request_ids": [rid]})
            assert a.status_code == 200, a.text
            seen += list(lines)
        tracker.feed("".join(line + "\n" for line in seen).encode())
        _events(seen, {}, text)
        handles = {c["index"]: c["handle"] for c in a.json()["choices"]}
        contexts = {c["index"]: c["num_tokens"] for c in a.json()["choices"]}
        resume = json.loads(tracker.resume_body("completion", body, (source.internal_url, handles)))
        with httpx.stream("POST", target.internal_url + "/internal/resume", json=resume, headers=AUTH,
                          timeout=60) as r:
            assert r.status_code == 200, r.read()
            _events(r.iter_lines(), {}, text)
        assert text == want and len(want) == 2
        _, received, recomputed = kv_moves(target)
        prompt = len(tracker.prompt or [])
        common = prompt // 8 * 8  # the prompt's full blocks, pulled with choice 0 only
        header = target.engine.engine.kv_connector.header
        assert prompt > 16 and recomputed == 0
        assert received == stream_size(header(0, contexts[0])) + stream_size(header(common, contexts[1] - common))
        target.wait_idle()
    finally:
        source.stop()
        target.stop()
