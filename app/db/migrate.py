"""Bring a database to the newest schema with the Alembic history in migrations/."""

from alembic import command
from alembic.config import Config

from app.config import PROJECT_ROOT


def upgrade_to_head(database_url: str) -> None:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, "head")
