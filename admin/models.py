"""The admin store's tables as SQLAlchemy 2 models: incidents with their evidence, power
actions, remediation actions and the audit log. A record a sender may send twice (the
operator retries until it hears back) carries the sender's idempotency key, unique, so it
is stored once. Times are seconds since the epoch (floats), as everywhere else in
fleetwise, so SQLite and PostgreSQL read them back alike. The schema
itself is made by the Alembic migrations in `migrations/versions/`, never by `create_all`;
`tests/test_admin_store.py` checks that the two agree."""

from sqlalchemy import Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """Every table's rows have an integer id, newer rows a larger one (the cursor pages on it)."""
    id: Mapped[int] = mapped_column(Integer, primary_key=True)


class Incident(Base):
    """Something wrong with a worker, a node or a KV link, open until someone resolves it."""
    __tablename__ = "incidents"
    kind: Mapped[str] = mapped_column(String(64), index=True)         # e.g. slow_worker, ecc_errors
    subject_kind: Mapped[str] = mapped_column(String(16))              # worker, node or link
    subject: Mapped[str] = mapped_column(String(255), index=True)
    namespace: Mapped[str] = mapped_column(String(253), default="")
    severity: Mapped[str] = mapped_column(String(16), default="warning")
    summary: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default="open", index=True)  # open or resolved
    source: Mapped[str] = mapped_column(String(64), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)  # the sender's, once
    opened_at: Mapped[float] = mapped_column(Float)
    resolved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(255), nullable=True)
    resolution: Mapped[str | None] = mapped_column(Text, nullable=True)
    evidence: Mapped[list["Evidence"]] = relationship(back_populates="incident", cascade="all, delete-orphan",
                                                      order_by="Evidence.id", lazy="selectin")


class Evidence(Base):
    """One observation behind an incident: a signal, its value and what it was compared with."""
    __tablename__ = "evidence"
    incident_id: Mapped[int] = mapped_column(ForeignKey("incidents.id", ondelete="CASCADE"), index=True)
    signal: Mapped[str] = mapped_column(String(128))
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    baseline: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    observed_at: Mapped[float] = mapped_column(Float)
    incident: Mapped[Incident] = relationship(back_populates="evidence")


class PowerAction(Base):
    """A cap set or cleared on a worker, by the power controller or by a person's override."""
    __tablename__ = "power_actions"
    at: Mapped[float] = mapped_column(Float, index=True)
    worker: Mapped[str] = mapped_column(String(255), index=True)
    namespace: Mapped[str] = mapped_column(String(253), default="")
    watts: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: the cap or override was cleared
    until: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(64))                    # controller or override
    actor: Mapped[str] = mapped_column(String(255), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)  # the sender's, once


class RemediationAction(Base):
    """A verb of `FleetActions` done to a worker or a node, by a controller or a person."""
    __tablename__ = "remediation_actions"
    at: Mapped[float] = mapped_column(Float, index=True)
    verb: Mapped[str] = mapped_column(String(32))
    target_kind: Mapped[str] = mapped_column(String(16))               # worker, node or link
    target: Mapped[str] = mapped_column(String(255), index=True)
    namespace: Mapped[str] = mapped_column(String(253), default="")
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(255), default="")
    outcome: Mapped[str] = mapped_column(String(16), default="done")   # done or refused
    idempotency_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)  # the sender's, once
    incident_id: Mapped[int | None] = mapped_column(ForeignKey("incidents.id", ondelete="SET NULL"), nullable=True)


class AuditEntry(Base):
    """One request that would change something, whoever sent it and however it ended."""
    __tablename__ = "audit_log"
    at: Mapped[float] = mapped_column(Float, index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)        # the token's name, or anonymous
    role: Mapped[str] = mapped_column(String(16), default="")
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(2048))
    body: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(16), index=True)       # ok, denied, invalid, refused, error
    detail: Mapped[str] = mapped_column(Text, default="")
    request_id: Mapped[str] = mapped_column(String(128), default="")
