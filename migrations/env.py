"""Alembic environment: the URL comes from the caller (app.db.migrate) or PapCAD's settings.

When app.db.migrate names a separate app role, its grants are re-applied in the same transaction."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from app.config import get_settings
from app.db.migrate import app_role, grant_app_role
from app.db.models import Base

config = context.config
target_metadata = Base.metadata
url = config.get_main_option("sqlalchemy.url")
if not url:  # the alembic command line: PapCAD's settings give both roles
    settings = get_settings()
    url = settings.effective_migration_database_url
    config.attributes.setdefault("app_role", app_role(settings.effective_database_url, url))


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        connectable = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.", poolclass=pool.NullPool)
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
        role = config.attributes.get("app_role")
        if role and connection.dialect.name == "postgresql":
            grant_app_role(connection, role)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
