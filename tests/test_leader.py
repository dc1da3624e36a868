"""Leader election while the API server is overloaded: a replica not yet leading waits
through 5xx answers and lost connections, and still refuses what is its own fault (4xx)."""

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from fleetwise.operator.leader import LeaderElector


class FlakyCoord:
    """The coordination API: fails with each of `errors` in turn, then has no lease yet."""
    def __init__(self, errors: list[Exception]) -> None:
        self.errors, self.created = errors, 0

    def read_namespaced_lease(self, name: str, namespace: str) -> None:
        if self.errors:
            raise self.errors.pop(0)
        raise ApiException(status=404)

    def create_namespaced_lease(self, namespace: str, body: dict) -> None:
        self.created += 1


def elector(coord: FlakyCoord) -> LeaderElector:
    e = LeaderElector(client.ApiClient(), "default", identity="me", renew_every=0.01)
    e.coord = coord  # type: ignore[assignment]  # a stand-in for the coordination API
    return e


def test_a_replica_waits_through_server_errors_and_lost_connections_then_leads():
    coord = FlakyCoord([ApiException(status=504), ApiException(status=503),
                        urllib3.exceptions.MaxRetryError(None, "/", "refused"), ConnectionResetError()])
    e = elector(coord)
    try:
        e.acquire()
        assert coord.created == 1 and coord.errors == []
    finally:
        e.release()


def test_a_refusal_that_is_the_replicas_own_fault_is_not_retried():
    e = elector(FlakyCoord([ApiException(status=403)]))
    with pytest.raises(ApiException) as err:
        e.acquire()
    assert err.value.status == 403
