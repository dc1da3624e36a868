"""Prefix-aware routing with bounded loads: a request goes to the replica whose prefix cache
saves it the most work for the requests that replica already holds, unless that replica holds
more than its share of the outstanding requests; then the best one within the bound takes it,
and from then on holds that prefix too.

Why both: routing by prefix alone (vllm-router's `cache_aware` within its default balance
thresholds) sends every request of a popular system prompt to one replica, which queues while
the others idle; balancing by load alone (`power_of_two`, `round_robin`) spreads each prefix
over every replica, so each recomputes it and their caches evict one another's prefixes. With
a bound (consistent hashing with bounded loads, Mirrokni et al. 2018) a hot prefix is
replicated on as many replicas as its load needs, and a cold one stays on one.

The router cannot see the workers' caches from the request path, so the policy keeps a model
of them: each replica's prefix blocks (chained hashes of the prompt's leading chunks, one
path of a prefix tree per prompt) in least-recently-used order, up to `replica_keys` per
replica, as the worker's cache evicts its oldest blocks first. Pure: no I/O, no clock.
"""

import zlib
from collections import OrderedDict

from .replica import Replica

CHUNK_CHARS = 128      # one prefix block: about 32 tokens of English text
MAX_CHUNKS = 64        # prefixes are told apart over their first 8 KiB characters


def prefix_blocks(text: str, step: int = CHUNK_CHARS, max_chunks: int = MAX_CHUNKS) -> list[int]:
    """Chained hashes of the text's leading chunks, shortest prefix first: two prompts share
    the first k when they share the first k * step characters. The first is stable across
    processes (CRC-32), so routers agree on where a new prefix goes; the rest use Python's
    string hash, several times cheaper than a cryptographic one on the request path."""
    if not text:
        return []
    h = zlib.crc32(text[:step].encode())
    keys = [h]
    for i in range(step, min(len(text), step * max_chunks), step):
        h = hash((h, text[i:i + step]))
        keys.append(h)
    return keys


def _rank(first: int, url: str) -> int:
    """Rendezvous score of a replica for a prefix never seen."""
    return zlib.crc32(url.encode(), first & 0xFFFFFFFF)


class PrefixLoad:
    """Among the replicas within the load bound, the one whose cached prefix saves the most
    work for its load: the most prefix blocks held less `request_chunks` blocks per request
    it already holds; ties to the less loaded. A prompt no replica holds goes to the least
    loaded one.

    Why a cost and not the longest prefix first: with continuous batching a request in flight
    costs a newcomer little (its decodes share the newcomer's steps; only what is left of its
    prompt delays it), while a prefix not cached costs a whole prompt pass, which also stalls
    every decode on that replica for its length. `request_chunks` prices a request in flight
    in prefix blocks (8 blocks: about 1 KiB of prompt, 170 tokens, one step's prompt work on
    a 70B model): a replica holding a system prompt of 64 blocks keeps it until it holds
    8 requests more than an idle one, and a match of a few blocks does not outweigh one
    request. Measured by `bench goodput` (bench/README.md).

    Bound: a replica may take the request when its outstanding requests, this one included,
    are at most `load_factor` times the mean (this one counted) plus `slack`; past it a hot
    prefix spreads to another replica, which then holds it too."""
    name = "prefix_load"

    def __init__(self, load_factor: float = 1.25, slack: float = 8.0, replica_keys: int = 1 << 16,
                 request_chunks: float = 8.0) -> None:
        if load_factor < 1 or slack < 0 or replica_keys < 1 or request_chunks < 0:
            raise ValueError("load_factor >= 1, slack >= 0, replica_keys >= 1 and request_chunks >= 0")
        self.load_factor, self.slack, self.replica_keys = load_factor, slack, replica_keys
        self.request_chunks = request_chunks
        self.holders: dict[int, dict[str, None]] = {}        # prefix block -> replicas holding it
        self.held: dict[str, OrderedDict[int, None]] = {}    # replica -> its blocks, oldest first
        self.hits = 0            # requests sent where some of their prefix was held
        self.overflows = 0       # requests a holder could not take within the bound

    def bound(self, live: list[Replica]) -> float:
        total = sum(r.outstanding for r in live) + 1
        return self.load_factor * total / len(live) + self.slack

    def matches(self, keys: list[int]) -> dict[str, int]:
        """Per replica, how many of the leading blocks it holds."""
        found: dict[str, int] = {}
        for depth, key in enumerate(keys, 1):
            holders = self.holders.get(key)
            if not holders:
                break
            for url in holders:
                if found.get(url, 0) == depth - 1:
                    found[url] = depth
        return found

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        live = [r for r in replicas if r.available]
        if not live:
            return None
        keys = keys or []
        if len(live) == 1:
            return self._only(live[0], keys)
        bound = self.bound(live)
        match = self.matches(keys) if keys else {}
        first = keys[0] if keys else 0
        best: Replica | None = None
        best_score = (0.0, 0)
        for r in live:
            out = r.outstanding
            if out + 1 > bound:
                continue
            score = (match.get(r.url, 0) - self.request_chunks * out, -out)
            # the rendezvous rank breaks ties only: computed for them alone
            if best is None or score > best_score or (score == best_score and
                                                      _rank(first, r.url) > _rank(first, best.url)):
                best, best_score = r, score
        if best is None:  # every replica past the bound (only with slack 0): the least loaded
            best = min(live, key=lambda r: (r.outstanding, -_rank(first, r.url)))
        most = max(match.values(), default=0)
        if match.get(best.url, 0):
            self.hits += 1
        if most and match.get(best.url, 0) < most:
            self.overflows += 1
        self._record(best.url, keys)
        return best

    def _only(self, best: Replica, keys: list[int]) -> Replica:
        """`choose` with one replica available: it takes the request whatever its load (the bound
        is at least its load with this request); what it holds is recorded, and counted as
        `choose` counts it, without scoring (a role with one replica, say one prefill worker)."""
        holders = self.holders.get(keys[0]) if keys else None
        if holders:  # it holds some of the prefix exactly when it holds the first block
            if best.url in holders:
                self.hits += 1
            if len(holders) > 1 or best.url not in holders:  # another replica holds some of it
                match = self.matches(keys)
                if match.get(best.url, 0) < max(match.values()):
                    self.overflows += 1
        self._record(best.url, keys)
        return best

    def _record(self, url: str, keys: list[int]) -> None:
        """`url` now holds these blocks, the most recently used of its blocks."""
        held = self.held.get(url)
        if held is None:  # not setdefault: that builds an OrderedDict on every request
            held = self.held[url] = OrderedDict()
        for key in reversed(keys):  # the leading blocks, shared the most, are evicted last
            if key in held:
                held.move_to_end(key)
            else:
                held[key] = None
                self.holders.setdefault(key, {})[url] = None
        while len(held) > self.replica_keys:
            old, _ = held.popitem(last=False)
            self._drop(old, url)

    def _drop(self, key: int, url: str) -> None:
        holders = self.holders.get(key)
        if holders is not None:
            holders.pop(url, None)
            if not holders:
                del self.holders[key]

    def forget(self, url: str) -> None:
        """A replica that is gone: its prefixes route afresh."""
        for key in self.held.pop(url, {}):
            self._drop(key, url)
