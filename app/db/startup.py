"""Wait for the database at start-up: containers start in any order, so a server, worker or
migration retries an unreachable database for a while, one log line per attempt, then gives up
with one clear line instead of a driver traceback."""

import logging
import time
from collections.abc import Callable

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.errors import PapcadError

log = logging.getLogger("papcad")


class DatabaseUnavailableError(PapcadError):
    """The database could not be reached within the start-up timeout."""


def _one_line(exc: Exception) -> str:
    """The driver's own reason, first line only (SQLAlchemy appends SQL and a help link)."""
    reason = str(getattr(exc, "orig", None) or exc).strip()
    return reason.splitlines()[0] if reason else type(exc).__name__


def wait_for_database(
    url: str,
    timeout_seconds: float,
    interval_seconds: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once `SELECT 1` succeeds; raise DatabaseUnavailableError when timeout_seconds have passed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return  # a file beside the server: nothing to wait for (and its errors are not transient)
    shown = parsed.render_as_string(hide_password=True)
    deadline = time.monotonic() + timeout_seconds
    attempt = 0
    while True:
        attempt += 1
        # A host that drops packets would otherwise hold one attempt for minutes.
        engine = create_engine(
            url, connect_args={"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {}
        )
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return
        except (SQLAlchemyError, OSError) as exc:
            reason = _one_line(exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseUnavailableError(
                    f"cannot reach the database {shown} after {attempt} attempt(s) in {timeout_seconds:g} s: {reason}"
                ) from None
            log.warning(
                "database %s not reachable (attempt %d, retrying for %.0f s more): %s",
                *(shown, attempt, remaining, reason),
            )
            sleep(min(interval_seconds, remaining))
        finally:
            engine.dispose()
