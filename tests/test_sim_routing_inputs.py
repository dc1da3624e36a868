"""The simulated router is given what the real one reads: each request's prompt text (the prefix
policies' keys) and the replicas' URLs (their tie-break hashes them), so the router's own policy
module makes the real router's choices at the same loads; and the agreement bench can replay the
routes a real run took."""

import pytest

from fleetwise import gpus
from fleetwise.bench.agree.routes import Routing, policy_at_real_loads, real_routes
from fleetwise.router.policies import PREFIX_KEYS, make_policy
from fleetwise.router.replica import Replica
from fleetwise.sim.calibration import StepProfile
from fleetwise.sim.engine import Settings, Simulation
from fleetwise.sim.trace import Request
from fleetwise.sim.workers import Pool

PROFILE = StepProfile("tiny", overhead_ms=10.0, ms_per_prompt_token=0.0, ms_per_decode=0.0, ms_per_context_token=0.0,
                      kv_capacity_tokens=100_000, kv_bytes_per_token=64)
URLS = ("http://127.0.0.1:43627", "http://127.0.0.1:56259")
TEXTS = [" ".join(str(7 * i + k) for k in range(60)) for i in range(40)]


def simulation(urls: tuple[str, ...], policy: str = "prefix_load") -> Simulation:
    pool = Pool("m", "mixed", gpus.product("H100"), PROFILE.perf_model(), urls=urls)
    return Simulation([(pool, len(urls))], Settings(prompt_budget=4096, max_batch=8), policy)


def served_by(flights) -> dict[int, str]:
    return {f.req.id: f.prefill.replica.url for f in flights}


def routed(urls: tuple[str, ...]) -> list[int]:
    """Which worker each request went to, in the simulator and by the router's policy alone."""
    # one at a time (each done before the next): both workers idle, so only the tie-break decides
    requests = [Request(i, float(i), 5, 2, text) for i, text in enumerate(TEXTS)]
    got = served_by(simulation(urls).run(requests))
    policy, replicas = make_policy("prefix_load"), [Replica(u, "tiny", "mixed") for u in urls]
    assert got == {i: policy.choose(replicas, PREFIX_KEYS["prefix_load"](t)).url for i, t in enumerate(TEXTS)}
    return [urls.index(got[i]) for i in range(len(TEXTS))]


def test_requests_with_text_go_where_the_routers_policy_sends_them_at_those_urls():
    first = routed(URLS)
    assert 5 < sum(first) < 35   # the text decides, not the order
    assert routed(("http://127.0.0.1:1", "http://127.0.0.1:2")) != first   # other URLs rank them otherwise


def test_without_text_the_prefix_policy_routes_by_load_alone():
    requests = [Request(i, 0.0, 5, 50) for i in range(4)]
    got = served_by(simulation(URLS).run(requests))
    assert sorted(got.values()) == sorted(URLS * 2)


def test_the_urls_must_match_the_workers():
    pool = Pool("m", "mixed", gpus.product("H100"), PROFILE.perf_model(), urls=URLS)
    with pytest.raises(ValueError, match="2 urls for 3 workers"):
        Simulation([(pool, 3)], Settings())


def test_the_real_routes_come_from_the_step_trace_and_replay_exactly(tmp_path):
    from fleetwise.bench.agree.compare import sim_side
    steps = {"mixed-0": [{"t": 1.0, "s": 0.1, "first": [["agree-0-ab", 1.0], ["agree-1-cd", 1.0]]}],
             "mixed-1": [{"t": 1.0, "s": 0.1, "first": [["agree-2-ef", 1.0], ["other", 1.0]]}]}
    routes = real_routes(steps)
    assert routes == {0: "mixed-0", 1: "mixed-0", 2: "mixed-1"}
    # the replay sends each request where the trace says, whatever the policy would do
    requests = [Request(i, 0.1 * i, 5, 50, TEXTS[i]) for i in range(3)]   # each runs 0.5 s
    profile = PROFILE.save(tmp_path / "p.json")
    urls = dict(zip(("mixed-0", "mixed-1"), URLS))
    sim, flights, _ = sim_side(requests, [profile], 2, routing=Routing(urls, routes, replay=True))
    assert served_by(flights) == {i: urls[routes[i]] for i in range(3)}
    assert sim["routed_as_real"] == {"same_worker": 3, "of": 3}
    # the policy itself: the second to the idle worker, so the first two cannot share one
    sim, _, _ = sim_side(requests, [profile], 2, routing=Routing(urls, routes))
    assert sim["routed_as_real"]["same_worker"] < 3


def test_the_routers_policy_at_the_real_loads_explains_routes_it_made_and_not_others():
    from fleetwise.bench.agree.fleet import Measured
    urls = dict(zip(("mixed-0", "mixed-1"), URLS))
    # each request done before the next is sent: the tie-break alone chooses
    requests = [Request(i, float(i), 5, 2, text) for i, text in enumerate(TEXTS)]
    measured = [Measured(float(i), 5, 2, [i + 0.1, i + 0.2]) for i in range(len(TEXTS))]
    name = {u: n for n, u in urls.items()}
    routes = {i: name[u] for i, u in served_by(simulation(URLS).run(requests)).items()}
    assert policy_at_real_loads(requests, measured, routes, urls) == len(TEXTS)
    swapped = {i: "mixed-1" if w == "mixed-0" else "mixed-0" for i, w in routes.items()}
    assert policy_at_real_loads(requests, measured, swapped, urls) == 0


def test_the_router_counts_a_request_finished_when_its_end_comes_back_to_it():
    policy, idle = make_policy("prefix_load"), [Replica(u, "tiny", "mixed") for u in URLS]
    tie = [policy.choose(idle, PREFIX_KEYS["prefix_load"](t)).url for t in TEXTS]
    k = next(k for k in range(1, len(TEXTS)) if tie[k] == tie[0])   # both idle: it goes where the first went
    # the first decodes 0.5 s; the second comes 0.01 s after the first made its last token
    requests = [Request(0, 0.0, 5, 50, TEXTS[0]), Request(1, 0.52, 5, 2, TEXTS[k])]
    at_once = served_by(simulation(URLS).run(requests))
    assert at_once[1] == at_once[0] == tie[0]
    sim = simulation(URLS)
    sim.router_sees = lambda t: t + 0.05   # its stream's end reaches the router 50 ms after the token
    later = served_by(sim.run(requests))
    assert later[1] != later[0]            # still outstanding when the second is routed
    assert all(r.outstanding == 0 for rs in sim.replicas.values() for r in rs)
