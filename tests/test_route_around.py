"""Routing around a slow KV link (one cell of the transfer matrix): the detector's decision
and its limits, the verb in both fleets (the router's file, the decode pod's annotation), and
the router's pairing, which avoids the pair while both workers keep serving."""

import json

import pytest
import yaml

from fleetwise.controllers.faults import FaultState, Member, Transfer, avoidance_seconds, detect
from fleetwise.fleet import ANNOTATION_AVOID_PREFILL, ActionRefused, WorkerRef, read_avoidances
from fleetwise.local_fleet import LocalFleet
from fleetwise.local_fleet import Member as Proc
from fleetwise.router.endpoints import ConfigError, parse_config
from fleetwise.router.handoff import paired
from fleetwise.router.kube_source import routes_from_pods
from fleetwise.router.replica import Replica
from fleetwise.spec import FaultPolicySpec

POLICY = FaultPolicySpec.model_validate({
    "detection": {"windowSeconds": 10, "minPeers": 3, "deviationThreshold": 4, "consecutiveWindows": 2},
    "remediation": {"actions": ["Quarantine", "RestartPod", "RouteAround"], "maxActionsPerHour": 1,
                    "maxUnavailableFraction": 0.25, "cooldownSeconds": 60}})
P0, P1, D0, D1 = "http://10.0.0.1:9000", "http://10.0.0.2:9000", "http://10.0.0.3:9000", "http://10.0.0.4:9000"


def matrix(slow: tuple[str, str] | None = ("p1", "d2")) -> list[Transfer]:
    return [Transfer(s, r, 1e-6 * (1 + 0.01 * i) * (6 if (s, r) == slow else 1))
            for i, (s, r) in enumerate((s, r) for s in ("p0", "p1", "p2") for r in ("d0", "d1", "d2"))]


def test_a_slow_link_is_routed_around_until_its_avoidance_lapses_then_judged_again():
    state = FaultState()
    d = detect([], matrix(), POLICY, state, now=0.0)  # one pair alone must stay out two windows
    assert d.actions == [] and [i.target for i in d.incidents] == []
    d = detect([], matrix(), POLICY, state, now=10.0)
    assert [(a.verb, a.target, a.until) for a in d.actions] == [
        ("RouteAround", "p1->d2", 10.0 + avoidance_seconds(POLICY))]
    assert d.held == [] and d.flapping == []
    # the pair's last transfers may still be in the next window: no second action, nothing held
    d = detect([], matrix(), POLICY, state, now=20.0)
    assert d.actions == [] and d.held == [] and [i.target for i in d.incidents] == ["p1->d2"]
    # still slow once the avoidance lapsed (70 s): routed around again, never taken for flapping
    for t in (70.0, 130.0, 190.0, 250.0):
        d = detect([], matrix(), POLICY, state, now=t)
        assert [a.verb for a in d.actions] == ["RouteAround"] and d.flapping == [], t


def test_routing_around_takes_none_of_the_limits_a_sick_worker_needs():
    state = FaultState()
    detect([], matrix(), POLICY, state, now=0.0)
    routed = detect([], matrix(), POLICY, state, now=10.0).actions
    detect([], matrix(("p0", "d1")), POLICY, state, now=20.0)  # a second link, in the hourly bound of one
    routed += detect([], matrix(("p0", "d1")), POLICY, state, now=30.0).actions
    assert [(a.verb, a.target) for a in routed] == [("RouteAround", "p1->d2"), ("RouteAround", "p0->d1")]
    members = [Member(f"w{i}", "g", f"n{i}", 0.010) for i in range(7)] + [Member("w7", "g", "n7", 0.030)]
    for t in (40.0, 50.0):
        d = detect(members, [], POLICY, state, now=t)
    assert [(a.verb, a.target) for a in d.actions] == [("Quarantine", "w7"), ("RestartPod", "w7")]


def test_a_detection_only_policy_does_not_route_around_and_says_so():
    quiet = POLICY.model_copy(update={"remediation": POLICY.remediation.model_copy(update={"actions": []})})
    state = FaultState()
    detect([], matrix(), quiet, state, now=0.0)
    d = detect([], matrix(), quiet, state, now=10.0)
    assert d.actions == [] and d.held == [("p1->d2", "the FaultPolicy allows no actions (detection only)")]


def test_a_policy_that_does_not_list_route_around_holds_a_slow_link_and_says_so():
    evict_only = POLICY.model_copy(update={"remediation": POLICY.remediation.model_copy(
        update={"actions": ["Quarantine", "RestartPod"]})})
    state = FaultState()
    detect([], matrix(), evict_only, state, now=0.0)
    d = detect([], matrix(), evict_only, state, now=10.0)
    assert d.actions == [] and [i.target for i in d.incidents] == ["p1->d2"]
    assert d.held == [("p1->d2", "the FaultPolicy does not allow RouteAround (its actions: Quarantine, RestartPod)")]
    assert FaultPolicySpec().remediation.actions == ["Quarantine", "RestartPod", "RouteAround"]  # by default it does


def test_the_avoidance_lasts_at_least_two_windows():
    short = POLICY.model_copy(update={"remediation": POLICY.remediation.model_copy(update={"cooldown_seconds": 0})})
    assert avoidance_seconds(short) == 20.0 and avoidance_seconds(POLICY) == 60.0


def decodes(*avoid: dict[str, float]) -> list[Replica]:
    return [Replica(url, "m", "decode", avoid=a) for url, a in zip((D0, D1), avoid, strict=True)]


def test_the_pairing_avoids_the_pair_and_falls_back_when_no_other_decode_is_available():
    ds = decodes({P0: 100.0}, {})
    assert paired(ds, P0, now=50.0) == [ds[1]]       # P0's prompts go to D1 only
    assert paired(ds, P1, now=50.0) == ds            # D0 keeps taking P1's: it stays routable
    assert paired(ds, P0, now=100.0) == ds           # lapsed
    ds[1].healthy = False                            # the only other decode is down: a slow link beats a 503
    assert paired(ds, P0, now=50.0) == ds
    both = decodes({P0: 100.0}, {P0: 100.0})         # every decode avoids P0 (the only pair left)
    assert paired(both, P0, now=50.0) == both


def test_the_routers_file_carries_a_decode_replicas_avoided_peers_and_refuses_bad_ones():
    entry = {"url": D0, "avoid": {P0: {"until": 4e9, "reason": "slow link"}, P1: {"until": 1.0}}}
    route = parse_config({"models": [{"name": "m", "prefill": [P0, P1], "decode": [entry, D1]}]})["m"]
    assert route.replicas["decode"][0].avoid == {P0: 4e9}  # the lapsed one is left out
    assert route.replicas["decode"][0].routable and route.replicas["decode"][1].avoid == {}
    for bad, problem in (({"url": P0, "avoid": {D0: {"until": 4e9}}}, "only a decode replica"),
                         ({"url": D0, "avoid": [P0]}, "avoid: a mapping"),
                         ({"url": D0, "avoid": {P0: {"until": "soon"}}}, "until is seconds")):
        where = "prefill" if "only" in problem else "decode"
        config = {"models": [{"name": "m", "prefill": [P1], "decode": [D1]}]}
        config["models"][0][where].append(bad)
        with pytest.raises(ConfigError, match=problem):
            parse_config(config)


def pod(name: str, role: str, ip: str, annotations: dict | None = None, ns: str = "llm") -> dict:
    return {"metadata": {"name": name, "namespace": ns, "annotations": annotations or {},
                         "labels": {"fleetwise.dev/model": "m", "fleetwise.dev/role": role,
                                    "app.kubernetes.io/managed-by": "fleetwise"},
                         "ownerReferences": [{"controller": True, "kind": "ModelDeployment",
                                              "apiVersion": "fleetwise.dev/v1alpha1"}]},
            "spec": {},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def test_kubernetes_discovery_reads_the_avoided_prefill_pods_from_the_decode_pods_annotation():
    note = {ANNOTATION_AVOID_PREFILL: json.dumps({"p0": {"until": 4e9, "reason": "slow"}, "gone": {"until": 4e9},
                                                  "p1": {"until": 1.0}})}
    pods = [pod("p0", "prefill", "10.0.0.1"), pod("p1", "prefill", "10.0.0.2"),
            pod("d0", "decode", "10.0.0.3", note), pod("d1", "decode", "10.0.0.4", {ANNOTATION_AVOID_PREFILL: "{"})]
    urls = dict(zip(("p0", "p1", "d0", "d1"), (P0, P1, D0, D1), strict=True))
    route = routes_from_pods(pods, {f"llm/{n}": {"url": u, "internal": u} for n, u in urls.items()})["m"]
    by_url = {r.url: r for r in route.all()}
    assert by_url[D0].avoid == {P0: 4e9}   # a pod it does not know and a lapsed entry count for nothing
    assert by_url[D1].avoid == {} and by_url[D1].routable  # unreadable: ignored, the replica still serves


def test_the_local_fleet_writes_the_avoidance_into_the_routers_file_and_lifts_it(tmp_path):
    members = [Proc(n, [], tmp_path / f"{n}.log", f"http://127.0.0.1:{8000 + i}", role=n[:-2],
                    internal_url=f"http://127.0.0.1:{9000 + i}")
               for i, n in enumerate(("prefill-0", "prefill-1", "decode-0", "decode-1"))]
    fleet = LocalFleet("m", members, tmp_path / "router.yaml")
    fleet.avoid_link(WorkerRef("prefill-0"), WorkerRef("decode-0"), "slow link", until=4e9)
    route = parse_config(yaml.safe_load((tmp_path / "router.yaml").read_text()))["m"]
    d0, d1 = route.replicas["decode"]
    assert d0.avoid == {"http://127.0.0.1:9000": 4e9} and d1.avoid == {}
    assert all(r.routable for r in route.all())  # both workers keep serving
    with pytest.raises(ActionRefused, match="no prefill -> decode pair"):
        fleet.avoid_link(WorkerRef("decode-1"), WorkerRef("decode-0"), "backwards", until=4e9)
    fleet.avoid_link(WorkerRef("prefill-0"), WorkerRef("decode-0"), "healed", until=None)
    assert yaml.safe_load((tmp_path / "router.yaml").read_text())["models"][0]["decode"][0] == "http://127.0.0.1:9002"


class FakeKube:
    def __init__(self, pods: list[dict]) -> None:
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.patches: list[dict] = []
        self.events: list[tuple[str, str]] = []

    def pod(self, namespace: str, name: str) -> dict | None:
        return json.loads(json.dumps(self.pods[name])) if name in self.pods else None

    def patch_pod_metadata(self, namespace: str, name: str, labels=None, annotations=None) -> None:
        self.patches.append(annotations or {})
        meta = self.pods[name]["metadata"]
        meta["annotations"] = {k: v for k, v in (meta["annotations"] | (annotations or {})).items() if v is not None}

    def event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((involved["metadata"]["name"], reason))


def test_the_kubernetes_fleet_records_avoidances_on_the_decode_pod_and_drops_lapsed_ones():
    from fleetwise.operator.actions import KubeFleet
    lapsed = {ANNOTATION_AVOID_PREFILL: json.dumps({"old": {"until": 1.0, "reason": "long ago"}})}
    kube = FakeKube([pod("p0", "prefill", "10.0.0.1"), pod("p1", "prefill", "10.0.0.2"),
                     pod("d0", "decode", "10.0.0.3", lapsed)])
    fleet = KubeFleet(kube)  # type: ignore[arg-type]  # a fake of what it calls
    fleet.avoid_link(WorkerRef("p0", "llm"), WorkerRef("d0", "llm"), "slow link", until=4e9)
    fleet.avoid_link(WorkerRef("p1", "llm"), WorkerRef("d0", "llm"), "slower link", until=4e9)
    note = kube.pods["d0"]["metadata"]["annotations"][ANNOTATION_AVOID_PREFILL]
    assert set(read_avoidances(json.loads(note), now=2.0)) == {"p0", "p1"} and "old" not in note
    assert kube.events == [("d0", "LinkAvoided"), ("d0", "LinkAvoided")]
    fleet.avoid_link(WorkerRef("p0", "llm"), WorkerRef("d0", "llm"), "lifted", until=None)
    fleet.avoid_link(WorkerRef("p1", "llm"), WorkerRef("d0", "llm"), "lifted", until=None)
    assert ANNOTATION_AVOID_PREFILL not in kube.pods["d0"]["metadata"]["annotations"]
    assert kube.events[-1] == ("d0", "LinkRestored")
    for pre, dec, ns, problem in (("d0", "p0", "llm", "no prefill -> decode pair"),
                                  ("p0", "d0", "other", "different namespaces")):
        with pytest.raises(ActionRefused, match=problem):
            fleet.avoid_link(WorkerRef(pre, ns), WorkerRef(dec, "llm"), "x", until=4e9)


def test_the_fault_policy_status_lists_the_links_routed_around_now():
    import time

    from fleetwise.operator.faults import avoided_links
    now = time.time()

    def decode(name: str, annotation: str | None) -> dict:
        return {"metadata": {"name": name, "annotations": {ANNOTATION_AVOID_PREFILL: annotation} if annotation else {}}}
    pods = [decode("d0", json.dumps({"p1": {"until": now + 60, "reason": "slow KV"},
                                     "p0": {"until": now - 1, "reason": "lapsed"}})),
            decode("d1", json.dumps({"p2": {"until": now + 30, "reason": "slower"}})),
            decode("d2", "{not json"), decode("d3", json.dumps({"p0": {"until": "soon"}})), decode("p1", None)]
    got = avoided_links(pods, now)
    assert [(a["prefill"], a["decode"], a["reason"]) for a in got] == [("p2", "d1", "slower"), ("p1", "d0", "slow KV")]
    assert all(a["until"].endswith("Z") for a in got)
