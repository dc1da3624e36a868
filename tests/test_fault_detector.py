"""The fault detector's decisions: robust scores, persistence, small groups against their own
history, hard signals, localisation to a node or a KV link, and the FaultPolicy's limits."""

import random

import pytest

from fleetwise.controllers.faults import FaultState, Member, Transfer, detect, localise_links, robust_scores
from fleetwise.spec import FaultPolicySpec

POLICY = FaultPolicySpec.model_validate({
    "detection": {"windowSeconds": 10, "minPeers": 3, "deviationThreshold": 4, "consecutiveWindows": 2},
    "remediation": {"actions": ["Quarantine", "RestartPod", "CordonNode", "RouteAround"], "maxActionsPerHour": 10,
                    "maxUnavailableFraction": 0.25, "cooldownSeconds": 60}})


def pool(values: dict[str, float], nodes: dict[str, str] | None = None, group: str = "models/llama/decode/H100",
         **flags) -> list[Member]:
    nodes = nodes or {}
    return [Member(name, group, nodes.get(name, f"node-{name}"), value, **flags.get(name, {}))
            for name, value in values.items()]


def healthy(n: int, rng: random.Random, base: float = 0.010) -> dict[str, float]:
    return {f"w{i}": base * rng.uniform(0.97, 1.03) for i in range(n)}


def test_robust_scores_put_the_odd_one_out_and_ignore_the_rest():
    scores = robust_scores({"a": 10.0, "b": 10.2, "c": 9.9, "d": 10.1, "slow": 13.0})
    assert scores["slow"] > 10 and all(abs(scores[k]) < 2 for k in "abcd")
    same = robust_scores({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.05})  # no spread: the floor keeps it sane
    assert same["d"] == pytest.approx(2.5)


def test_a_slow_worker_is_an_incident_only_after_consecutive_windows_then_quarantined_and_restarted():
    rng, state = random.Random(0), FaultState()
    for window in range(2):
        values = healthy(8, rng) | {"w3": 0.013}  # 1.3x slower per token
        d = detect(pool(values), [], POLICY, state, now=10.0 * window)
        if window == 0:
            assert d.incidents == [] and d.actions == []  # one window out is not enough
    assert [(a.verb, a.target) for a in d.actions] == [("Quarantine", "w3"), ("RestartPod", "w3")]
    assert d.incidents[0].evidence["windows_out"] == 2 and d.incidents[0].evidence["score"] > 4


# A clean-machine run of tests/test_fault_device_e2e.py: the load-normalised device seconds per
# token (x 1e6) of four workers, three healthy windows, then mixed-1 slowed 1.3x. Its second
# window out scored 3.9, under the threshold, because mixed-2 happened to sit 9% under the rest.
DEVICE_E2E_WINDOWS = [(15747, 15747, 16221, 15717), (13122, 13178, 11849, 13122), (13628, 13499, 13682, 13628),
                      (13175, 16138, 13175, 13066), (14464, 18186, 13167, 14464)]


def test_a_member_out_on_average_over_its_windows_is_found_though_one_window_dips_under_the_threshold():
    state = FaultState()
    for window, values in enumerate(DEVICE_E2E_WINDOWS):
        d = detect(pool({f"mixed-{i}": v * 1e-6 for i, v in enumerate(values)}), [], POLICY, state, now=10.0 * window)
    assert 2 < d.scores["mixed-1"] < POLICY.detection.deviation_threshold
    assert [(a.verb, a.target) for a in d.actions] == [("Quarantine", "mixed-1"), ("RestartPod", "mixed-1")]
    assert d.incidents[0].evidence["windows_out"] == 2


def test_one_window_far_out_is_a_transient_not_an_incident():
    rng, state = random.Random(3), FaultState()
    for window, factor in enumerate([1.0, 1.0, 1.0, 3.0, 1.0, 1.0]):
        values = healthy(6, rng) | {"w3": 0.010 * factor}
        d = detect(pool(values), [], POLICY, state, now=10.0 * window)
        assert d.incidents == [], (window, d.scores)
    dip = FaultState()  # far out, then under half the threshold: on average out, yet not in a row
    for window, e in enumerate([1.14, 1.038]):
        d = detect(pool({"a": 1.0, "b": 1.0, "c": 1.02, "d": 1.0, "e": e}), [], POLICY, dip, now=10.0 * window)
    assert 1.5 < d.scores["e"] < 2 and d.incidents == []


def test_a_busy_worker_is_not_slow_once_its_signal_is_per_unit_of_work():
    """Twice the load shows in raw step time, not in step time per token computed."""
    rng, state = random.Random(1), FaultState()
    for window in range(5):
        per_token = healthy(8, rng)  # the busy one computes twice the tokens in twice the time
        d = detect(pool(per_token), [], POLICY, state, now=10.0 * window)
        assert d.incidents == []


def test_no_false_positives_over_a_long_noisy_healthy_run():
    rng, state = random.Random(2), FaultState()
    found = 0
    for window in range(2000):
        d = detect(pool(healthy(6, rng)), [], POLICY, state, now=10.0 * window)
        found += len(d.incidents)
    assert found == 0


def test_a_hard_signal_acts_at_once():
    rng = random.Random(3)
    members = pool(healthy(6, rng), w2={"hard": "XID 79: GPU has fallen off the bus"})
    d = detect(members, [], POLICY, FaultState(), now=0)
    assert [(a.verb, a.target) for a in d.actions] == [("Quarantine", "w2"), ("RestartPod", "w2")]
    assert "XID 79" in d.actions[0].reason


def test_a_small_group_is_compared_with_its_own_history():
    state = FaultState()
    for window in range(6):
        d = detect(pool({"a": 0.010 + 0.0001 * (window % 2), "b": 0.020}), [], POLICY, state, now=10.0 * window)
        assert d.incidents == []  # b is slower than a, but always was: two peers cannot outvote each other
    for window in range(6, 8):
        d = detect(pool({"a": 0.016, "b": 0.020}), [], POLICY, state, now=10.0 * window)
    assert [i.target for i in d.incidents] == ["a"]


def test_suspects_sharing_a_node_are_the_node():
    rng, state = random.Random(4), FaultState()
    nodes = {f"w{i}": f"node-{i // 2}" for i in range(8)}  # two workers per node
    for window in range(2):
        values = healthy(8, rng) | {"w4": 0.02, "w5": 0.02}  # both on node-2
        d = detect(pool(values, nodes), [], POLICY, state, now=10.0 * window)
    assert [(i.kind, i.target) for i in d.incidents] == [("node", "node-2")]
    assert [(a.verb, a.target) for a in d.actions] == [("CordonNode", "node-2")]


def test_kv_transfers_localise_to_a_sender_a_receiver_or_one_link():
    base = {(s, r): 1e-9 for s in ("p0", "p1", "p2") for r in ("d0", "d1", "d2")}
    one_link = [Transfer(s, r, v * (5 if (s, r) == ("p1", "d2") else 1)) for (s, r), v in base.items()]
    assert [(i.kind, i.target) for i in localise_links(one_link, 4)] == [("link", "p1->d2")]
    sender = [Transfer(s, r, v * (5 if s == "p0" else 1)) for (s, r), v in base.items()]
    assert [(i.kind, i.target) for i in localise_links(sender, 4)] == [("worker", "p0")]
    receiver = [Transfer(s, r, v * (5 if r == "d1" else 1)) for (s, r), v in base.items()]
    assert [(i.kind, i.target) for i in localise_links(receiver, 4)] == [("worker", "d1")]
    state = FaultState()
    assert detect([], one_link, POLICY, state, now=0).incidents == []   # one pair, one window: not yet
    d = detect([], one_link, POLICY, state, now=10)
    assert [(a.verb, a.target) for a in d.actions] == [("RouteAround", "p1->d2")]  # nobody is evicted
    assert detect([], sender, POLICY, FaultState(), now=0).actions != []   # a whole row acts at once


def test_one_noisy_window_on_a_link_is_not_an_incident():
    base = {(s, r): 1e-9 for s in ("p0", "p1", "p2") for r in ("d0", "d1", "d2")}
    state = FaultState()
    for window, (s, r) in enumerate([("p0", "d0"), ("p1", "d1"), ("p2", "d2"), ("p0", "d1")] * 5):
        noisy = [Transfer(a, b, v * (20 if (a, b) == (s, r) else 1)) for (a, b), v in base.items()]
        assert detect([], noisy, POLICY, state, now=10.0 * window).incidents == []


def test_never_more_than_the_unavailable_fraction_of_a_group_rounded_down():
    rng, state = random.Random(5), FaultState()
    for window in range(2):
        values = healthy(5, rng) | {"w0": 0.02, "w1": 0.02}
        d = detect(pool(values), [], POLICY, state, now=10.0 * window)
    assert {a.target for a in d.actions} == {"w0"}  # 5 peers at 0.25: 1.25, one at a time
    assert [t for t, _ in d.held] == ["w1"] and "maxUnavailableFraction" in d.held[0][1]
    three = FaultState()
    for window in range(2):
        d = detect(pool({"a": 0.01, "b": 0.0101, "c": 0.02}), [], POLICY, three, now=10.0 * window)
    assert d.actions == [] and "allows 0" in d.held[0][1]  # 3 peers at 0.25: none


def test_cooldown_hourly_limit_and_flapping():
    policy = POLICY.model_copy(update={"remediation": POLICY.remediation.model_copy(
        update={"max_actions_per_hour": 2, "cooldown_seconds": 30})})
    state = FaultState()
    rng = random.Random(6)

    def window(now: float, slow: set[str]):
        values = healthy(12, rng) | {w: 0.02 for w in slow}
        return detect(pool(values, group="g"), [], policy, state, now=now)

    d = window(0, {"w1"})
    d = window(10, {"w1"})
    assert {a.target for a in d.actions} == {"w1"}
    d = window(20, {"w1"})
    assert d.actions == [] and "cooldown" in d.held[0][1]
    window(30, {"w2"})
    d = window(40, {"w2"})
    assert {a.target for a in d.actions} == {"w2"}
    window(50, {"w3"})
    d = window(60, {"w3"})
    assert d.actions == [] and "2 actions in the last hour" in d.held[0][1]
    flappy = FaultState()
    for start in (0, 100, 200):  # w5 comes back, goes, comes back...
        for t in (start, start + 10):
            d = detect(pool(healthy(12, rng) | {"w5": 0.02}, group="g"), [], POLICY, flappy, now=t)
        detect(pool(healthy(12, rng), group="g"), [], POLICY, flappy, now=start + 50)
    assert d.flapping == ["w5"] and d.actions == [] and "no more actions" in d.held[0][1]


def test_the_policys_allowed_actions_bound_what_is_done():
    only_quarantine = POLICY.remediation.model_copy(update={"actions": ["Quarantine"]})
    policy = POLICY.model_copy(update={"remediation": only_quarantine})
    state = FaultState()
    rng = random.Random(7)
    for window in range(2):
        d = detect(pool(healthy(8, rng) | {"w1": 0.02}), [], policy, state, now=10.0 * window)
    assert [a.verb for a in d.actions] == ["Quarantine"]
    nodes = {f"w{i}": f"node-{i // 2}" for i in range(8)}
    for window in range(2, 4):
        d = detect(pool(healthy(8, rng) | {"w6": 0.02, "w7": 0.02}, nodes), [], policy, state, now=10.0 * window)
    assert d.actions == [] and "allows none" in d.held[0][1]


def contended(names: list[str], rng: random.Random, sigma: float = 0.25) -> dict[str, float]:
    """Step seconds per token of healthy peers on a shared CPU: each window each member's is
    off by a log-normal factor (sigma 0.25, the median spread measured on a loaded two-core
    machine: 2-3x apart in some windows, within a few percent in others)."""
    return {n: 0.010 * rng.lognormvariate(0, sigma) for n in names}


def _windows_out(scores: list[dict[str, float]], threshold: float = 4, windows: int = 2) -> int:
    """How often a member's score is out `windows` windows in a row by the detector's rule: each
    window at least half the threshold, on average the threshold."""
    run: dict[str, list[float]] = {}
    out = 0
    for s in scores:
        for n, score in s.items():
            run[n] = (run.get(n, []) + [score])[-windows:] if score > threshold / 2 else []
            out += len(run[n]) == windows and sum(run[n]) / windows > threshold
    return out


def test_a_contended_group_raises_fewer_false_incidents_with_its_typical_spread_as_a_floor():
    names = ["w0", "w1", "w2", "w3"]
    rng, state = random.Random(1), FaultState()
    found, without_floor = 0, []
    for window in range(5000):   # 14 hours of 10 s windows
        values = contended(names, rng)
        found += len(detect(pool(values), [], POLICY, state, now=10.0 * window).incidents)
        without_floor.append(robust_scores(values))   # each window's own spread alone
    assert _windows_out(without_floor) >= 10 and found * 3 <= _windows_out(without_floor), \
        (found, _windows_out(without_floor))


@pytest.mark.parametrize("seed", range(10))
def test_a_6x_slow_member_of_a_contended_group_is_still_found_within_three_windows(seed):
    names = ["w0", "w1", "w2", "w3"]
    rng, state = random.Random(seed), FaultState()
    for window in range(30):
        detect(pool(contended(names, rng)), [], POLICY, state, now=10.0 * window)
    found = []
    for k in range(3):
        values = contended(names, rng)
        values["w2"] *= 6
        found += [i.target for i in detect(pool(values), [], POLICY, state, now=10.0 * (30 + k)).incidents]
    assert found[:1] == ["w2"] and set(found) == {"w2"}


def test_a_1_3x_slow_member_of_four_is_found_within_three_windows_most_times_with_few_false_ones():
    """Groups of four with 5% log-normal noise per window (a quiet machine's device time): a
    member slowed 1.3x from window 20 is found within three windows in most of 200 groups
    (82% here; 53% when every window had to pass the threshold), and 5,000 healthy windows
    (14 hours) raise few incidents (0-2 over four seeds, 0-1 with the stricter rule)."""
    names = ["w0", "w1", "w2", "w3"]
    found = 0
    for seed in range(200):
        rng, state = random.Random(seed), FaultState()
        for window in range(23):
            values = contended(names, rng, sigma=0.05)
            values["w1"] *= 1.3 if window >= 20 else 1.0
            d = detect(pool(values), [], POLICY, state, now=10.0 * window)
            if d.incidents:
                found += window >= 20 and [i.target for i in d.incidents] == ["w1"]
                break
    assert found >= 150, found
    rng, state = random.Random(7), FaultState()
    false = sum(len(detect(pool(contended(names, rng, sigma=0.05)), [], POLICY, state, now=10.0 * w).incidents)
                for w in range(5000))
    assert false <= 2, false
