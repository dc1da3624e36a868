"""The admin store's first schema: incidents, evidence, power and remediation actions, the
audit log."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(64), nullable=False, index=True),
        sa.Column("subject_kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False, index=True),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=True, unique=True),
        sa.Column("opened_at", sa.Float, nullable=False),
        sa.Column("resolved_at", sa.Float, nullable=True),
        sa.Column("resolved_by", sa.String(255), nullable=True),
        sa.Column("resolution", sa.Text, nullable=True),
    )
    op.create_table(
        "evidence",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("signal", sa.String(128), nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("baseline", sa.Float, nullable=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("observed_at", sa.Float, nullable=False),
    )
    op.create_table(
        "power_actions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False, index=True),
        sa.Column("worker", sa.String(255), nullable=False, index=True),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("watts", sa.Float, nullable=True),
        sa.Column("until", sa.Float, nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("idempotency_key", sa.String(64), nullable=True, unique=True),
    )
    op.create_table(
        "remediation_actions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False, index=True),
        sa.Column("verb", sa.String(32), nullable=False),
        sa.Column("target_kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(255), nullable=False, index=True),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id", ondelete="SET NULL"), nullable=True),
        sa.Column("idempotency_key", sa.String(64), nullable=True, unique=True),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, nullable=False, index=True),
        sa.Column("actor", sa.String(255), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(2048), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False, index=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
    )


def downgrade() -> None:
    for table in ("audit_log", "remediation_actions", "power_actions", "evidence", "incidents"):
        op.drop_table(table)
