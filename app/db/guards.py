"""A last line of defence for text bound for the database: no NUL characters.

PostgreSQL cannot store NUL in text and its driver fails with a server error; SQLite stores it and
every later reader trips on it. Fields with their own rules (accession ids, usernames, file names,
comments) refuse or clean control characters with a precise message first; this guard catches any
other text a client manages to send, and answers 422 on both databases alike.
"""

from typing import Any

from sqlalchemy import Engine, event

from app.errors import InputError


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    wrapped = getattr(value, "obj", None)  # psycopg's Json wrapper around a JSON column's value
    return wrapped is not None and _has_nul(wrapped)


def refuse_nul_text(engine: Engine) -> None:
    """Make every statement on this engine raise InputError when a bound text value holds NUL."""

    @event.listens_for(engine, "before_cursor_execute")
    def _check(connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if _has_nul(parameters):
            raise InputError("text must not contain NUL characters")
