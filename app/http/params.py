"""Bounded integer parameters: ids and offsets the databases can hold (PostgreSQL INTEGER is 32-bit).

An id or offset outside the range is refused as invalid input (422), never sent to the database,
where it would overflow on PostgreSQL (or SQLite, past 2^63) and fail as a server error.
"""

from typing import Annotated

from fastapi import Path, Query

MAX_DB_INT = 2**31 - 1

RecordId = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="Record id.")]
Offset = Annotated[int, Query(ge=0, le=MAX_DB_INT, description="Rows to skip.")]


def bounded_id(value: str | None) -> int | None:
    """An id from free text (a query string), or None when it is not one the database can hold."""
    if value is None or not value.isdigit() or not value.isascii():
        return None
    number = int(value)
    return number if 1 <= number <= MAX_DB_INT else None
