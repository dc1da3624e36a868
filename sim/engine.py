"""The event loop: requests arrive, the router's own routing policy picks a replica, the prompt
is batched into a prefill pass, its KV cache crosses the prefill worker's link (disaggregated
mode), and the sequence decodes in a continuous batch until its last token.

Colocated mode ("mixed" workers) runs prompt passes and decodes on one worker: a prompt pass
holds the worker (its running decodes make one token in that step, as in a hybrid batch) and
the decodes resume after it, which is what costs colocated serving its time between tokens.
Disaggregated mode sends prompts to prefill workers and decodes to decode workers, choosing the
decode replica when the prompt pass ends, as the router hands a prompt over.

Routing takes what the router's does: the policy's prefix keys of a request's text (none for
the trace's requests, which have none) and the replicas' URLs (the prefix policies break ties
by a hash of the URL), so a fleet given the real replicas' URLs and requests with their text is
routed as the real router routes it at the same loads.
"""

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetwise.router.policies import PREFIX_KEYS, RoutingPolicy, make_policy
from fleetwise.router.replica import Replica

from .power import PowerLoop
from .trace import Request
from .workers import Flight, Link, Pool, Worker

PREFILL_DONE, DECODE, LINK, JOIN, TICK, PASS_START, RELEASE = range(7)
GOLDEN = 0.6180339887498949   # spreads low-priority requests evenly over the ids


@dataclass
class Settings:
    prompt_budget: int = 8192             # batched tokens per prompt pass (a colocated one's decodes count)
    chunked_prefill: bool = True          # a prompt over the budget goes in chunks over several passes
    max_batch: int = 64                   # running sequences per decode batch (and the KV cache must hold them)
    link_gbps_per_gpu: float = 400.0      # a prefill worker's link: this times its GPUs
    link_latency_s: float = 50e-6
    low_priority_share: float = 0.0       # of requests, served by the Low-priority pools where there are some


class Simulation:
    def __init__(self, pools: list[tuple[Pool, int]], settings: Settings, policy: str = "least_outstanding") -> None:
        """`policy`: a name for the router's own `make_policy`."""
        self.settings = settings
        self.workers: list[Worker] = []
        self.replicas: dict[tuple[str, str], list[Replica]] = {}   # by (role, priority)
        self.by_url: dict[str, Worker] = {}
        self.links: dict[Worker, Link] = {}
        for pool, count in pools:
            if pool.urls and len(pool.urls) != count:
                raise ValueError(f"pool {pool.name}: {len(pool.urls)} urls for {count} workers")
            for i in range(count):
                replica = Replica(pool.urls[i] if pool.urls else f"sim://{pool.name}/{i}", pool.perf.model, pool.role)
                w = Worker(pool, replica, settings.max_batch)
                self.workers.append(w)
                self.replicas.setdefault((pool.role, pool.priority), []).append(replica)
                self.by_url[replica.url] = w
                if pool.role == "prefill":
                    gbps = settings.link_gbps_per_gpu * pool.perf.tp
                    self.links[w] = Link(gbps * 1e9 / 8, settings.link_latency_s)
        roles = {role for role, _ in self.replicas}
        if roles not in ({"mixed"}, {"prefill", "decode"}):
            raise ValueError(f"a fleet is all mixed workers (colocated) or prefill and decode ones "
                             f"(disaggregated), not {sorted(roles)}")
        self.colocated = roles == {"mixed"}
        # one policy instance per role, as the router keeps one per model and role
        self.policies: dict[tuple[str, str], RoutingPolicy] = {key: make_policy(policy) for key in self.replicas}
        self.keyer = PREFIX_KEYS.get(policy)     # a request's prefix keys, for the policies that read them
        # a priority without pools of its own goes to the role's other pools
        self.route_key = {(role, p): (role, p) if (role, p) in self.replicas else
                          next(k for k in sorted(self.replicas) if k[0] == role)
                          for role in roles for p in ("High", "Low")}
        self.on_draw: Callable[[Worker], None] | None = None    # told when a worker's draw may have changed
        self.tickers: list[Callable[[float], float | None]] = []   # periodic: each returns its next time
        self.arrivals_left = 0
        self.ticks_queued = 0
        self.on_transfer: Callable[[Flight, float], None] | None = None   # told each KV transfer's seconds
        # when the router learns that a request made its last token at `t` (its stream's end has come
        # back to it); None: at once
        self.router_sees: Callable[[float], float] | None = None
        self.power: PowerLoop | None = None      # set by run.build when the power controller is in the loop
        # faults.FaultLoop, set by run.build when faults or the detector are in the loop (it imports this module)
        self.faults: Any = None
        self.events: list[tuple[float, int, int, object, int]] = []
        self.seq = 0
        self.now = 0.0
        self.events_done = 0
        self.finished: list[Flight] = []

    def push(self, t: float, kind: int, obj: object, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, obj, version))

    def run(self, requests: list[Request], progress: Callable[[float], None] | None = None) -> list[Flight]:
        """Serves every request to its last token; returns them as they finished."""
        requests = sorted(requests, key=lambda r: r.arrival)
        i, n, events = 0, len(requests), self.events
        handlers = {PREFILL_DONE: self.prefill_done, DECODE: self.decode_due, LINK: self.link_due,
                    JOIN: self.decode_arrives, TICK: self.tick, PASS_START: self.pass_starts,
                    RELEASE: self.release}
        self.arrivals_left = n
        for k in range(len(self.tickers)):
            self.push(0.0, TICK, k)
        self.ticks_queued = len(self.tickers)
        while i < n or events:
            if events and (i >= n or events[0][0] <= requests[i].arrival):
                t, _, kind, obj, version = heapq.heappop(events)
                self.now = t
                handlers[kind](obj, version)  # type: ignore[operator]  # each handler takes its own object
            else:
                self.now = requests[i].arrival
                self.arrive(requests[i])
                i += 1
                self.arrivals_left = n - i
            self.events_done += 1
            if progress is not None and self.events_done % 4096 == 0:
                progress(self.now)
        for w in self.workers:
            w.advance(self.now)
        return self.finished

    def tick(self, k: int, _version: int) -> None:
        t = self.tickers[k](self.now)
        self.ticks_queued -= 1
        if t is not None and (self.arrivals_left or len(self.events) > self.ticks_queued):   # else only ticks are left
            self.push(t, TICK, k)
            self.ticks_queued += 1

    def advance_all(self) -> None:
        for w in self.workers:
            w.advance(self.now)

    def settle(self, w: Worker) -> None:
        if self.on_draw is not None:
            self.on_draw(w)

    def route(self, role: str, priority: str = "High", req: Request | None = None) -> Worker:
        key = self.route_key[(role, priority)]
        keys = self.keyer(req.text) if req is not None and req.text and self.keyer is not None else None
        replica = self.policies[key].choose(self.replicas[key], keys)
        if replica is None:
            raise RuntimeError(f"no {role} replica is available")
        replica.outstanding += 1
        return self.by_url[replica.url]

    def arrive(self, req: Request) -> None:
        low = (req.id * GOLDEN) % 1.0 < self.settings.low_priority_share
        self.dispatch(Flight(req, dispatched=self.now, priority="Low" if low else "High"))

    def dispatch(self, f: Flight) -> None:
        w = self.route("mixed" if self.colocated else "prefill", f.priority, f.req)
        f.prefill = w
        w.queue.append(f)
        self.start_prompt(w)

    def start_prompt(self, w: Worker) -> None:
        if w.in_pass or w.pass_due or not w.queue:
            return
        w.advance(self.now)
        if w.batch:   # the engine takes new prompts between two steps: the running step ends first
            wait = w.time_for(math.ceil(w.g - 1e-6) - w.g)
            if wait > 1e-9:
                w.pass_due = True
                self.push(self.now + wait, PASS_START, w, w.passes)
                return
        # decodes first, then prompt tokens, in one token budget (as the worker's scheduler)
        budget = max(1, self.settings.prompt_budget - len(w.batch))
        tokens, attended = w.take_prompts(budget, self.settings.chunked_prefill)
        w.prompt_tokens += tokens
        seconds, watts = w.prompt_step(tokens, len(w.batch), attended)
        if w.pass_wall is not None:   # the pace may change while the pass runs
            seconds = w.pass_wall(self.now, seconds / w.slow)
        w.pass_watts = watts
        w.prompt_s += seconds
        w.prompt_j += seconds * watts
        for _, _, f in w.batch:   # the running decodes wait for this pass
            f.max_gap = max(f.max_gap, seconds)
        w.gaps.add(seconds, len(w.batch))
        w.in_pass = True
        w.version += 1   # a colocated batch waits for the pass
        w.passes += 1
        self.push(self.now + seconds, PREFILL_DONE, w, w.passes)
        self.settle(w)

    def pass_starts(self, w: Worker, version: int) -> None:
        """The decode step running when a prompt came has ended: its finished sequences leave,
        and the prompt pass begins."""
        if version != w.passes or not w.pass_due:   # the worker died meanwhile
            return
        w.pass_due = False
        w.advance(self.now)
        for f in w.reap():
            self.finish(f)
        self.admit_waiting(w)
        self.start_prompt(w)
        self.schedule_decode(w)   # nothing when the pass began: the batch waits for it
        self.settle(w)

    def prefill_done(self, w: Worker, version: int) -> None:
        if version != w.passes:   # the pass died with its worker; its prompts went elsewhere
            return
        passed, w.prefilling, w.in_pass = w.prefilling, [], False
        w.g_time = self.now
        if w.batch:
            w.g += 1      # the running decodes' token in the hybrid step
            w.tokens_made += len(w.batch)
            for f in w.reap():
                self.finish(f)
        for f in passed:
            f.first_token = self.now
            if f.req.output_tokens <= 1:
                self.finish(f)
            elif self.colocated:
                self.admit(w, f)
            else:
                w.replica.outstanding -= 1
                f.decode = self.route("decode", f.priority, f.req)
                self.send_kv(f)
        self.admit_waiting(w)
        self.start_prompt(w)
        self.schedule_decode(w)
        self.settle(w)

    def admit(self, w: Worker, f: Flight) -> None:
        f.decode = w
        if not w.waiting and w.can_admit(f):
            w.join(f, self.now)
        else:
            w.waiting.append(f)

    def admit_waiting(self, w: Worker) -> None:
        while w.waiting and w.can_admit(w.waiting[0]):
            w.join(w.waiting.popleft(), self.now)

    def schedule_decode(self, w: Worker) -> None:
        w.version += 1
        t = w.next_completion()
        if t is not None:
            self.push(t, DECODE, w, w.version)

    def decode_due(self, w: Worker, version: int) -> None:
        if version != w.version:
            return
        w.advance(self.now)
        w.g = max(w.g, w.batch[0][0])   # the event was set for this completion: no rounding left over
        for f in w.reap():
            self.finish(f)
        self.admit_waiting(w)
        self.schedule_decode(w)
        self.settle(w)

    def decode_arrives(self, f: Flight, _version: int) -> None:
        assert f.decode is not None
        if f.decode.dead:   # the decode worker died while the cache was on its way: another pulls it
            f.decode.replica.outstanding -= 1
            f.decode = self.route("decode", f.priority, f.req)
        self.admit(f.decode, f)
        if not f.decode.in_pass:
            self.schedule_decode(f.decode)
        self.settle(f.decode)

    def set_cap(self, w: Worker, cap: float | None) -> None:
        """A cap from now on: the decode batch changes pace (a running prompt pass keeps its own)."""
        w.advance(self.now)
        w.set_cap(cap)
        if not w.in_pass:
            self.schedule_decode(w)
        self.settle(w)

    def send_kv(self, f: Flight) -> None:
        assert f.prefill is not None
        link = self.links[f.prefill]
        link.advance(self.now)
        link.active[f] = float(f.req.prompt_tokens * f.prefill.pool.perf.kv_bytes_per_token)
        f.kv_start = self.now
        self.schedule_link(link)

    def schedule_link(self, link: Link) -> None:
        link.version += 1
        t = link.next_drain()
        if t is not None:
            self.push(t, LINK, link, link.version)

    def link_due(self, link: Link, version: int) -> None:
        if version != link.version:
            return
        link.advance(self.now)
        first = min(link.active, key=link.active.__getitem__)
        link.active[first] = 0.0   # the event was set for this one: no rounding left over
        for f in link.drained():
            self.push(self.now + link.latency_s, JOIN, f)
            if self.on_transfer is not None:
                self.on_transfer(f, self.now + link.latency_s - f.kv_start)
        self.schedule_link(link)

    def finish(self, f: Flight) -> None:
        f.done = self.now
        owner = f.decode or f.prefill
        assert owner is not None
        self.finished.append(f)
        if self.router_sees is None:
            owner.replica.outstanding -= 1
        else:
            self.push(max(self.now, self.router_sees(self.now)), RELEASE, owner)

    def release(self, w: Worker, _version: int) -> None:
        w.replica.outstanding -= 1
