"""Which replica gets a request: round-robin, least outstanding requests, prefix affinity,
prefix blocks within a load bound (prefix.py).

Pure decisions over the router's view of its replicas (no I/O, no event loop): the router
does the calling, and anything else that routes (a simulator) can plug these in as they are.
"""

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from .prefix import PrefixLoad, prefix_blocks
from .replica import Replica


class RoutingPolicy(Protocol):
    """One policy instance routes among the replicas of one model and role."""
    name: str

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        """An available replica for a request whose prompt has these prefix keys, or None
        when none is available."""
        ...

    def forget(self, url: str) -> None:
        """The replica at `url` is gone: drop whatever the policy remembers of it."""
        ...


def prefix_keys(text: str, step: int = 64, max_chunks: int = 32) -> list[int]:
    """Keys of the text's leading chunks, shortest first: two prompts share the first k keys
    when they share the first k * step characters."""
    h = hashlib.blake2b(digest_size=8)
    keys = []
    for i in range(0, min(len(text), step * max_chunks), step):
        h.update(text[i:i + step].encode())
        keys.append(int.from_bytes(h.copy().digest(), "little"))
    return keys


def _score(key: int, url: str) -> bytes:
    return hashlib.blake2b(f"{key}:{url}".encode(), digest_size=8).digest()


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        live = [r for r in replicas if r.available]
        if not live:
            return None
        self._next += 1
        return live[self._next % len(live)]

    def forget(self, url: str) -> None:
        pass


class LeastOutstanding:
    """The available replica with the fewest outstanding requests; ties in turn (round robin
    over the tied replicas in list order).

    A scan is O(replicas) per request. A caller that passes the same list object again and
    again (a simulator of thousands of replicas) gets an index instead, from the second call
    on: the list's available replicas in buckets by outstanding count, kept current by
    watching each replica, so a choice is O(1) and a change O(bucket). The decisions are the
    scan's. Such a caller passes a new list when the membership changes (one of another length
    is noticed, an element replaced in place is not); the router builds a new list per request
    and so always scans."""
    name = "least_outstanding"
    INDEX_FROM = 32   # replicas; below this a scan is as quick

    def __init__(self) -> None:
        self._rr = RoundRobin()
        self._last: list[Replica] | None = None
        self._index: _LoadIndex | None = None

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        index = self._index
        if index is None or index.replicas is not replicas or index.size != len(replicas):
            index = self._reindex(replicas)
        if index is not None:
            tied = index.least()
            if not tied:
                return None
            self._rr._next += 1
            return replicas[tied[self._rr._next % len(tied)]]
        live = [r for r in replicas if r.available]
        if not live:
            return None
        least = min(r.outstanding for r in live)
        return self._rr.choose([r for r in live if r.outstanding == least])

    def _reindex(self, replicas: list[Replica]) -> "_LoadIndex | None":
        if self._index is not None:
            self._index.close()
            self._index = None
        again, self._last = self._last is replicas, replicas
        if again and len(replicas) >= self.INDEX_FROM and len({id(r) for r in replicas}) == len(replicas):
            self._index = _LoadIndex(replicas)
        return self._index

    def forget(self, url: str) -> None:
        pass


class _LoadIndex:
    """Positions of a list's available replicas, in ascending order, by outstanding count."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas, self.size = replicas, len(replicas)
        self.position = {id(r): i for i, r in enumerate(replicas)}
        self.level: list[int | None] = [None] * len(replicas)
        self.buckets: dict[int, list[int]] = {}
        self.lowest: int | None = None
        for i, r in enumerate(replicas):
            self._place(i, r)
            r.watch(self.changed)

    def least(self) -> list[int]:
        return self.buckets[self.lowest] if self.lowest is not None else []

    def changed(self, r: Replica) -> None:
        i = self.position[id(r)]
        old = self.level[i]
        if old is not None:
            bucket = self.buckets[old]
            del bucket[bisect.bisect_left(bucket, i)]
            if not bucket:
                del self.buckets[old]
                if old == self.lowest:
                    self.lowest = min(self.buckets) if self.buckets else None
        self._place(i, r)

    def _place(self, i: int, r: Replica) -> None:
        if not r.available:
            self.level[i] = None
            return
        level = self.level[i] = r.outstanding
        bisect.insort(self.buckets.setdefault(level, []), i)
        if self.lowest is None or level < self.lowest:
            self.lowest = level

    def close(self) -> None:
        for r in self.replicas:
            r.unwatch(self.changed)


class PrefixAffinity:
    """Requests sharing a prompt prefix go to the replica that served that prefix last (its
    prefix cache holds it), unless that replica is loaded beyond `load_factor` times the mean
    plus `slack`; then the least loaded one takes it. A prefix never seen goes to its
    rendezvous-hash choice among the replicas within the bound, so routers agree without
    talking to each other."""
    name = "prefix_affinity"

    def __init__(self, load_factor: float = 1.25, slack: int = 2, max_entries: int = 200_000) -> None:
        self.load_factor, self.slack, self.max_entries = load_factor, slack, max_entries
        self.table: OrderedDict[int, str] = OrderedDict()
        self.hits = 0

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        live = [r for r in replicas if r.available]
        if not live:
            return None
        mean = sum(r.outstanding for r in live) / len(live)
        bound = self.load_factor * mean + self.slack
        within = [r for r in live if r.outstanding <= bound]
        by_url = {r.url: r for r in within}
        chosen = None
        for key in reversed(keys or []):
            url = self.table.get(key)
            if url in by_url:
                chosen = by_url[url]
                self.hits += 1
                break
        if chosen is None and keys:
            first = keys[0]
            chosen = max(within, key=lambda r: _score(first, r.url))
        if chosen is None:
            least = min(r.outstanding for r in within)
            chosen = next(r for r in within if r.outstanding == least)
        for key in keys or []:
            self.table[key] = chosen.url
            self.table.move_to_end(key)
        while len(self.table) > self.max_entries:
            self.table.popitem(last=False)
        return chosen

    def forget(self, url: str) -> None:
        """A replica that is gone: its prefixes route afresh."""
        for key in [k for k, u in self.table.items() if u == url]:
            del self.table[key]


POLICIES: dict[str, type[RoutingPolicy]] = {
    RoundRobin.name: RoundRobin, LeastOutstanding.name: LeastOutstanding, PrefixAffinity.name: PrefixAffinity,
    PrefixLoad.name: PrefixLoad}

# the prompt's prefix keys, for the policies that read them (hashing costs on every request)
PREFIX_KEYS: dict[str, Callable[[str], list[int]]] = {
    PrefixAffinity.name: prefix_keys, PrefixLoad.name: prefix_blocks}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


def prompt_text(body: dict, kind: str) -> str:
    """The text whose prefix keys prefix affinity hashes: the chat's messages, or the
    (first) prompt. The body is not validated yet (the worker does that): whatever it
    holds, this never raises."""
    if kind == "chat":
        parts = []
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else []:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(t for p in content if isinstance(p, dict) and isinstance(t := p.get("text"), str))
                parts.append(f"{m.get('role')}:{content}")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""
