"""The prefill -> decode handoff of a disaggregated request, seen from the router.

A prefill replica computes the prompt and its first token and holds the prompt's keys and
values under a lease; a decode replica pulls them and generates the rest (ARCHITECTURE.md,
"The path of one request"). `n > 1` and prompt lists are one handoff per sequence
(fanout.py). When every prefill replica's leases are full (429 `kv_leases_full`), they
free up as decode workers pull: the prefill is sent again after a short back-off, a
bounded number of times, before the client hears 429. A streamed decode moves to another
decode replica if its own fails (migrate.py). Leases the router will not hand on are
released at once. A decode replica that routes around a slow KV link from the prefill
replica that answered (its `avoid`, set by the fault loop's `avoid_link`) is not chosen for
that handoff, unless every available decode replica avoids it: then any is (a slow link is
slower, not broken, and the avoidance must never turn into refusals).

With `FLEETWISE_KV_EARLY=1` in its environment the router asks for early prefills while every
available decode replica reads segmented KV streams (the versions its /health names): the
prefill replica answers at admission, and the decode request goes at once, to a replica that
reads them, its worker pulling the KV while the prompt is computed (worker/kv/early.py). During
a rolling upgrade, while a decode replica of an older release is up, handoffs are late, as
before; a prefill replica of an older release answers late too.
"""

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from pydantic import ValidationError

from fleetwise.protocol import KV_STREAM_SEGMENTED, PROTOCOL_VERSION, PrefillAnswer

from .endpoints import ModelRoute
from .fanout import merge_bodies, merge_streams
from .metrics import RouterMetrics
from .migrate import Where
from .replica import Replica
from .retries import RESET, TIMEOUT, RouterError, error_code
from .upstream import Response as UpstreamResponse
from .upstream import Upstream

LEASES_FULL = "kv_leases_full"
LEASE_BACKOFF = 0.05  # seconds before the first prefill sent again; doubles each time
LEASE_RETRIES = 5     # prefills sent again on kv_leases_full (1.55 s in all) before the client gets the 429
KV_EARLY_ENV = "FLEETWISE_KV_EARLY"  # "1": early handoffs (the KV streams while the prompt is computed)

Caller = Callable[..., Awaitable[Upstream]]  # Router.call
_PREFILL_RETRY = frozenset({RESET, TIMEOUT})


class Handoffs:
    def __init__(self, call: Caller, migrating: Callable[[Upstream, Where], Upstream], metrics: RouterMetrics,
                 session: Callable[[], aiohttp.ClientSession | None], stream_retry: frozenset[str]):
        self.call, self.migrating, self.metrics, self.session = call, migrating, metrics, session
        self.stream_retry = stream_retry
        self.kv_early = os.environ.get(KV_EARLY_ENV) == "1"
        self.background: set[asyncio.Task] = set()  # lease releases: held until done, or they may be collected

    async def disaggregated(self, route: ModelRoute, kind: str, body: dict, subs: list[tuple[dict, int]],
                            stream: bool, keys: list[int], coalesce: bool = False) -> Upstream:
        """`coalesce`: the decode streams are for an answer the router assembles, asked for
        with their text as one event (fleetwise/protocol.py)."""
        if len(subs) == 1:
            return await self.handoff(route, kind, body, stream, keys, coalesce)
        outcomes = await asyncio.gather(*(self.handoff(route, kind, sub, stream, keys, coalesce) for sub, _ in subs),
                                        return_exceptions=True)
        ups = [u for u in outcomes if not isinstance(u, BaseException)]
        errors = [u for u in outcomes if isinstance(u, BaseException)]
        failed: Upstream | BaseException | None = errors[0] if errors else next(
            (u for u in ups if u.status != 200), None)
        if failed is not None:
            for u in ups:
                u.release()
            if isinstance(failed, BaseException):
                raise failed
            return failed
        offsets = [offset for _, offset in subs]
        counted = [offset % max(1, int(body.get("n") or 1)) == 0 for offset in offsets]
        if not stream:
            return Upstream(200, "application/json", merge_bodies(ups, offsets, counted))
        return merge_streams(ups, offsets, counted, bool((body.get("stream_options") or {}).get("include_usage")))

    async def prefill(self, route: ModelRoute, kind: str, body: dict, keys: list[int]) -> Upstream:
        early = self.kv_early and takes_early(route.replicas["decode"])
        payload = orjson.dumps({"kind": kind, "request": body,  # a PrefillRequest: orjson costs a tenth of pydantic
                                **({"kv_early": True} if early else {})})
        delay = LEASE_BACKOFF
        for attempt in range(LEASE_RETRIES + 1):
            # a prefill is bounded work (one token): after a broken connection or a timeout it is
            # redone on another replica, and a late answer from the first has its lease released
            pre = await self.call(route.name, "prefill", route.replicas["prefill"], "/internal/prefill", payload,
                                  False, keys, retry_on=_PREFILL_RETRY, late=self._late_prefill)
            if pre.status != 429 or error_code(pre.body) != LEASES_FULL or attempt == LEASE_RETRIES:
                return pre
            self.metrics.child(self.metrics.handoff_retries, route.name).inc()
            await asyncio.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    async def handoff(self, route: ModelRoute, kind: str, body: dict, stream: bool, keys: list[int],
                      coalesce: bool = False) -> Upstream:
        model = route.name
        pre = await self.prefill(route, kind, body, keys)
        if pre.status != 200:
            return pre  # the client's own error (4xx or 5xx), or every prefill replica busy (429)
        assert pre.replica is not None  # call() names the replica that answered
        prefill_url = pre.replica.url
        try:
            first = PrefillAnswer.model_validate_json(pre.body)
        except ValidationError as e:
            raise RouterError(502, f"the prefill worker {prefill_url} answered outside protocol version "
                              f"{PROTOCOL_VERSION}: {e.errors()[0]['msg']}", code="bad_upstream", type_="server_error")
        # a DecodeRequest, from a validated PrefillAnswer
        dbody = orjson.dumps({"kind": kind, "request": body, "prompt_token_ids": first.prompt_token_ids,
                              "first_token": first.first_token, "first_logprob": first.first_logprob,
                              "handle": first.handle, "prefill_url": prefill_url, "kv_early": first.kv_early,
                              "kv_segment_tokens": first.kv_segment_tokens})
        taken = False
        try:
            decodes = paired(route.replicas["decode"], prefill_url, time.time())
            if first.kv_early:  # one that came up meanwhile may be of an older release
                decodes = [d for d in decodes if d.reads_kv(KV_STREAM_SEGMENTED)] or decodes
            up = await self.call(model, "decode", decodes, "/internal/decode", dbody, stream, keys,
                                 retry_on=self.stream_retry if stream else frozenset(), coalesce=coalesce)
            # a decode worker answers 200 only after it pulled the KV (and let the lease go)
            taken = up.status == 200
            if stream and taken:
                return self.migrating(up, Where(model, "decode", route.replicas["decode"], kind, body, keys,
                                                first.prompt_token_ids, coalesce=coalesce))
            return up
        finally:
            if first.handle and not taken:
                self._release_soon(prefill_url, first.handle)

    async def _late_prefill(self, url: str, resp: UpstreamResponse) -> None:
        """A prefill answer that came after the router had given up on it: its lease goes."""
        body = await resp.read()
        if resp.status == 200:
            try:
                handle = PrefillAnswer.model_validate_json(body).handle
            except ValidationError:
                return
            if handle:
                await self._release_lease(url, handle)

    def _release_soon(self, url: str, handle: str) -> None:
        task = asyncio.create_task(self._release_lease(url, handle))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _release_lease(self, url: str, handle: str) -> None:
        session = self.session()
        assert session is not None
        try:
            async with session.delete(f"{url}/internal/kv/{handle}"):
                pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass  # the lease expires on its own



def paired(decodes: list[Replica], prefill_url: str, now: float) -> list[Replica]:
    """The decode replicas for a prompt from `prefill_url`: those not routing around a slow link
    from it, or all of them when none of those is available."""
    if not any(d.avoid for d in decodes):
        return decodes
    kept = [d for d in decodes if not d.avoids(prefill_url, now)]
    return kept if any(d.available for d in kept) else decodes


def takes_early(decodes: list[Replica]) -> bool:
    """Every available decode replica reads segmented KV streams (an early prefill's), and one is."""
    available = [d for d in decodes if d.available]
    return bool(available) and all(d.reads_kv(KV_STREAM_SEGMENTED) for d in available)
