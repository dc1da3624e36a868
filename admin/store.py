"""The admin store: one database (a SQLite file by default, PostgreSQL by URL through
psycopg 3), migrated to the newest schema on open by the Alembic scripts shipped in this
package, and the few reads and writes the API needs. Lists are newest first and paged by
an opaque cursor (the last row's id), so a page never shifts when new rows arrive."""

import base64
import binascii
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import AuditEntry, Base, Evidence, Incident, PowerAction, RemediationAction

MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T", bound=Base)


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class Page:
    items: Sequence[Any]
    next_cursor: str | None


def database_url(url_or_path: str) -> str:
    """A URL as given (postgresql://... means psycopg 3), or a file path for SQLite."""
    if "://" not in url_or_path:
        return f"sqlite:///{Path(url_or_path).expanduser().resolve()}"
    if url_or_path.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url_or_path.split("://", 1)[1]
    return url_or_path


def encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "id" or not value.isdigit():
            raise ValueError
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadCursor("not a cursor this API returned")


class Store:
    def __init__(self, url: str, migrate: bool = True) -> None:
        self.url = database_url(url)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    def close(self) -> None:
        self.engine.dispose()

    def _alembic(self, verb: str, revision: str) -> None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            getattr(command, verb)(cfg, revision)

    def migrate(self, revision: str = "head") -> None:
        self._alembic("upgrade", revision)

    def downgrade(self, revision: str = "base") -> None:
        self._alembic("downgrade", revision)

    def ping(self) -> None:
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def add(self, row: T) -> T:
        """The row, stored; or the row stored before under the same idempotency key."""
        key = getattr(row, "idempotency_key", None)
        if key and (found := self._by_key(type(row), key)) is not None:
            return found
        try:
            with self.session() as s:
                s.add(row)
        except IntegrityError:
            found = self._by_key(type(row), key) if key else None
            if found is None:
                raise
            return found  # the same key, sent twice at once
        return row

    def _by_key(self, model: type[T], key: str) -> T | None:
        with self.session() as s:
            return s.scalars(select(model).where(model.__table__.c.idempotency_key == key)).first()

    # -- incidents -----------------------------------------------------------------------------

    def open_incident(self, incident: Incident, evidence: Sequence[Evidence]) -> Incident:
        incident.opened_at = incident.opened_at or time.time()
        incident.evidence = list(evidence)
        for e in incident.evidence:
            e.observed_at = e.observed_at or incident.opened_at
        return self.add(incident)

    def incident(self, incident_id: int) -> Incident | None:
        with self.session() as s:
            return s.get(Incident, incident_id)

    def resolve(self, incident_id: int, actor: str, resolution: str) -> Incident | None:
        """The incident, resolved now (an already resolved one is returned unchanged)."""
        with self.session() as s:
            found = s.get(Incident, incident_id, with_for_update=True)
            if found is not None and found.status != "resolved":
                found.status, found.resolved_at = "resolved", time.time()
                found.resolved_by, found.resolution = actor, resolution
            return found

    def page(self, model: type[T], limit: int, cursor: str | None, **filters: Any) -> Page:
        """Newest first; `filters` are column == value, None meaning no filter."""
        query = select(model).order_by(model.id.desc()).limit(limit + 1)
        if cursor is not None:
            query = query.where(model.id < decode_cursor(cursor))
        for column, value in filters.items():
            if value is not None:
                query = query.where(getattr(model, column) == value)
        with self.session() as s:
            rows = list(s.scalars(query))
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, encode_cursor(rows[-1].id) if more else None)

    def audit(self, **fields: Any) -> AuditEntry:
        return self.add(AuditEntry(at=time.time(), **fields))

    def record_power(self, **fields: Any) -> PowerAction:
        return self.add(PowerAction(at=time.time(), **fields))

    def record_remediation(self, **fields: Any) -> RemediationAction:
        return self.add(RemediationAction(at=time.time(), **fields))


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
