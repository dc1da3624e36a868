"""The admin store on SQLite and on a real PostgreSQL 15: migrations go up and down cleanly,
the migrated schema is the models' schema, and the store's reads and writes behave alike."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from fleetwise.admin.models import Base, Evidence, Incident
from fleetwise.admin.store import BadCursor, Store, database_url

from . import postgres as pg

TABLES = {"incidents", "evidence", "power_actions", "remediation_actions", "audit_log"}


@pytest.fixture(scope="module")
def pg_url():
    why = pg.missing()
    if why:
        pytest.skip(why)
    with pg.postgres() as cluster:
        yield cluster.url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "admin.db")
    return request.getfixturevalue("pg_url")


def _tables(store: Store) -> set[str]:
    return set(inspect(store.engine).get_table_names()) - {"alembic_version"}


def test_migrations_go_up_and_down_and_the_schema_is_the_models(url):
    store = Store(url)
    try:
        assert _tables(store) == TABLES
        with store.engine.connect() as c:
            diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
        assert diff == [], f"the migrations and the models differ: {diff}"
        store.downgrade()
        assert _tables(store) == set()
        store.migrate()
        assert _tables(store) == TABLES
        store.migrate()  # at head already: nothing to do, no error
    finally:
        store.downgrade()
        store.close()


def test_incidents_page_newest_first_filter_and_resolve(url):
    store = Store(url)
    try:
        for i in range(5):
            store.open_incident(Incident(kind="slow_worker" if i % 2 else "ecc_errors", subject_kind="worker",
                                         subject=f"w{i}", namespace="ml", source="faults", summary=f"#{i}"),
                                [Evidence(signal="p99_seconds", value=3.0 + i, baseline=1.0, detail="3x its peers")])
        first = store.page(Incident, 2, None)
        assert [r.summary for r in first.items] == ["#4", "#3"] and first.next_cursor
        second = store.page(Incident, 2, first.next_cursor)
        third = store.page(Incident, 2, second.next_cursor)
        assert [r.summary for r in second.items + third.items] == ["#2", "#1", "#0"] and third.next_cursor is None
        slow = store.page(Incident, 10, None, kind="slow_worker")
        assert [r.subject for r in slow.items] == ["w3", "w1"]
        one = store.incident(slow.items[0].id)
        assert one is not None and one.evidence[0].value == 6.0 and one.evidence[0].observed_at == one.opened_at
        done = store.resolve(one.id, "alice", "replaced the GPU")
        assert done is not None and done.status == "resolved" and done.resolved_by == "alice"
        again = store.resolve(one.id, "bob", "twice")
        assert again is not None and again.resolved_by == "alice"  # resolving twice changes nothing
        assert [r.subject for r in store.page(Incident, 10, None, status="open").items] == ["w4", "w2", "w1", "w0"]
        assert store.resolve(10_000, "alice", "none") is None
        with pytest.raises(BadCursor):
            store.page(Incident, 2, "bm90IGEgY3Vyc29y")
        store.audit(actor="alice", role="operator", method="POST", path="/x", status=200, outcome="ok")
        store.record_power(worker="w1", namespace="ml", watts=300.0, until=1.0, source="override", actor="alice")
        store.record_remediation(verb="quarantine", target_kind="worker", target="w1", source="api", actor="alice")
    finally:
        store.downgrade()
        store.close()


def test_a_path_is_a_sqlite_file_and_a_postgres_url_uses_psycopg3(tmp_path):
    assert database_url(str(tmp_path / "a.db")) == f"sqlite:///{tmp_path / 'a.db'}"
    assert database_url("postgresql://u@h:5432/d") == "postgresql+psycopg://u@h:5432/d"
    assert database_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
