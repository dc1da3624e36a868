"""Which replica gets a request: round-robin, least outstanding requests, prefix affinity.

Pure decisions over the router's view of its replicas (no I/O, no event loop): the router
does the calling, and anything else that routes (a simulator) can plug these in as they are.
"""

import hashlib
from collections import OrderedDict
from typing import Protocol

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
    name = "least_outstanding"

    def __init__(self) -> None:
        self._rr = RoundRobin()

    def choose(self, replicas: list[Replica], keys: list[int] | None = None) -> Replica | None:
        live = [r for r in replicas if r.available]
        if not live:
            return None
        least = min(r.outstanding for r in live)
        return self._rr.choose([r for r in live if r.outstanding == least])

    def forget(self, url: str) -> None:
        pass


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
    RoundRobin.name: RoundRobin, LeastOutstanding.name: LeastOutstanding, PrefixAffinity.name: PrefixAffinity}


def make_policy(name: str) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()


def prompt_text(body: dict, kind: str) -> str:
    """The text whose prefix keys prefix affinity hashes: the chat's messages, or the
    (first) prompt."""
    if kind == "chat":
        parts = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                content = m.get("content")
                if isinstance(content, list):
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                parts.append(f"{m.get('role')}:{content}")
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return " ".join(map(str, prompt))
    return prompt if isinstance(prompt, str) else ""
