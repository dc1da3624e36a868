"""The ModelDeployment controller's plans (pure): scale, replace, roll out, drain."""

import itertools

from fleetwise.controllers.deployment import PodView, plan, template_hash
from fleetwise.spec import ModelDeploymentSpec


def spec(prefill=2, decode=3, image="img:1", mode="Disaggregated"):
    body = {"model": {"name": "m", "uri": "/models/m"}, "image": image, "mode": mode}
    if mode == "Disaggregated":
        body |= {"prefill": {"replicas": prefill, "gpuType": "H100"}, "decode": {"replicas": decode, "gpuType": "A100"}}
    else:
        body |= {"mixed": {"replicas": decode, "gpuType": "H100"}}
    return ModelDeploymentSpec.model_validate(body)


_names = itertools.count()


def pods(s, role, n, ready=True, **kw):
    return [PodView(f"{role}-{next(_names)}", role, kw.pop("hash", None) or template_hash(s, role),
                    node="n1", phase="Running" if ready else "Pending", ready=ready, **kw) for _ in range(n)]


class Cluster:
    """Applies plans the way the operator does: created pods start, become ready later."""

    def __init__(self, s, existing=()):
        self.spec, self.pods, self.now = s, list(existing), 0.0

    def step(self, become_ready=True):
        p = plan(self.spec, self.pods, self.now)
        for name in p.delete:
            self.pods = [x for x in self.pods if x.name != name]
        for name in p.drain:
            x = next(x for x in self.pods if x.name == name)
            x.draining_since, x.outstanding = self.now, 0
        for role, h in p.create:
            self.pods.append(PodView(f"{role}-{next(_names)}", role, h, created=self.now))
        if become_ready:
            for x in self.pods:
                x.ready, x.phase, x.node = True, "Running", x.node or "n1"
        self.now += 1
        return p

    def ready(self, role, current=True):
        h = template_hash(self.spec, role)
        return sum(1 for p in self.pods if p.role == role and p.ready and p.draining_since is None
                   and (p.template_hash == h or not current))


def test_fresh_deployment_creates_every_pool():
    p = plan(spec(), [], 0)
    assert sorted(r for r, _ in p.create) == ["decode"] * 3 + ["prefill"] * 2
    assert not p.converged and p.pools["decode"].summary == "0/3"


def test_converged_deployment_does_nothing_and_plans_are_idempotent():
    s = spec()
    current = pods(s, "prefill", 2) + pods(s, "decode", 3)
    p1, p2 = plan(s, current, 5), plan(s, current, 5)
    assert p1.converged and p1 == p2


def test_failed_and_deleted_pods_are_replaced():
    s = spec()
    current = pods(s, "prefill", 2) + pods(s, "decode", 2) + [PodView("dead", "decode", template_hash(s, "decode"),
                                                                     phase="Failed")]
    p = plan(s, current, 0)
    assert p.delete == ["dead"] and p.create == [("decode", template_hash(s, "decode"))]
    assert any(e[1] == "PodFailed" for e in p.events)


def test_scale_down_drains_idle_and_unready_pods_first_then_deletes_when_idle():
    s = spec(decode=1)
    busy, idle, starting = pods(s, "decode", 1, outstanding=7) + pods(s, "decode", 1, outstanding=0) + \
        pods(s, "decode", 1, ready=False)
    p = plan(s, pods(s, "prefill", 2) + [busy, idle, starting], 0)
    assert sorted(p.drain) == sorted([idle.name, starting.name]) and not p.delete
    idle.draining_since = starting.draining_since = 0
    busy_drain = PodView("busy-draining", "decode", template_hash(s, "decode"), ready=True, phase="Running",
                         draining_since=0, outstanding=3)
    p = plan(s, pods(s, "prefill", 2) + [busy, idle, starting, busy_drain], 10)
    assert sorted(p.delete) == sorted([idle.name, starting.name])  # busy_drain waits for its requests
    assert plan(s, [busy_drain], 10_000).delete == ["busy-draining"]  # ... or for the timeout


def test_rollout_never_drops_below_the_desired_ready_count():
    old = spec(image="img:1")
    c = Cluster(old)
    while not c.step().converged:
        pass
    c.spec = spec(image="img:2")
    for _ in range(40):
        before = c.ready("decode", current=False)
        p = c.step(become_ready=False)
        assert c.ready("decode", current=False) >= min(before, 3)
        live = [x for x in c.pods if x.role == "decode" and x.draining_since is None]
        assert len(live) <= 3 + 1  # one surge pod at a time
        c.step()
        if p.converged:
            break
    assert c.ready("decode") == 3 and c.ready("prefill") == 2
    assert all(x.template_hash == template_hash(c.spec, x.role) for x in c.pods if x.draining_since is None)


def test_a_rollout_creates_each_replica_once_and_no_pod_to_drain_again():
    c = Cluster(spec(image="img:1", decode=2))
    while not c.step().converged:
        pass
    c.spec = spec(image="img:2", decode=2)
    created: list[str] = []
    for _ in range(40):
        p = c.step()
        created += [role for role, _ in p.create]
        assert not any(e[1] == "ScalingDown" for e in p.events)  # the last surge pod is not one too many
        if p.converged:
            break
    assert sorted(created) == ["decode"] * 2 + ["prefill"] * 2


def test_mode_change_removes_the_other_pools():
    s = spec(mode="Colocated", decode=2)
    current = pods(spec(), "prefill", 2) + pods(spec(), "decode", 3)
    p = plan(s, current, 0)
    assert sorted(p.delete) == sorted(x.name for x in current)
    assert p.create == [("mixed", template_hash(s, "mixed"))] * 2


def test_template_hash_changes_only_with_what_the_pod_runs():
    a, b = spec(image="img:1"), spec(image="img:2")
    assert template_hash(a, "decode") != template_hash(b, "decode")
    assert template_hash(spec(decode=3), "decode") == template_hash(spec(decode=9), "decode")  # replicas: no


def test_a_quarantined_pod_is_replaced_and_kept():
    s = spec(prefill=1, decode=2)
    held = pods(s, "decode", 1, quarantined=True)[0]
    current = pods(s, "prefill", 1) + pods(s, "decode", 1) + [held]
    p = plan(s, current, 0)
    assert p.create == [("decode", template_hash(s, "decode"))]  # it is not one of the two replicas
    assert held.name not in p.delete + p.drain
    assert p.pools["decode"].ready == 1 and p.pools["decode"].summary == "1/2 (1 quarantined)"
    assert any(e[1] == "ReplacingQuarantined" for e in p.events)
    # once replaced, the plan is converged and leaves the quarantined pod alone, whatever it is
    replaced = current + pods(s, "decode", 1)
    assert plan(s, replaced, 0).converged
    for change in ({"phase": "Failed"}, {"ready": False}, {"draining_since": 0.0, "outstanding": 0},
                   {"template_hash": "old"}):
        odd = PodView(**{**held.__dict__, **change})
        p = plan(s, replaced[:-2] + [odd, replaced[-1]], 10_000)
        assert odd.name not in p.delete + p.drain, change


def test_a_quarantined_pod_survives_scale_down_rollout_and_pool_removal():
    s = spec(prefill=1, decode=1)
    held = pods(s, "decode", 1, quarantined=True)[0]
    extra = pods(s, "decode", 3)
    p = plan(s, pods(s, "prefill", 1) + extra + [held], 0)
    assert len(p.drain) == 2 and held.name not in p.drain
    c = Cluster(spec(prefill=1, decode=2, image="img:1"), [held])
    while not c.step().converged:
        pass
    c.spec = spec(prefill=1, decode=2, image="img:2")
    for _ in range(40):
        if c.step().converged:
            break
    assert held in c.pods and c.ready("decode") == 2
    assert held.name not in plan(spec(mode="Colocated"), [held], 0).delete


def test_a_restored_pod_counts_again_and_the_extra_one_is_drained():
    s = spec(prefill=1, decode=2)
    c = Cluster(s, pods(s, "prefill", 1) + pods(s, "decode", 2))
    held = c.pods[1]
    held.quarantined = True
    assert c.step().create == [("decode", template_hash(s, "decode"))]
    assert c.step().converged and held in c.pods
    held.quarantined = False
    p = c.step()
    assert len(p.drain) == 1 and not p.create  # three serving pods for two replicas: one goes
    while not c.step().converged:
        pass
    assert len([x for x in c.pods if x.role == "decode"]) == 2
