"""Browser sessions kept in the database: sign-in opens one, sign-out or an administrator ends it.

The browser holds only a random token; the table holds its SHA-256, so a copied cookie stops
working as soon as its row is revoked, and a leaked table does not give working cookies.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import User, UserSession, utcnow
from app.domain import ActorKind
from app.security import hash_session_token, new_csrf_token, new_session_token
from app.services import audit
from app.services.actors import ANONYMOUS, Actor

TOUCH_EVERY = timedelta(seconds=60)  # last_seen_at is written at most this often per session


@dataclass(frozen=True)
class SessionPolicy:
    max_age: timedelta  # from sign-in, however active
    idle: timedelta  # since the last request

    @classmethod
    def of(cls, settings: Settings) -> "SessionPolicy":
        return cls(
            timedelta(seconds=settings.session_max_age_seconds), timedelta(seconds=settings.session_idle_seconds)
        )


def open_session(session: Session, user: User, policy: SessionPolicy, address: str | None) -> str:
    """Add a session row for the user to the caller's transaction; returns the cookie token."""
    token, token_hash = new_session_token()
    now = utcnow()
    session.execute(delete(UserSession).where(UserSession.expires_at < now))  # past their maximum age: dead
    session.add(
        UserSession(
            token_hash=token_hash,
            user_id=user.id,
            csrf_token=new_csrf_token(),
            address=(address or "")[:64] or None,
            created_at=now,
            last_seen_at=now,
            expires_at=now + policy.max_age,
        )
    )
    return token


def refusal(row: UserSession | None, policy: SessionPolicy, now: datetime) -> str | None:
    """Why this session may not be used now, or None if it is live."""
    if row is None:
        return "unknown session"
    if row.revoked_at is not None:
        return "session ended"
    if now >= row.expires_at:
        return "session expired"
    if now >= row.last_seen_at + policy.idle:
        return "session idle too long"
    if not row.user.active:
        return "user deactivated"
    return None


def resolve(session: Session, token: str, policy: SessionPolicy, address: str | None) -> UserSession | None:
    """The live session for a cookie token, else None; a refused cookie is audited in its own
    transaction. One indexed lookup; last_seen_at is refreshed at most once a minute."""
    row = session.scalar(select(UserSession).where(UserSession.token_hash == hash_session_token(token)))
    now = utcnow()
    reason = refusal(row, policy, now)
    if reason is not None or row is None:  # refusal() names a reason for every missing row
        actor = Actor(ActorKind.USER, row.user_id, row.user.username) if row else ANONYMOUS
        detail = {"method": "session", "reason": reason, "address": address}
        audit.record_apart(session, actor, "auth.failure", "user", row.user_id if row else None, **detail)
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        row.last_seen_at = now
        session.commit()
    return row


def end_session(session: Session, token: str | None, address: str | None) -> None:
    """Sign-out: revoke the session at once, so a copy of the cookie no longer works."""
    row = session.scalar(select(UserSession).where(UserSession.token_hash == hash_session_token(token or "")))
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        actor = Actor(ActorKind.USER, row.user_id, row.user.username)
        audit.record(session, actor, "logout", "user", row.user_id, address=address)
    session.commit()


def revoke_all(session: Session, user_id: int) -> int:
    """End every open session of a user (deactivation, new password), in the caller's transaction."""
    result = session.execute(
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount or 0  # an UPDATE answers with a CursorResult
