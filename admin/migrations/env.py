"""Alembic's environment for the admin store: it runs on the connection the store hands it
(`Store.migrate`), so migrations need no alembic.ini and no URL of their own. Imported
outside a migration (the package's import check), it does nothing."""

from alembic import context

from fleetwise.admin.models import Base


def run() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if getattr(context, "config", None) is not None:
    run()
