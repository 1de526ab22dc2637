"""Bring a database to the newest schema with the Alembic history in the settings' migrations_dir.

On PostgreSQL the schema may belong to a migration role while the app connects as a
least-privilege role: after every upgrade the owner grants the app role what it needs, and on
audit_events only SELECT and INSERT, so the app can neither rewrite the trail nor, not being the
owner, disable its triggers.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

from app.config import get_settings
from app.errors import PapcadError

APPEND_ONLY_TABLES = ("audit_events",)
READ_ONLY_TABLES = ("alembic_version",)


class MigrationsNotFoundError(PapcadError):
    """The configured migrations directory holds no Alembic environment."""


def alembic_config(url: str, migrations_dir: Path | None = None) -> Config:
    """Alembic's configuration for `url` with the migrations the settings locate (PAPCAD_MIGRATIONS_DIR), so
    it works wherever the package is installed; alembic.ini is only for the `alembic` command line."""
    directory = migrations_dir or get_settings().migrations_dir
    if not (directory / "env.py").is_file():
        raise MigrationsNotFoundError(
            f"no Alembic migrations in {directory}: set PAPCAD_RESOURCE_DIR (or PAPCAD_MIGRATIONS_DIR)"
        )
    config = Config()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("path_separator", "os")
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_to_head(database_url: str, migration_url: str | None = None, migrations_dir: Path | None = None) -> None:
    """Migrate as `migration_url` (default: `database_url`); when that is another PostgreSQL role,
    grant the role of `database_url` its privileges on every table."""
    owner_url = migration_url or database_url
    config = alembic_config(owner_url, migrations_dir)
    config.attributes["app_role"] = app_role(database_url, owner_url)
    command.upgrade(config, "head")


def app_role(database_url: str, owner_url: str) -> str | None:
    """The app's PostgreSQL role when it differs from the owner's, else None (one role: no grants)."""
    app, owner = make_url(database_url), make_url(owner_url)
    if app.get_backend_name() != "postgresql" or not app.username or app.username == owner.username:
        return None
    return app.username


def grant_app_role(connection: Connection, role: str) -> None:
    """Least privilege for the app role on the current schema, re-applied on every upgrade."""
    quoted = connection.dialect.identifier_preparer.quote(role)
    statements = [
        f"GRANT USAGE ON SCHEMA public TO {quoted}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {quoted}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}",
    ]
    for table in APPEND_ONLY_TABLES:
        statements.append(f"REVOKE UPDATE, DELETE ON {table} FROM {quoted}")
    for table in READ_ONLY_TABLES:
        statements.append(f"REVOKE INSERT, UPDATE, DELETE ON {table} FROM {quoted}")
    for statement in statements:
        connection.execute(text(statement))
