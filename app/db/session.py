"""Engine and session factory for the configured database (SQLite file or PostgreSQL)."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, pool_size: int = 5, max_overflow: int = 10, pool_timeout: float = 30) -> Engine:
    """An engine whose pool is sized for the process (settings.pool_size, max_overflow, pool_timeout).

    A checkout that waits longer than pool_timeout raises sqlalchemy.exc.TimeoutError, which the
    server answers with 503 and Retry-After.
    """
    pool = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": pool_timeout}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def make_probe_engine(url: str, timeout_seconds: float = 0.5) -> Engine:
    """A one-connection engine for health checks and metrics: never waits on the shared pool, and
    gives up within about timeout_seconds (checkout and, on PostgreSQL, connect)."""
    wait = max(1, round(timeout_seconds))
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": timeout_seconds},
            pool_size=1,
            max_overflow=0,
            pool_timeout=timeout_seconds,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=timeout_seconds,
        pool_pre_ping=True,
        connect_args={"connect_timeout": wait},
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
