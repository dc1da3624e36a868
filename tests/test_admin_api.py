"""The admin API over a real LocalFleet and a SQLite store: the role matrix endpoint by
endpoint, the audit of every mutation (refused ones included), problem details for every
error, the body and rate limits, CORS only when configured, and the records it keeps."""

import time

import pytest
import yaml
from fastapi.testclient import TestClient

from fleetwise.admin.app import Limits
from fleetwise.admin.auth import Role, TokenBook, TokenFile, token_entry
from fleetwise.fleet import Routability, WorkerRef

from .admin_fleet import admin_fleet, headers

V = "/api/v1"
REASON = {"reason": "drill"}
# (method, path, body, the least role that may)
ENDPOINTS = [
    ("GET", f"{V}/fleet", None, Role.VIEWER),
    ("GET", f"{V}/power-domains", None, Role.VIEWER),
    ("GET", f"{V}/incidents", None, Role.VIEWER),
    ("GET", f"{V}/incidents/1", None, Role.VIEWER),
    ("GET", f"{V}/actions/power", None, Role.VIEWER),
    ("GET", f"{V}/actions/remediation", None, Role.VIEWER),
    ("GET", f"{V}/audit", None, Role.ADMIN),
    ("POST", f"{V}/workers/local/mixed-1/quarantine", REASON, Role.OPERATOR),
    ("POST", f"{V}/workers/local/mixed-1/restore", REASON, Role.OPERATOR),
    ("POST", f"{V}/workers/local/mixed-1/drain", REASON, Role.OPERATOR),
    ("POST", f"{V}/workers/local/mixed-1/power-override", {"watts": 300, "reason": "drill"}, Role.ADMIN),
    ("POST", f"{V}/nodes/gpu-1/cordon", REASON, Role.OPERATOR),
    ("POST", f"{V}/nodes/gpu-1/uncordon", REASON, Role.OPERATOR),
    ("POST", f"{V}/incidents/1/resolve", {"resolution": "fixed"}, Role.OPERATOR),
    ("POST", f"{V}/incidents", {"kind": "slow_worker", "subject_kind": "worker", "subject": "mixed-0"}, Role.OPERATOR),
    ("POST", f"{V}/actions/power", {"worker": "mixed-0", "watts": 250}, Role.OPERATOR),
    ("POST", f"{V}/actions/remediation", {"verb": "quarantine", "target_kind": "worker", "target": "mixed-0"},
     Role.OPERATOR),
]
CALLERS = ["none", "bad", *Role]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    admin, app = admin_fleet(tmp_path_factory.mktemp("admin"), Limits(rate_per_second=1000, burst=1000))
    with TestClient(app) as client:
        yield admin, client


@pytest.fixture
def api(tmp_path):
    admin, app = admin_fleet(tmp_path)
    with TestClient(app) as client:
        yield admin, client


def test_every_route_is_in_the_matrix(matrix):
    _, client = matrix
    routes = {(m.upper(), p) for p, ops in client.get("/openapi.json").json()["paths"].items() for m in ops}
    tested = {(m, p.replace("local/mixed-1", "{namespace}/{name}").replace("gpu-1", "{node}")
               .replace("/1", "/{incident_id}")) for m, p, _, _ in ENDPOINTS}
    assert routes == tested


@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c if isinstance(c, str) else c.label)
@pytest.mark.parametrize("method,path,body,least", ENDPOINTS, ids=[f"{m} {p[len(V):]}" for m, p, _, _ in ENDPOINTS])
def test_role_matrix(matrix, method, path, body, least, caller):
    _, client = matrix
    h = {"none": {}, "bad": headers(None, "not-a-token")}.get(caller) if isinstance(caller, str) else headers(caller)
    r = client.request(method, path, json=body, headers=h)
    if isinstance(caller, str):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    elif caller < least:
        assert r.status_code == 403 and caller.label in r.json()["detail"]
    else:
        assert r.status_code in (200, 201, 404, 409), r.text  # allowed: done, or refused by the fleet
    if r.status_code >= 400:
        assert r.headers["content-type"] == "application/problem+json"
        p = r.json()
        assert p["status"] == r.status_code and p["instance"] == path and p["title"] and p["detail"]


def test_a_quarantine_goes_through_the_fleet_and_is_recorded_and_audited(api):
    admin, client = api
    r = client.post(f"{V}/workers/local/mixed-0/quarantine", json={"reason": "p99 3x peers"},
                    headers=headers(Role.OPERATOR))
    assert r.status_code == 200 and r.json() == {"verb": "quarantine", "target": "local/mixed-0",
                                                 "state": "quarantined", "power_override": None}
    state = admin.fleet.state(WorkerRef("mixed-0"))
    assert state.state is Routability.QUARANTINED and "p99 3x peers (by operator" in state.reason
    entry = yaml.safe_load(admin.fleet.config.read_text())["models"][0]["mixed"][0]
    assert entry["routable"] is False
    workers = {w["name"]: w for w in client.get(f"{V}/fleet", headers=headers(Role.VIEWER)).json()["workers"]}
    assert workers["mixed-0"]["state"] == "quarantined" and workers["mixed-1"]["state"] == "serving"
    # a worker that is not running cannot be restored: the fleet's refusal, a 409 with its words
    r = client.post(f"{V}/workers/local/mixed-0/restore", json={"reason": "ok"}, headers=headers(Role.OPERATOR))
    assert r.status_code == 409 and "restart it instead" in r.json()["detail"]
    r = client.post(f"{V}/workers/local/mixed-0/drain", json={"reason": "x"}, headers=headers(Role.VIEWER))
    assert r.status_code == 403
    client.post(f"{V}/workers/local/mixed-0/drain", json={"reason": "x"})
    audit = client.get(f"{V}/audit", headers=headers(Role.ADMIN)).json()["items"]
    assert [(a["actor"], a["outcome"], a["status"]) for a in audit] == [
        ("anonymous", "denied", 401), ("viewer", "denied", 403), ("operator", "refused", 409),
        ("operator", "ok", 200)]
    assert audit[3]["path"] == f"{V}/workers/local/mixed-0/quarantine" and "p99 3x peers" in audit[3]["body"]
    assert audit[2]["detail"].startswith("restore:") and audit[0]["request_id"]
    done = client.get(f"{V}/actions/remediation", headers=headers(Role.VIEWER)).json()["items"]
    assert [(d["verb"], d["outcome"], d["actor"]) for d in done] == [("restore", "refused", "operator"),
                                                                     ("quarantine", "done", "operator")]
    assert admin.fleet.state(WorkerRef("mixed-0")).state is Routability.QUARANTINED  # the drain never happened


def test_a_power_override_is_set_through_the_fleet_and_lapses(api):
    admin, client = api
    r = client.post(f"{V}/workers/local/mixed-1/power-override", headers=headers(Role.ADMIN),
                    json={"watts": 280, "expires_in_seconds": 60, "reason": "breaker trip"})
    assert r.status_code == 200 and r.json()["power_override"]["watts"] == 280
    o = admin.fleet.power_override(WorkerRef("mixed-1"))
    assert o is not None and o.watts == 280 and 55 < o.until - time.time() <= 60
    w = next(w for w in client.get(f"{V}/fleet", headers=headers(Role.VIEWER)).json()["workers"]
             if w["name"] == "mixed-1")
    assert w["power_override"]["watts"] == 280
    r = client.post(f"{V}/workers/local/mixed-1/power-override", headers=headers(Role.ADMIN),
                    json={"watts": None, "reason": "done"})
    assert r.status_code == 200 and r.json()["power_override"] is None
    assert admin.fleet.power_override(WorkerRef("mixed-1")) is None
    rows = client.get(f"{V}/actions/power", headers=headers(Role.VIEWER)).json()["items"]
    assert [(p["watts"], p["source"], p["actor"]) for p in rows] == [(None, "override", "admin"),
                                                                      (280, "override", "admin")]
    r = client.post(f"{V}/workers/local/mixed-9/power-override", headers=headers(Role.ADMIN),
                    json={"watts": 100, "reason": "x"})
    assert r.status_code == 404 and "mixed-9" in r.json()["detail"]


def test_incidents_are_recorded_paged_filtered_and_resolved(api):
    _, client = api
    op = headers(Role.OPERATOR)
    for i in range(5):
        r = client.post(f"{V}/incidents", headers=op, json={
            "kind": "slow_worker" if i % 2 else "ecc_errors", "subject_kind": "worker", "subject": f"w{i}",
            "evidence": [{"signal": "p99_seconds", "value": 3.0, "baseline": 1.0}]})
        assert r.status_code == 201 and r.json()["evidence"][0]["observed_at"] == r.json()["opened_at"]
    again = {"kind": "slow_worker", "subject_kind": "worker", "subject": "w5", "idempotency_key": "k-1"}
    first, second = (client.post(f"{V}/incidents", headers=op, json=again) for _ in range(2))
    assert first.json()["id"] == second.json()["id"]  # sent twice (a lost answer), stored once
    seen, cursor = [], None
    while True:
        page = client.get(f"{V}/incidents", params={"limit": 2, **({"cursor": cursor} if cursor else {})},
                          headers=headers(Role.VIEWER)).json()
        seen += [i["subject"] for i in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == ["w5", "w4", "w3", "w2", "w1", "w0"]
    slow = client.get(f"{V}/incidents", params={"kind": "slow_worker"}, headers=op).json()["items"]
    r = client.post(f"{V}/incidents/{slow[0]['id']}/resolve", json={"resolution": "new GPU"}, headers=op)
    assert r.json()["status"] == "resolved" and r.json()["resolved_by"] == "operator"
    assert [i["subject"] for i in client.get(f"{V}/incidents", params={"status": "resolved"},
                                             headers=op).json()["items"]] == ["w5"]
    r = client.get(f"{V}/incidents", params={"cursor": "garbage!"}, headers=op)
    assert r.status_code == 400 and r.json()["detail"].startswith("cursor:")


def test_invalid_bodies_are_422_problems_naming_the_field_and_audited(api):
    _, client = api
    r = client.post(f"{V}/workers/local/mixed-0/quarantine", json={"reasn": "typo"}, headers=headers(Role.OPERATOR))
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    locs = [e["loc"] for e in r.json()["errors"]]
    assert ["body", "reason"] in locs and ["body", "reasn"] in locs and "body.reason" in r.json()["detail"]
    r = client.post(f"{V}/workers/local/Not_A_Name/quarantine", json=REASON, headers=headers(Role.OPERATOR))
    assert r.status_code == 422 and ["path", "name"] in [e["loc"] for e in r.json()["errors"]]
    r = client.get(f"{V}/nowhere", headers=headers(Role.ADMIN))
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    audit = client.get(f"{V}/audit", params={"outcome": "invalid"}, headers=headers(Role.ADMIN)).json()["items"]
    assert len(audit) == 2 and all(a["status"] == 422 for a in audit)


def test_the_body_size_and_request_rate_are_bounded(tmp_path):
    _, app = admin_fleet(tmp_path, Limits(max_body_bytes=1024, rate_per_second=1, burst=3))
    with TestClient(app) as client:
        r = client.post(f"{V}/incidents", headers=headers(Role.OPERATOR),
                        json={"kind": "x", "subject_kind": "node", "subject": "n", "summary": "y" * 2000})
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        codes = [client.get(f"{V}/fleet", headers=headers(Role.VIEWER)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = client.get(f"{V}/fleet", headers=headers(Role.VIEWER))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert client.get(f"{V}/fleet", headers=headers(Role.ADMIN)).status_code == 200  # per token
        drains = [client.post(f"{V}/workers/local/mixed-0/drain", json=REASON, headers=headers(Role.VIEWER))
                  for _ in range(5)]
        assert {r.status_code for r in drains} == {429}
        audit = client.get(f"{V}/audit", headers=headers(Role.ADMIN)).json()["items"]
        # the flood over the rate is audited once, not once per request
        assert [(a["status"], a["outcome"]) for a in audit] == [(429, "limited"), (413, "invalid")]


def test_cors_only_when_configured(tmp_path):
    origin = {"Origin": "https://ops.example"}
    _, closed = admin_fleet(tmp_path / "a")
    _, open_ = admin_fleet(tmp_path / "b", Limits(cors_origins=["https://ops.example"]))
    with TestClient(closed) as a, TestClient(open_) as b:
        assert "access-control-allow-origin" not in a.get(f"{V}/fleet", headers=origin | headers(Role.VIEWER)).headers
        r = b.get(f"{V}/fleet", headers=origin | headers(Role.VIEWER))
        assert r.headers["access-control-allow-origin"] == "https://ops.example"
        preflight = origin | {"Access-Control-Request-Method": "POST",
                              "Access-Control-Request-Headers": "authorization"}
        r = b.options(f"{V}/workers/local/mixed-0/quarantine", headers=preflight)  # a preflight carries no token
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ops.example"
        r = b.options(f"{V}/fleet", headers=preflight | {"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_tokens_file_holds_hashes_and_a_bad_entry_is_named(tmp_path):
    f = tmp_path / "tokens.yaml"
    f.write_text(yaml.safe_dump({"tokens": [token_entry("alice", Role.OPERATOR, "s3cret-token")]}))
    assert "s3cret-token" not in f.read_text()
    for path in (f, tmp_path):  # the file, or the directory a Secret is mounted as
        book = TokenBook.load(path)
        p = book.lookup("s3cret-token")
        assert p is not None and p.name == "alice" and p.role is Role.OPERATOR
        assert book.lookup("s3cret-tokeN") is None
    f.write_text(yaml.safe_dump({"tokens": [{"name": "bob", "role": "root", "sha256": "0" * 64}]}))
    with pytest.raises(ValueError, match=r"tokens\[0\]: role must be"):
        TokenBook.load(f)
    f.write_text(yaml.safe_dump({"tokens": [{"name": "bob", "role": "viewer", "sha256": "plaintext"}]}))
    with pytest.raises(ValueError, match="64 hex digits"):
        TokenBook.load(f)


def test_a_changed_tokens_file_is_read_again_and_a_broken_one_keeps_the_old_tokens(tmp_path):
    import os
    f = tmp_path / "tokens.yaml"
    f.write_text(yaml.safe_dump({"tokens": [token_entry("alice", Role.VIEWER, "token-a")]}))
    tokens = TokenFile(f, every=0)
    assert tokens.lookup("token-a") is not None and tokens.lookup("token-b") is None
    f.write_text(yaml.safe_dump({"tokens": [token_entry("bob", Role.ADMIN, "token-b")]}))  # rotated
    os.utime(f, (time.time() + 5, time.time() + 5))
    assert tokens.lookup("token-a") is None and tokens.lookup("token-b").role is Role.ADMIN
    f.write_text("tokens: [{name: carol}]")
    os.utime(f, (time.time() + 10, time.time() + 10))
    assert tokens.lookup("token-b") is not None  # kept


def test_the_schema_describes_every_field_and_parameter_and_every_error_is_a_problem(matrix):
    _, client = matrix
    schema = client.get("/openapi.json").json()
    bare = [f"{name}.{prop}" for name, s in schema["components"]["schemas"].items()
            for prop, p in (s.get("properties") or {}).items() if not p.get("description")]
    assert not bare, f"fields without a description: {bare}"
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), f"{method} {path}"
            assert all(p.get("description") for p in op.get("parameters", [])), f"{method} {path}"
            for code, response in op["responses"].items():
                if code >= "400":
                    assert list(response["content"]) == ["application/problem+json"], f"{method} {path} {code}"
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_the_rate_limiter_refills_and_forgets_the_least_recent_callers():
    from fleetwise.admin.auth import RateLimiter
    limiter = RateLimiter(rate=2, burst=2, max_callers=3)
    assert [limiter.take("a", now=0.0) for _ in range(3)] == [0, 0, 0.5]
    assert limiter.take("a", now=0.5) == 0  # one refilled in half a second
    for caller in "bcd":
        limiter.take(caller, now=1.0)
    assert list(limiter.buckets) == ["b", "c", "d"]  # bounded: "a" went first


def test_reviewed_tokens_ask_once_per_ttl_and_never_keep_a_failed_review(tmp_path):
    from fleetwise.admin.token_review import ReviewedTokens
    f = tmp_path / "tokens.yaml"
    sa = "system:serviceaccount:fleetwise-system:fleetwise-operator"
    f.write_text(yaml.safe_dump({"tokens": [token_entry("alice", Role.VIEWER, "token-a")],
                                 "serviceAccounts": [{"name": sa, "role": "operator"}]}))
    asked: list[str] = []
    users = {"sa-token": sa, "other-token": "system:serviceaccount:x:y"}

    def review(token: str) -> str | None:  # stands in for the API server's TokenReview (tested in a cluster)
        asked.append(token)
        if token == "flaky":
            raise ConnectionError("apiserver down")
        return users.get(token)
    tokens = ReviewedTokens(TokenFile(f), review, ttl=60)
    assert tokens.lookup("token-a").name == "alice" and asked == []  # the file's tokens need no review
    assert tokens.lookup("sa-token") == tokens.lookup("sa-token")
    assert tokens.lookup("sa-token").role is Role.OPERATOR and asked == ["sa-token"]  # once per ttl
    assert tokens.lookup("other-token") is None and tokens.lookup("other-token") is None
    assert asked.count("other-token") == 1
    assert tokens.lookup("flaky") is None and tokens.lookup("flaky") is None and asked.count("flaky") == 2
    f.write_text(yaml.safe_dump({"serviceAccounts": [{"name": "alice", "role": "viewer"}]}))
    with pytest.raises(ValueError, match=r"serviceAccounts\[0\]: needs name"):
        TokenBook.load(f)
