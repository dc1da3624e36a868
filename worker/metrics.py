"""The worker's Prometheus metrics (names from fleetwise.telemetry.catalog)."""

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from fleetwise.telemetry import catalog as c

disable_created_metrics()  # the *_created series double the page and no dashboard reads them

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
DEVICE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class WorkerMetrics:
    def __init__(self, model_name: str, role: str = "mixed", registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        m = ["model_name"]
        mr = ["model_name", "role"]
        self.running = Gauge(c.NUM_REQUESTS_RUNNING, "Requests in the running batch.", m, registry=r)
        self.waiting = Gauge(c.NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.", m, registry=r)
        self.kv_usage = Gauge(c.KV_CACHE_USAGE, "Share of KV cache blocks in use (0 to 1).", m, registry=r)
        self.ttft = Histogram(c.TIME_TO_FIRST_TOKEN, "Time to first token.", m, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(c.INTER_TOKEN_LATENCY, "Time between output tokens.", m, buckets=LATENCY_BUCKETS,
                             registry=r)
        self.e2e = Histogram(c.E2E_REQUEST_LATENCY, "Request latency, arrival to last token.", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(c.PROMPT_TOKENS, "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter(c.GENERATION_TOKENS, "Tokens generated.", m, registry=r)
        self.preemptions = Counter(c.NUM_PREEMPTIONS, "Sequences preempted (recomputed later).", m, registry=r)
        self.prefix_queries = Counter(c.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.", m,
                                      registry=r)
        self.prefix_hits = Counter(c.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.", m, registry=r)
        self.success = Counter(c.REQUEST_SUCCESS, "Finished sequences by reason.", m + ["finished_reason"], registry=r)
        self.step_seconds = Histogram(c.STEP_SECONDS, "Engine step time, scheduling to outputs.", mr,
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.forward_seconds = Histogram(c.STEP_FORWARD_SECONDS, "Model forward and sampling time per step.", mr,
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.device_seconds = Histogram(c.STEP_DEVICE_SECONDS, "Device busy time of the forward pass per step: GPU "
                                        "time on CUDA, the engine thread's CPU time on the CPU.", mr,
                                        buckets=DEVICE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(c.BATCH_TOKENS, "Tokens computed per step.", mr, buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_seqs = Histogram(c.BATCH_SEQS, "Sequences per step.", mr, buckets=TOKEN_BUCKETS, registry=r)
        self.blocks_used = Gauge(c.KV_BLOCKS_USED, "KV cache blocks held by sequences.", mr, registry=r)
        self.blocks_free = Gauge(c.KV_BLOCKS_FREE, "KV cache blocks free (cached or empty).", mr, registry=r)
        self.rejected = Counter(c.REQUESTS_REJECTED, "Requests refused before reaching the engine.",
                                [*mr, "reason"], registry=r)
        self.errors = Counter(c.REQUEST_ERRORS, "Requests that failed inside the engine.", mr, registry=r)
        self.heartbeat_age = Gauge(c.ENGINE_HEARTBEAT_AGE, "Seconds since the engine loop last ran.", mr, registry=r)
        self.kv_bytes = Counter(c.KV_TRANSFER_BYTES, "KV cache bytes moved between workers.",
                                mr + ["direction"], registry=r)
        self.kv_seconds = Histogram(c.KV_TRANSFER_SECONDS, "Time to pull one prompt's KV cache.", mr,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.kv_recomputes = Counter(c.KV_RECOMPUTES, "Handed-off prompts recomputed instead of pulled.",
                                     mr + ["reason"], registry=r)
        self.kv_exported = Counter(c.KV_EXPORTED, "Running choices handed to another worker with their KV cache.",
                                   mr, registry=r)
        self.kv_exported_total = 0
        self.kv_leases = Gauge(c.KV_LEASES, "Prompts whose KV cache is held for a decode worker.", mr, registry=r)
        self.kv_leases_expired = Counter(c.KV_LEASES_EXPIRED, "KV leases freed because nobody pulled them.",
                                         mr, registry=r)
        self.kv_peer_seconds = Counter(c.KV_PEER_SECONDS, "Seconds spent pulling KV caches, by sending peer.",
                                       mr + ["peer"], registry=r)
        self.kv_peer_bytes = Counter(c.KV_PEER_BYTES, "KV cache bytes pulled, by sending peer.", mr + ["peer"],
                                     registry=r)
        self.kv_peer_failures = Counter(c.KV_PEER_FAILURES, "KV pulls that failed, by sending peer.",
                                        mr + ["peer"], registry=r)
        self.power_cap = Gauge(c.POWER_CAP_WATTS, "The GPU power cap in force, per GPU (no series: none).", mr,
                               registry=r)
        self.power_cap_expiry = Gauge(c.POWER_CAP_EXPIRY, "When the power cap lapses unless renewed (epoch s).",
                                      mr, registry=r)
        self.model_name, self.role = model_name, role
        self._m = {"model_name": model_name}
        self._mr = {"model_name": model_name, "role": role}
        # create the series up front, so that they read 0 before the first event
        for metric in (self.running, self.waiting, self.kv_usage, self.ttft, self.itl, self.e2e,
                       self.prompt_tokens, self.generation_tokens, self.preemptions,
                       self.prefix_queries, self.prefix_hits):
            metric.labels(**self._m)
        for metric in (self.step_seconds, self.forward_seconds, self.device_seconds, self.batch_tokens, self.batch_seqs,
                       self.blocks_used, self.blocks_free, self.errors, self.heartbeat_age,
                       self.kv_seconds, self.kv_leases, self.kv_leases_expired):
            metric.labels(**self._mr)

    def on_step(self, seconds: float, forward_seconds: float, device_seconds: float, num_tokens: int,
                num_seqs: int, running: int, waiting: int, blocks_used: int, blocks_free: int, preempted: int) -> None:
        self.step_seconds.labels(**self._mr).observe(seconds)
        self.forward_seconds.labels(**self._mr).observe(forward_seconds)
        self.device_seconds.labels(**self._mr).observe(device_seconds)
        self.batch_tokens.labels(**self._mr).observe(num_tokens)
        self.batch_seqs.labels(**self._mr).observe(num_seqs)
        self.running.labels(**self._m).set(running)
        self.waiting.labels(**self._m).set(waiting)
        self.blocks_used.labels(**self._mr).set(blocks_used)
        self.blocks_free.labels(**self._mr).set(blocks_free)
        self.kv_usage.labels(**self._m).set(blocks_used / max(1, blocks_used + blocks_free))
        if preempted:
            self.preemptions.labels(**self._m).inc(preempted)

    def on_admit(self, queried_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries.labels(**self._m).inc(queried_tokens)
        self.prefix_hits.labels(**self._m).inc(hit_tokens)

    def on_first_token(self, ttft: float) -> None:
        self.ttft.labels(**self._m).observe(ttft)

    def on_token(self, itl: float) -> None:
        self.itl.labels(**self._m).observe(itl)

    def on_finish(self, reason: str, e2e: float, prompt_tokens: int, output_tokens: int) -> None:
        self.success.labels(finished_reason=reason, **self._m).inc()
        self.e2e.labels(**self._m).observe(e2e)
        self.prompt_tokens.labels(**self._m).inc(prompt_tokens)
        self.generation_tokens.labels(**self._m).inc(output_tokens)
        if reason == "error":
            self.errors.labels(**self._mr).inc()

    def on_kv_transfer(self, direction: str, nbytes: int, seconds: float | None = None) -> None:
        self.kv_bytes.labels(direction=direction, **self._mr).inc(nbytes)
        if seconds is not None:
            self.kv_seconds.labels(**self._mr).observe(seconds)

    def on_kv_peer(self, peer: str, nbytes: int, seconds: float, failed: bool) -> None:
        self.kv_peer_seconds.labels(peer=peer, **self._mr).inc(seconds)
        self.kv_peer_bytes.labels(peer=peer, **self._mr).inc(nbytes)
        if failed:
            self.kv_peer_failures.labels(peer=peer, **self._mr).inc()
        else:
            self.kv_peer_failures.labels(peer=peer, **self._mr)  # reads 0, not missing, once the link is used

    def on_leases(self, held: int, expired: int) -> None:
        self.kv_leases.labels(**self._mr).set(held)
        if expired:
            self.kv_leases_expired.labels(**self._mr).inc(expired)

    def on_kv_exported(self, choices: int) -> None:
        self.kv_exported.labels(**self._mr).inc(choices)
        self.kv_exported_total += choices  # /health says it too: a drain's Event reports it

    def on_kv_recompute(self, reason: str) -> None:
        self.kv_recomputes.labels(reason=reason, **self._mr).inc()

    def on_power_cap(self, watts: float | None, expires: float | None) -> None:
        """The cap in force and when it lapses; a series is there only while it applies."""
        for gauge, value in ((self.power_cap, watts), (self.power_cap_expiry, expires)):
            if value is not None:
                gauge.labels(**self._mr).set(value)
                continue
            with contextlib.suppress(KeyError):  # not there: nothing to remove
                gauge.remove(self.model_name, self.role)

    def on_reject(self, reason: str) -> None:
        self.rejected.labels(reason=reason, **self._mr).inc()
