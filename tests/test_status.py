"""What a ModelDeployment's status says, decided without a cluster."""

from fleetwise.controllers.deployment import Plan, PoolStatus
from fleetwise.controllers.status import (
    Condition,
    deployment_status,
    not_created_news,
    pending_by_reason,
    plan_applied,
    pods_unplaceable,
    settled,
    short_reason,
    spec_invalid,
    unplaceable_news,
)

T0, T1 = "2024-05-01T12:00:00Z", "2024-05-01T12:05:00Z"


def converged_plan() -> Plan:
    return Plan(pools={"prefill": PoolStatus(2, 2, 2), "decode": PoolStatus(3, 3, 3)})


def by_type(conditions: list[Condition]) -> dict[str, Condition]:
    return {c.type: c for c in conditions}


def test_a_converged_plan_is_ready_not_progressing_not_degraded():
    conds = by_type(plan_applied(converged_plan(), []))
    assert [c.type for c in plan_applied(converged_plan(), [])] == ["Ready", "Progressing", "Degraded"]
    assert conds["Ready"] == Condition("Ready", "True", "AllReplicasReady", "ready replicas: prefill 2/2, decode 3/3")
    assert conds["Progressing"] == Condition("Progressing", "False", "Converged", "prefill 2/2, decode 3/3")
    assert conds["Degraded"] == Condition("Degraded", "False", "Placed", "every pod is placed")


def test_a_plan_that_changes_something_is_progressing_with_its_events():
    p = Plan(create=[("decode", "abc")], pools={"prefill": PoolStatus(2, 2, 2), "decode": PoolStatus(3, 2, 2)},
             events=[("Normal", "ScalingUp", "creating 1 decode pod(s) (2 of 3)"),
                     ("Warning", "PodFailed", "decode pod x failed; replacing it")])
    conds = by_type(plan_applied(p, []))
    assert conds["Ready"].status == "False" and conds["Ready"].reason == "ReplicasNotReady"
    assert conds["Ready"].message == "ready replicas: prefill 2/2, decode 2/3"
    assert conds["Progressing"] == Condition("Progressing", "True", "Reconciling",
                                             "creating 1 decode pod(s) (2 of 3); decode pod x failed; replacing it")


def test_a_rollout_is_progressing_and_not_ready_until_every_pod_is_updated():
    for p in (Plan(drain=["old"], pools={"decode": PoolStatus(2, 3, 2)}),
              Plan(delete=["old"], pools={"decode": PoolStatus(2, 2, 2)})):
        assert by_type(plan_applied(p, []))["Progressing"].status == "True"
    # every pod updated and ready, a drained one still busy: looked at again soon, not settled
    conds = plan_applied(Plan(draining=["old"], pools={"decode": PoolStatus(2, 2, 2)}), [])
    assert by_type(conds)["Progressing"] == Condition("Progressing", "True", "Reconciling",
                                                      "1 drained pod(s) finishing their requests")
    assert not settled(deployment_status(None, 1, {}, conds, [], T0))
    p = Plan(pools={"decode": PoolStatus(2, 2, 1)})  # ready, but one pod on the old template
    conds = by_type(plan_applied(p, []))
    assert conds["Ready"].status == "False" and conds["Progressing"].status == "True"


def test_unplaceable_pods_degrade_naming_the_first_reason():
    pending = [{"pod": "a", "reason": "0/6 nodes fit: 6 GPU type is not B200"}, {"pod": "b", "reason": "other"}]
    assert pods_unplaceable(pending) == "2 pod(s) cannot be placed: 0/6 nodes fit: 6 GPU type is not B200"
    assert by_type(plan_applied(converged_plan(), pending))["Degraded"] == Condition(
        "Degraded", "True", "Unschedulable", pods_unplaceable(pending))


def test_an_invalid_spec_is_only_degraded_with_the_error_cut_short():
    assert spec_invalid("bad") == [Condition("Degraded", "True", "InvalidSpec", "bad")]
    assert len(spec_invalid("x" * 2000)[0].message) == 500
    status = deployment_status(None, 3, {}, spec_invalid("bad"), [], T0)
    assert status == {"observedGeneration": 3, "pending": [], "conditions": [
        {"type": "Degraded", "status": "True", "reason": "InvalidSpec", "message": "bad", "observedGeneration": 3,
         "lastTransitionTime": T0}]}


def test_the_status_object_is_written_as_kubectl_and_the_router_read_it():
    status = deployment_status(None, 7, converged_plan().pools, plan_applied(converged_plan(), []), [], T0)
    assert list(status) == ["observedGeneration", "conditions", "pending", "prefill", "decode"]
    assert status["prefill"] == {"desired": 2, "ready": 2, "updated": 2, "summary": "2/2"}
    assert status["decode"] == {"desired": 3, "ready": 3, "updated": 3, "summary": "3/3"}
    assert status["conditions"][0] == {"type": "Ready", "status": "True", "reason": "AllReplicasReady",
                                       "message": "ready replicas: prefill 2/2, decode 3/3",
                                       "observedGeneration": 7, "lastTransitionTime": T0}
    assert list(status["conditions"][0]) == ["type", "status", "reason", "message", "observedGeneration",
                                             "lastTransitionTime"]
    assert all(c["observedGeneration"] == 7 for c in status["conditions"])


def test_last_transition_time_moves_only_when_a_condition_changes_status():
    pools = converged_plan().pools
    first = deployment_status(None, 1, pools, plan_applied(converged_plan(), []), [], T0)
    # a new generation, new messages, the same statuses: the times stay
    busy = Plan(drain=["x"], pools={"prefill": PoolStatus(2, 2, 2), "decode": PoolStatus(3, 3, 3)})
    second = deployment_status(first, 2, pools, plan_applied(busy, []), [], T1)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Ready": T0, "Progressing": T1, "Degraded": T0}
    assert second["observedGeneration"] == 2 and all(c["observedGeneration"] == 2 for c in second["conditions"])
    # the same inputs again: the same object, so nothing is written
    assert deployment_status(second, 2, pools, plan_applied(busy, []), [], "2024-05-01T13:00:00Z") == second
    # a condition written before without a time gets this one
    bare = {"conditions": [{"type": "Ready", "status": "True"}]}
    again = deployment_status(bare, 2, pools, plan_applied(converged_plan(), []), [], T1)
    assert again["conditions"][0]["lastTransitionTime"] == T1


def test_pending_is_cut_to_20_and_messages_to_1000_characters():
    pending = [{"pod": f"p{i}", "reason": "r" * 1500} for i in range(25)]
    status = deployment_status(None, 1, {}, plan_applied(Plan(), pending), pending, T0)
    assert status["pending"] == pending[:20]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == pods_unplaceable(pending)[:1000] and len(degraded["message"]) == 1000


def test_settled_means_ready_and_not_progressing_or_an_invalid_spec():
    ready = deployment_status(None, 1, {}, plan_applied(converged_plan(), []), [], T0)
    assert settled(ready)
    assert not settled(deployment_status(None, 1, {}, plan_applied(Plan(drain=["x"]), []), [], T0))
    assert not settled(deployment_status(None, 1, {}, plan_applied(Plan(pools={"d": PoolStatus(1, 0, 0)}), []), [], T0))
    # only a new spec can change an invalid one, and a new spec wakes the deployment: no retry every second
    assert settled(deployment_status(None, 1, {}, spec_invalid("bad"), [], T0))


def test_an_unschedulable_event_only_for_a_new_situation():
    pending = [{"pod": "a", "reason": "0/3 nodes fit: 3 not enough free GPUs"}]
    assert unplaceable_news([], None) is None
    assert unplaceable_news(pending, None) == pods_unplaceable(pending)
    written = deployment_status(None, 1, {}, plan_applied(Plan(), pending), pending, T0)
    assert unplaceable_news(pending, written) is None
    assert unplaceable_news(pending + pending, written) == pods_unplaceable(pending + pending)


def test_short_reasons_bucket_placement_reasons():
    cases = {"power budget rack-1 full": "power_budget", "GPU type is not B200": "GPU_type",
             "not enough free GPUs": "free_GPUs", "node cordoned": "cordoned", "untolerated taint": "taint",
             "node not ready": "not_ready", "no GPU nodes": "no_GPU_nodes", "something else": "other",
             # the first bucket that matches wins, in this order
             "0/4 nodes fit: 2 power budget r0 full, 2 GPU type is not H100": "power_budget"}
    for reason, bucket in cases.items():
        assert short_reason(reason) == bucket
    pending = [{"pod": "a", "reason": "node cordoned"}, {"pod": "b", "reason": "GPU type is not A100"},
               {"pod": "c", "reason": "node cordoned"}]
    counts = pending_by_reason(pending)
    assert counts["cordoned"] == 2 and counts["GPU_type"] == 1
    assert set(counts) == {"power_budget", "GPU_type", "free_GPUs", "cordoned", "taint", "not_ready", "no_GPU_nodes",
                           "other"} and sum(counts.values()) == 3  # zeros too: a gauge drops what went away


def test_pods_the_api_server_would_not_create_make_the_deployment_degraded_with_its_reason():
    failures = ["prefill pod: pods \"x\" is forbidden: exceeded quota: gpus"]
    conds = {c.type: c for c in plan_applied(Plan(create=[("prefill", "h")]), [], failures)}
    assert conds["Degraded"].status == "True" and conds["Degraded"].reason == "CreateFailed"
    assert "exceeded quota" in conds["Degraded"].message
    both = {c.type: c for c in plan_applied(Plan(), [{"pod": "a", "reason": "no GPU nodes"}], failures)}
    assert both["Degraded"].reason == "CreateFailed" and "cannot be placed" in both["Degraded"].message
    written = deployment_status(None, 1, {}, plan_applied(Plan(), [], failures), [], T0)
    assert not_created_news(failures, None) is not None and not_created_news(failures, written) is None


def test_a_reason_longer_than_the_condition_holds_is_news_once():
    pending = [{"pod": "a", "reason": "x" * 3000}]
    written = deployment_status(None, 1, {}, plan_applied(Plan(), pending), pending, T0)
    assert unplaceable_news(pending, None) is not None
    assert unplaceable_news(pending, written) is None  # the condition keeps only its first 1,000 characters


def test_the_pending_gauge_is_the_sum_over_deployments_and_drops_what_went_away():
    from fleetwise.operator.binding import Binder
    from fleetwise.operator.metrics import OperatorMetrics
    metrics = OperatorMetrics()
    binder = Binder(kube=None, cluster=None, metrics=metrics, tolerations=[])  # type: ignore[arg-type]

    def gauge(reason: str) -> float:
        return metrics.registry.get_sample_value("fleetwise_operator_pending_pods", {"reason": reason})

    binder.record_pending("ns", "a", [{"pod": "a-1", "reason": "node cordoned"}])
    binder.record_pending("ns", "b", [{"pod": "b-1", "reason": "node cordoned"},
                                      {"pod": "b-2", "reason": "no GPU nodes"}])
    assert gauge("cordoned") == 2 and gauge("no_GPU_nodes") == 1
    binder.record_pending("ns", "b", [])  # b's pods were placed
    assert gauge("cordoned") == 1 and gauge("no_GPU_nodes") == 0
    binder.record_pending("ns", "a", None)  # a was deleted
    assert gauge("cordoned") == 0
