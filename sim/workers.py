"""The simulated fleet's state: one worker's prompt queue and decode batch, one KV link.

A decode batch is modelled analytically between membership changes: every running sequence
advances by the same number of tokens, so the worker keeps one progress counter `g` (tokens
each running sequence has made since the worker started) and each sequence finishes when `g`
reaches its `finish_at`. The cache a step reads grows by the batch size every step, so the
time of n steps from context C0 is n * (a + beta * C0) + beta * B * n * (n - 1) / 2 (a and
beta from the performance model; B the batch): `steps_in` solves it for n, `time_for`
evaluates it. Events are only arrivals, phase changes and completions.
"""

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetwise import gpus
from fleetwise.router.replica import Replica

from .gaps import GapHistogram
from .perf import PerfModel
from .trace import Request


@dataclass(eq=False, slots=True)
class Flight:
    """One request on its way through the fleet."""
    req: Request
    dispatched: float = 0.0
    first_token: float = math.nan
    done: float = math.nan
    prefill: "Worker | None" = None
    decode: "Worker | None" = None
    ctx0: int = 0             # cached tokens when it joined the decode batch
    joined_g: float = 0.0
    finish_at: float = 0.0    # the batch's progress counter when it is done
    max_gap: float = 0.0      # the longest wait between two of its tokens seen so far
    prefilled: int = 0        # prompt tokens through a prompt pass (chunked prefill)
    priority: str = "High"    # High | Low: which pools serve it, which the power controller caps first
    kv_start: float = 0.0     # its KV transfer began
    kv_link_s: float = 0.0    # its KV transfer's link time: each stretch of time over the streams sharing it
    retries: int = 0          # times a dead worker sent it back to the router


@dataclass(eq=False)
class Pool:
    """Workers alike: one role, product, model and tensor-parallel degree."""
    name: str
    role: str                         # prefill | decode | mixed
    gpu: gpus.GPUProduct
    perf: PerfModel
    cap_watts: float | None = None    # per GPU; None: uncapped
    priority: str = "High"            # High | Low (the ModelDeployment's, for the power controller)
    urls: tuple[str, ...] = ()        # the replicas' URLs, one per worker (the router's tie-break ranks
                                      # them); () for sim://NAME/I
    _steps: dict[tuple[int, bool, float | None], tuple[float, float]] = field(default_factory=dict, repr=False)
    _token_steps: dict[tuple[float, int], list[float]] = field(default_factory=dict, repr=False)

    def prompt_step(self, tokens: int, decodes: int, cap: float | None) -> tuple[float, float]:
        """(seconds, watts for the worker) of a prompt pass over `tokens` batched tokens under
        a per-GPU cap (remembered: passes repeat the same sizes, and this is on the hot path)."""
        key = (tokens, decodes > 0, cap)
        step = self._steps.get(key)
        if step is None:
            demand = gpus.step_demand_watts(self.gpu, tokens, decodes)
            slow = gpus.stretch("prompt", demand, cap)
            step = self._steps[key] = (self.perf.prompt_ms(tokens) * slow / 1e3,
                                       gpus.drawn_watts(demand, cap) * self.perf.tp)
        return step

    def token_stretch_and_watts(self, cap: float | None) -> tuple[float, float]:
        demand = gpus.step_demand_watts(self.gpu, 0, 1)
        return gpus.stretch("token", demand, cap), gpus.drawn_watts(demand, cap) * self.perf.tp


@dataclass(eq=False)
class Worker:
    pool: Pool
    replica: Replica
    max_batch: int
    node: str = ""
    queue: deque[Flight] = field(default_factory=deque)     # prompts waiting
    prefilling: list[Flight] = field(default_factory=list)  # prompts the running pass completes
    in_pass: bool = False     # a prompt pass holds the worker
    pass_due: bool = False    # a prompt pass begins when the running decode step ends
    waiting: deque[Flight] = field(default_factory=deque)   # decodes waiting for a batch slot
    batch: list[tuple[float, int, Flight]] = field(default_factory=list)  # heap by finish_at
    g: float = 0.0
    g_time: float = 0.0
    ctx_sum: float = 0.0      # sum of (ctx0 - joined_g) over the batch: context = ctx_sum + B * g
    version: int = 0          # bumps when the next completion moves; stale events are skipped
    reserved: int = 0         # KV tokens the batch's sequences hold when they finish
    prompt_s: float = 0.0
    token_s: float = 0.0
    prompt_j: float = 0.0
    token_j: float = 0.0
    prompt_tokens: int = 0    # computed in prompt passes
    tokens_made: float = 0.0  # by decode steps
    dead: bool = False
    passes: int = 0           # prompt passes started: the one a PREFILL_DONE event ends

    def __post_init__(self) -> None:
        self.kv_capacity = self.pool.perf.kv_capacity_tokens
        self.idle_watts = self.pool.gpu.idle_watts * self.pool.perf.tp
        self.pass_watts = 0.0     # the running prompt pass's draw
        self.slow = 1.0           # fault injection: every step takes this many times as long
        # a changing pace (sim/pace.py): (start, seconds of work at pace 1) -> a prompt pass's wall seconds
        self.pass_wall: Callable[[float, float], float] | None = None
        self.gaps = GapHistogram()   # every token gap its decodes saw
        self.set_cap(self.pool.cap_watts)

    def set_cap(self, cap: float | None) -> None:
        """A new per-GPU cap (None: none) for the steps from now on; the decode batch must be
        advanced to now first, since its pace changes."""
        self.cap_watts = cap
        token_slow, self.token_watts = self.pool.token_stretch_and_watts(cap)
        self.token_slow = token_slow * self.slow
        perf = self.pool.perf
        # seconds per step before the cache read, by batch size (a lookup on the hot path; shared
        # by the pool's workers at one pace, never changed in place)
        key = (self.token_slow, self.max_batch)
        if key not in self.pool._token_steps:
            self.pool._token_steps[key] = [perf.token_base_ms(b) * self.token_slow / 1e3
                                           for b in range(self.max_batch + 1)]
        self.step_s = self.pool._token_steps[key]
        self.kv_s = perf.kv_ms_per_token * self.token_slow / 1e3

    def prompt_step(self, tokens: int, decodes: int, attended: float = 0.0) -> tuple[float, float]:
        seconds, watts = self.pool.prompt_step(tokens, decodes, self.cap_watts)
        perf = self.pool.perf
        extra = (perf.hybrid_ms(decodes, self.ctx_sum + len(self.batch) * self.g) * self.token_slow
                 + perf.attention_ms(attended) * self.slow) / 1e3
        return seconds * self.slow + extra, watts

    @property
    def draw(self) -> float:
        """Watts the worker draws now."""
        if self.dead:
            return 0.0
        return self.pass_watts if self.in_pass else self.token_watts if self.batch else self.idle_watts

    @property
    def gpus(self) -> int:
        return self.pool.perf.tp

    def _pq(self) -> tuple[float, float]:
        """The step-time sum's coefficients: n steps take n * p + q * n ** 2 seconds."""
        b = len(self.batch)
        q = self.kv_s * b / 2
        return self.step_s[b] + self.kv_s * (self.ctx_sum + b * self.g) - q, q

    def steps_in(self, seconds: float) -> float:
        p, q = self._pq()
        return 2 * seconds / (p + math.sqrt(p * p + 4 * q * seconds))

    def time_for(self, steps: float) -> float:
        p, q = self._pq()
        return steps * p + q * steps * steps

    def advance(self, now: float) -> None:
        """Runs the decode batch up to `now` (not while a prompt pass holds the worker)."""
        dt = now - self.g_time
        if self.batch and not self.in_pass and dt > 0:
            steps = self.steps_in(dt)
            self.g += steps
            self.gaps.add(dt / steps, steps * len(self.batch))
            self.tokens_made += steps * len(self.batch)
            self.token_s += dt
            self.token_j += dt * self.token_watts
        self.g_time = now

    def can_admit(self, f: Flight) -> bool:
        """A slot in the batch and room for the sequence's whole KV cache (reserved up front:
        no preemption); an empty batch takes any sequence."""
        need = f.req.prompt_tokens + f.req.output_tokens
        return not self.batch or (len(self.batch) < self.max_batch and self.reserved + need <= self.kv_capacity)

    def join(self, f: Flight, now: float) -> None:
        self.advance(now)
        f.decode, f.ctx0, f.joined_g = self, f.req.prompt_tokens + 1, self.g
        f.finish_at = self.g + f.req.output_tokens - 1
        self.ctx_sum += f.ctx0 - self.g
        self.reserved += f.req.prompt_tokens + f.req.output_tokens
        heapq.heappush(self.batch, (f.finish_at, f.req.id, f))
        # its second token comes one step after it joins: the handoff and any wait are in that gap
        step = self.step_s[len(self.batch)] + self.kv_s * (self.ctx_sum + len(self.batch) * self.g)
        f.max_gap = max(f.max_gap, now - f.first_token + step)
        if now > f.first_token:   # a handoff or a full batch held its second token (its step is counted by advance)
            self.gaps.add(now - f.first_token + step)

    def reap(self) -> list[Flight]:
        """Removes and returns the sequences that are done at the current progress."""
        out = []
        while self.batch and self.batch[0][0] <= self.g + 1e-6:
            f = heapq.heappop(self.batch)[2]
            self.ctx_sum -= f.ctx0 - f.joined_g
            self.reserved -= f.req.prompt_tokens + f.req.output_tokens
            out.append(f)
        if not self.batch:
            self.ctx_sum = 0.0   # no drift carried into the next batch
        return out

    def next_completion(self) -> float | None:
        if not self.batch or self.in_pass:
            return None
        return self.g_time + self.time_for(max(0.0, self.batch[0][0] - self.g))

    def take_prompts(self, budget: int, chunked: bool) -> tuple[int, float]:
        """Fills the next prompt pass from the queue, first come first served, up to `budget`
        tokens; returns its batched tokens. A prompt that would overflow the budget gives the
        pass a chunk and stays at the head of the queue (chunked), or waits for the next pass
        (a pass always holds at least one whole prompt when not chunked). Only prompts whose
        last token is in the pass move to `prefilling`. Also returns the pass's attention work:
        each chunk's tokens times the position its last token reaches."""
        tokens, attended = 0, 0.0
        while self.queue:
            f = self.queue[0]
            left = f.req.prompt_tokens - f.prefilled
            if tokens + left <= budget or (not chunked and tokens == 0):
                self.queue.popleft()
                self.prefilling.append(f)
                attended += left * (f.prefilled + left)
                f.prefilled += left
                tokens += left
            else:
                if chunked and budget > tokens:
                    n = budget - tokens
                    attended += n * (f.prefilled + n)
                    f.prefilled += n
                    tokens = budget
                break
        return tokens, attended


@dataclass(eq=False)
class Link:
    """A prefill worker's network link: transfers share its bandwidth equally."""
    bytes_per_s: float
    latency_s: float
    slow: float = 1.0         # fault injection: the link carries 1 / slow of its bandwidth
    active: dict[Flight, float] = field(default_factory=dict)   # bytes left
    t: float = 0.0
    version: int = 0

    def advance(self, now: float) -> None:
        if self.active and now > self.t:
            share = (now - self.t) / len(self.active)
            sent = share * self.bytes_per_s / self.slow
            for f in self.active:
                self.active[f] -= sent
                f.kv_link_s += share
        self.t = now

    def drained(self) -> list[Flight]:
        done = [f for f, left in self.active.items() if left <= 1.0]
        for f in done:
            del self.active[f]
        return done

    def next_drain(self) -> float | None:
        if not self.active:
            return None
        return self.t + max(0.0, min(self.active.values())) * len(self.active) * self.slow / self.bytes_per_s
