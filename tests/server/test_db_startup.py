"""An unreachable database at start-up: retried for PAPCAD_DB_STARTUP_TIMEOUT_SECONDS with one log
line per attempt, then one clear error line and a non-zero exit, never a driver traceback."""

import logging
import os
import socket
import subprocess
import sys

import pytest

from app.db.startup import DatabaseUnavailableError, wait_for_database


def unreachable_url() -> str:
    """A PostgreSQL URL on a local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql+psycopg://papcad:secret-pw@127.0.0.1:{port}/papcad"


def test_an_unreachable_database_is_retried_then_reported_in_one_line(caplog):
    caplog.set_level(logging.WARNING, logger="papcad")
    with pytest.raises(DatabaseUnavailableError) as raised:
        wait_for_database(unreachable_url(), timeout_seconds=1.0, interval_seconds=0.2)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("cannot reach the database")
    assert "secret-pw" not in message  # the password is never shown
    attempts = [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]
    assert len(attempts) >= 2 and all("\n" not in line for line in attempts)
    assert "attempt 1" in attempts[0] and "attempt 2" in attempts[1]


def test_a_reachable_database_and_sqlite_return_at_once(database_url):
    wait_for_database(database_url, timeout_seconds=0)


@pytest.mark.cli
@pytest.mark.parametrize("command", ["migrate", "serve", "worker"])
def test_commands_exit_with_one_line_when_the_database_stays_away(command, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": unreachable_url(),
        "PAPCAD_DATA_DIR": str(tmp_path),
        "PAPCAD_DB_STARTUP_TIMEOUT_SECONDS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", command], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "reach" in line]
    assert lines[-1].startswith("error: cannot reach the database"), result.stderr
    assert any("not reachable (attempt 1" in line for line in lines), result.stderr
