"""The Alembic history builds exactly the ORM's schema; the admin CLI manages users and keys."""

import os
import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.db.migrate import upgrade_to_head
from app.db.models import Base


def test_migrations_match_the_models(database_url):
    upgrade_to_head(database_url)
    upgrade_to_head(database_url)  # a second run is a no-op
    engine = create_engine(database_url)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert diff == []
    assert {"users", "api_clients", "images", "predictions", "reviews", "audit_events", "alembic_version"} <= tables


def papcad(args, env, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.cli
@pytest.mark.slow
def test_user_and_apikey_commands(database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url, "PAPCAD_DATA_DIR": str(tmp_path)}
    created = papcad(["user", "create", "--username", "dr.jensen", "--role", "pathologist"], env, "a-long-password\n")
    assert created.returncode == 0, created.stderr
    assert "created user dr.jensen (pathologist)" in created.stdout

    duplicate = papcad(["user", "create", "--username", "dr.jensen", "--role", "pathologist"], env, "a-long-password\n")
    short = papcad(["user", "create", "--username", "x", "--role", "pathologist"], env, "short\n")
    bad_role = papcad(["user", "create", "--username", "y", "--role", "janitor"], env, "a-long-password\n")
    for result, words in ((duplicate, "already exists"), (short, "at least 12"), (bad_role, "role must be")):
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr

    deactivated = papcad(["user", "deactivate", "--username", "dr.jensen"], env)
    assert deactivated.returncode == 0 and "deactivated user dr.jensen" in deactivated.stdout
    unknown = papcad(["user", "deactivate", "--username", "nobody"], env)
    assert unknown.returncode == 2 and "no user named" in unknown.stderr

    key = papcad(["apikey", "create", "--name", "LIS-main"], env)
    assert key.returncode == 0, key.stderr
    token = key.stdout.strip()
    assert token.startswith("pcad_") and len(token) > 40
    assert "cannot be shown again" in key.stderr

    engine = create_engine(database_url)
    with engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT key_hash, key_prefix FROM api_clients").one()
        password_hash = connection.exec_driver_sql("SELECT password_hash FROM users").scalar_one()
    engine.dispose()
    assert token not in stored[0] and stored[1] in token
    assert password_hash.startswith("$argon2") and "a-long-password" not in password_hash

    revoked = papcad(["apikey", "revoke", "--name", "LIS-main"], env)
    missing = papcad(["apikey", "revoke", "--name", "nope"], env)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert missing.returncode == 2 and "no API client" in missing.stderr
