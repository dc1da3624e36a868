"""`fleetwise admin`: the admin API in a cluster, over the worker pods and nodes it reads
and acts on through the operator's Kubernetes calls and `KubeFleet`; and `fleetwise admin
token`, which makes a token and the tokens-file entry that holds its hash."""

import logging

import yaml

from fleetwise.logs import configure as configure_logs

from .app import Limits, create_app, serve
from .auth import Role, TokenFile, Tokens, new_token, token_entry
from .deps import Ctx
from .store import Store
from .token_review import ReviewedTokens


def run(database: str, book: TokenFile, host: str, port: int, kubeconfig: str | None, limits: Limits,
        prometheus_url: str | None = None, token_review: bool = False) -> None:
    from fleetwise.operator.actions import KubeFleet
    from fleetwise.operator.kube import Kube, load_client

    from .kube_view import KubeView
    configure_logs(logging.INFO)
    from fleetwise.telemetry.prometheus import PrometheusClient
    kube = Kube(load_client(kubeconfig))
    tokens: Tokens = ReviewedTokens(book, kube.review_token) if token_review else book
    prometheus = PrometheusClient(prometheus_url) if prometheus_url else None
    store = Store(database)
    try:
        serve(create_app(Ctx(store, KubeView(kube, prometheus), KubeFleet(kube)), tokens, limits), host, port)
    finally:
        store.close()
        if prometheus is not None:
            prometheus.close()


def make_token(name: str, role: Role) -> tuple[str, str]:
    """A new token, and the YAML entry for the tokens file (its hash, never the token)."""
    token = new_token()
    return token, yaml.safe_dump([token_entry(name, role, token)], sort_keys=False)
