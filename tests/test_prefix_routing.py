"""Prefix-aware routing with bounded loads (router/prefix.py): a prefix stays where it is
cached until that replica holds more than its share, then it spreads; and through the router
over real workers, requests sharing a system prompt find it in the cache."""

import random
import zlib

import httpx
import pytest

from fleetwise.router.policies import PREFIX_KEYS, make_policy
from fleetwise.router.prefix import PrefixLoad, prefix_blocks
from fleetwise.router.replica import Replica
from fleetwise.worker.engine.config import EngineConfig

from .workers import start_router, start_worker, write_router_config


def replicas(n=4):
    return [Replica(f"http://w{i}", "m", "mixed") for i in range(n)]


SYSTEM = "you are a careful assistant who answers in full sentences. " * 40   # 19 prefix blocks


def test_prefix_blocks_share_exactly_the_common_prefix():
    a = prefix_blocks("x" * 300 + "tail one", step=128)
    b = prefix_blocks("x" * 300 + "other tail", step=128)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert prefix_blocks("") == []
    assert len(prefix_blocks("y" * 100_000, step=128, max_chunks=64)) == 64
    assert prefix_blocks("z" * 50)[0] == zlib.crc32(b"z" * 50)  # the same in every router process


def test_the_router_hashes_prompts_only_for_policies_that_read_them():
    assert PREFIX_KEYS["prefix_load"] is prefix_blocks
    assert "round_robin" not in PREFIX_KEYS and "least_outstanding" not in PREFIX_KEYS
    assert isinstance(make_policy("prefix_load"), PrefixLoad)


def test_a_prefix_stays_on_one_replica_while_within_the_bound():
    rs, p = replicas(), PrefixLoad()
    home = p.choose(rs, prefix_blocks(SYSTEM + "question 0"))
    for i in range(1, 30):
        r = p.choose(rs, prefix_blocks(SYSTEM + f"question {i}"))
        assert r is home
        r.outstanding = i % 2   # busy, but within 1.25 x mean + 2
    assert p.hits == 29 and p.overflows == 0


def test_a_long_cached_prefix_outweighs_a_few_requests_in_flight_and_a_short_one_does_not():
    rs, p = replicas(2), PrefixLoad(request_chunks=8, slack=100)
    keys = prefix_blocks(SYSTEM + "q")                  # 19 blocks: worth two requests in flight, not three
    home = p.choose(rs, keys)
    other = next(r for r in rs if r is not home)
    home.outstanding = 2
    assert p.choose(rs, prefix_blocks(SYSTEM + "q2")) is home
    home.outstanding = 3
    assert p.choose(rs, prefix_blocks(SYSTEM + "q3")) is other
    short = prefix_blocks("a short shared start. " * 7 + "x")   # its first block shared
    p.choose([home], short)
    home.outstanding, other.outstanding = 1, 0
    assert p.matches(prefix_blocks("a short shared start. " * 7 + "y")) == {home.url: 1}
    assert p.choose(rs, prefix_blocks("a short shared start. " * 7 + "y")) is other


def test_one_available_replica_takes_every_request_and_is_counted_as_with_several():
    """A role with one replica left (say one prefill worker, its peer down) skips the scoring:
    the choice, the blocks recorded and the hit and overflow counts are what scoring gives."""
    rs, p = replicas(2), PrefixLoad(slack=0)
    keys = prefix_blocks(SYSTEM + "q")
    home = p.choose(rs, keys)
    other = next(r for r in rs if r is not home)
    home.healthy, other.outstanding = False, 50   # busy, but alone: it takes it
    assert p.choose(rs, prefix_blocks(SYSTEM + "q2")) is other
    assert (p.hits, p.overflows) == (0, 1)        # the prefix was held, by the replica that is down
    assert set(p.matches(keys)) == {home.url, other.url}
    assert p.choose(rs, prefix_blocks(SYSTEM + "q3")) is other
    assert (p.hits, p.overflows) == (1, 1)        # `other` holds it now, as long a prefix as `home`
    assert p.choose([other], []) is other and (p.hits, p.overflows) == (1, 1)


def test_new_prefixes_spread_over_the_replicas():
    rs, p, rng = replicas(), PrefixLoad(), random.Random(0)
    picks = [p.choose(rs, prefix_blocks(f"{rng.random()} a prompt of its own " * 5)).url for _ in range(400)]
    counts = [picks.count(r.url) for r in rs]
    assert min(counts) > 60, counts


def test_the_choice_is_the_best_score_within_the_bound_ties_to_the_rendezvous_rank():
    """The rule as a plain scan over (prefix saved less load, less loaded, rank) against the
    policy on random loads and shared prefixes: the policy skips ranks it does not need."""
    rng, p, rs = random.Random(3), PrefixLoad(slack=2), replicas(5)
    prompts = [f"system prompt {k} " * (8 * k + 1) for k in range(6)]
    for i in range(600):
        for r in rs:
            r.outstanding = rng.choice((0, 0, 1, 2, 5))
        keys = prefix_blocks(rng.choice(prompts) + f"question {i}")
        bound, match = p.bound(rs), p.matches(keys)
        within = [r for r in rs if r.outstanding + 1 <= bound]
        want = max(within, key=lambda r: (match.get(r.url, 0) - p.request_chunks * r.outstanding,
                                          -r.outstanding, zlib.crc32(r.url.encode(), keys[0])))
        assert p.choose(rs, keys) is want, i


def test_a_hot_prefix_overflows_and_then_lives_on_both_replicas():
    rs, p = replicas(4), PrefixLoad(load_factor=1.25, slack=1)
    keys = prefix_blocks(SYSTEM + "q")
    home = p.choose(rs, keys)
    home.outstanding = 4          # (4 + 1) * 1.25 / 4 + 1 = 2.6: past the bound
    second = p.choose(rs, keys)
    assert second is not home and p.overflows == 1
    assert set(p.matches(keys)) == {home.url, second.url}
    home.outstanding, second.outstanding = 1, 0   # the idle holder, not an idle replica without the prefix
    assert p.choose(rs, prefix_blocks(SYSTEM + "another question")) is second
    home.outstanding, second.outstanding = 0, 1
    assert p.choose(rs, prefix_blocks(SYSTEM + "a third question")) is home


def test_the_longest_cached_prefix_wins_over_a_shorter_one():
    rs, p = replicas(3), PrefixLoad()
    short, long = SYSTEM[:256], SYSTEM + "and a long shared context " * 10
    a = p.choose(rs, prefix_blocks(short + "first"))
    rs_without_a = [r for r in rs if r is not a]
    b = p.choose(rs_without_a, prefix_blocks(long + "first"))   # b holds the long prefix, a the short one
    assert p.choose(rs, prefix_blocks(long + "second")) is b
    assert p.choose(rs, prefix_blocks(short + "second")) in (a, b)


def test_the_cache_model_evicts_a_replicas_oldest_prefixes():
    rs, p = replicas(1), PrefixLoad(replica_keys=20)
    old = prefix_blocks("old system prompt " * 40)          # 6 blocks
    p.choose(rs, old)
    assert p.matches(old) == {rs[0].url: len(old)}
    for i in range(4):
        p.choose(rs, prefix_blocks(f"newer system prompt {i} " * 40))
    assert p.matches(old) == {}
    assert sum(len(h) for h in p.held.values()) <= 20


def test_replicas_down_or_gone_are_never_chosen():
    rs, p = replicas(3), PrefixLoad()
    keys = prefix_blocks(SYSTEM)
    home = p.choose(rs, keys)
    home.healthy = False
    assert p.choose(rs, keys) is not home
    p.forget(home.url)
    assert home.url not in p.matches(keys) and home.url not in p.held
    for r in rs:
        r.routable = False
    assert p.choose(rs, keys) is None
    with pytest.raises(ValueError):
        PrefixLoad(load_factor=0.5)


def test_through_the_router_a_system_prompt_is_found_in_the_cache(tiny_model_dir, tmp_path):
    """Three real workers: every request after the first of each system prompt finds the
    prompt's blocks in the cache of the worker it is sent to (round robin would send the
    second and third to workers that never saw it)."""
    cfg = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", block_size=8, num_blocks=512)
    workers = [start_worker(cfg, "mixed") for _ in range(3)]
    write_router_config(tmp_path / "r.yaml", "tiny", mixed=[w.internal_url for w in workers])
    router = start_router(tmp_path / "r.yaml", policy="prefix_load")
    try:
        for system in ("alpha beta gamma delta " * 30, "one two three four five " * 30):
            cached = []
            for i in range(5):
                r = httpx.post(router.url + "/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": system + f"question number {i}", "max_tokens": 2})
                assert r.status_code == 200, r.text
                cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
            assert cached[0] == 0 and min(cached[1:]) > 100, cached
    finally:
        router.stop()
        for w in workers:
            w.stop()
