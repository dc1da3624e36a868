"""The router on a busy machine: a stall of its own event loop is not a replica's failure, and
replicas all marked down by a burst of failures are still tried before the client gets a 503."""

import asyncio
import socket
import time

import pytest
import uvloop

from fleetwise.router.proxy import Router
from fleetwise.router.replica import Replica
from fleetwise.router.retries import RouterError
from fleetwise.router.upstream import NotSent, Pool
from fleetwise.router.upstream import Response as UpstreamResponse


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_connect_the_kernel_made_while_the_loop_stalled_is_not_a_failure(new_loop):
    """The replica's listener takes the connection at once (its backlog, no accept needed); the
    router's loop is blocked past the connect timeout before it sees that. Blamed on the
    replica, the replica would be marked down and a request refused while it was fine."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    pool = Pool(connect_timeout=0.2)

    async def connect():
        loop = asyncio.get_running_loop()
        loop.call_soon(time.sleep, 0.6)  # the loop busy with other work, three connect timeouts long
        return await pool._connection("127.0.0.1", port)

    loop = new_loop()
    try:
        conn = loop.run_until_complete(connect())
        assert not conn.closed
        conn.transport.close()
    finally:
        loop.close()
        listener.close()


class _Source:
    def __init__(self, replicas: list[Replica]):
        self.replicas = replicas

    def models(self):
        return {}


def test_replicas_all_marked_down_are_still_tried_before_a_503():
    """A burst of failures (a stall, a killed peer) marked every replica of the role down; the
    next probe is up to a probe interval away. A replica that answers is used meanwhile, as
    Envoy's panic threshold routes to every host when too few are healthy; one taken out of
    routing (drained, quarantined) is never tried."""
    alive, dead, drained = (Replica(f"http://127.0.0.1:{p}", "m", "decode") for p in (1, 2, 3))
    for r in (alive, dead):
        r.record(False)
    drained.routable = False
    router = Router(_Source([]), policy="least_outstanding", token="t")
    tried = []

    async def post(url, path, body, headers=b"", late=None):
        tried.append(url)
        if url == alive.url:
            return _Answer()
        raise NotSent(f"cannot connect to {url}")
    router.pool.post = post  # type: ignore[method-assign]

    async def call(replicas):
        return await router.call("m", "decode", replicas, "/x", b"{}", False, [])

    up = asyncio.run(call([dead, drained, alive]))
    assert up.status == 200 and up.replica is alive and alive.healthy
    assert drained.url not in tried
    # nothing routable answers: the client's 503 names what the last try met
    tried.clear()
    with pytest.raises(RouterError) as e:
        asyncio.run(call([dead, drained]))
    assert e.value.status == 503 and e.value.code == "no_replica" and "cannot connect" in str(e.value)
    assert tried == [dead.url]


class _Answer(UpstreamResponse):
    def __init__(self):
        self.status, self.content_type = 200, "application/json"

    async def read(self) -> bytes:
        return b"{}"

    def release(self) -> None:
        pass
