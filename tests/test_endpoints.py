"""The router's static endpoints file: URLs as before, and replicas that say whether they
are routable and why; bad entries are refused naming the entry and the problem."""

import os

import pytest
import yaml

from fleetwise.router.endpoints import ConfigError, StaticEndpoints, parse_config

A, B = "http://127.0.0.1:8001", "http://127.0.0.1:8002"


def config(*mixed) -> dict:
    return {"models": [{"name": "tiny", "mixed": list(mixed)}]}


def test_urls_alone_are_routable_replicas_as_before():
    routes = parse_config({"models": [{"name": "m", "prefill": [A + "/"], "decode": [B]}]})
    route = routes["m"]
    assert route.mode == "disaggregated"
    assert [(r.url, r.role, r.routable) for r in route.all()] == [(A, "prefill", True), (B, "decode", True)]


def test_a_mapping_says_whether_a_replica_is_routable():
    route = parse_config(config(
        A, {"url": B, "routable": False, "state": "quarantined", "reason": "p99 3x its peers"}))["tiny"]
    assert [(r.url, r.routable) for r in route.all()] == [(A, True), (B, False)]
    assert not parse_config(config({"url": B, "state": "draining"}))["tiny"].all()[0].routable
    assert parse_config(config({"url": B, "state": "serving"}))["tiny"].all()[0].routable
    assert not parse_config(config({"url": B, "routable": False}))["tiny"].all()[0].routable
    assert parse_config(config({"url": B}))["tiny"].all()[0].routable


@pytest.mark.parametrize("entry, problem", [
    (7, r"models\[0\].mixed\[1\]: a replica is a URL or a mapping"),
    ("127.0.0.1:8002", r"models\[0\].mixed\[1\]: '127.0.0.1:8002' is not an http\(s\) URL"),
    ({"routable": False}, r"models\[0\].mixed\[1\].url must be an http\(s\) URL"),
    ({"url": B, "state": "asleep"}, r"state 'asleep' is not one of serving, draining, quarantined"),
    ({"url": B, "routable": "no"}, r"routable must be true or false"),
    ({"url": B, "reason": 3}, r"reason must be a string"),
    ({"url": B, "routable": True, "state": "quarantined"}, r"routable: true contradicts state: quarantined"),
    ({"url": B, "weight": 2}, r"unknown keys \['weight'\]; allowed: url, routable, state, reason"),
])
def test_bad_entries_are_refused_naming_the_problem(entry, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_config(config(A, entry))


def test_a_reload_changes_routability_and_keeps_what_the_router_counted(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(config(A, B)))
    source = StaticEndpoints(path)
    a, b = source.models()["tiny"].all()
    b.outstanding = 2
    path.write_text(yaml.safe_dump(config(A, {"url": B, "state": "quarantined", "reason": "inspect"})))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))  # a change within the file system's clock tick
    assert source.refresh() == []
    assert source.models()["tiny"].all() == [a, b]  # the same replicas, counts kept
    assert a.routable and not b.routable and b.outstanding == 2
    path.write_text(yaml.safe_dump(config(A, {"url": B, "state": "fast asleep"})))
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 2))
    source.refresh()  # refused: the previous endpoints stay
    assert not b.routable and source.models()["tiny"].all() == [a, b]
