"""Users (people, with roles) and API clients (systems, with hashed keys): sign-in with its
throttling, password policy, and the audit of every refused credential."""

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.models import ApiClient, LoginFailure, User, utcnow
from app.domain import ActorKind
from app.errors import AuthenticationError, ConflictError, InputError, NotFoundError, PapcadError, PermissionDeniedError
from app.roles import Role
from app.security import (
    DUMMY_PASSWORD_HASH,
    api_key_lookup,
    api_key_matches,
    hash_password,
    new_api_key,
    password_problem,
    verify_password,
)
from app.services import audit, web_sessions
from app.services.actors import ANONYMOUS, SYSTEM, Actor


class SignInThrottledError(PapcadError):
    """Too many failed sign-ins for this account or from this address: refused unchecked (HTTP 429)."""

    def __init__(self, retry_after: int):
        minutes = max(1, math.ceil(retry_after / 60))
        super().__init__(
            f"too many failed sign-ins; wait {minutes} minute{'s' if minutes > 1 else ''} before trying again"
        )
        self.retry_after = retry_after


@dataclass(frozen=True)
class ThrottlePolicy:
    max_per_account: int
    max_per_address: int
    window: timedelta

    @classmethod
    def of(cls, settings: Settings) -> "ThrottlePolicy":
        return cls(
            settings.login_max_failures_per_account,
            settings.login_max_failures_per_address,
            timedelta(seconds=settings.login_failure_window_seconds),
        )


def check_password_policy(password: str, username: str) -> None:
    problem = password_problem(password, username)
    if problem:
        raise InputError(problem)


def _require_admin(actor: Actor) -> None:
    if actor is not SYSTEM and not actor.is_admin:
        raise PermissionDeniedError("only an administrator may manage users and API keys")


def create_user(session: Session, actor: Actor, username: str, password: str, role: str) -> User:
    _require_admin(actor)
    username = username.strip()
    if not username or len(username) > 64 or not username.replace(".", "").replace("-", "").replace("_", "").isalnum():
        raise InputError("username must be 1-64 letters, digits, '.', '-' or '_'")
    if role not in {r.value for r in Role}:
        raise InputError(f"role must be one of: {', '.join(r.value for r in Role)}")
    check_password_policy(password, username)
    if session.scalar(select(User).where(User.username == username)):
        raise ConflictError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(f"user {username!r} already exists") from exc
    audit.record(session, actor, "user.create", "user", user.id, username=username, role=role)
    session.commit()
    return user


def sign_in(
    session: Session,
    username: str,
    password: str,
    address: str,
    throttle: ThrottlePolicy,
    sessions: web_sessions.SessionPolicy,
) -> tuple[User, str]:
    """Check the password and open a browser session; returns (user, cookie token).

    Too many recent failures for the account or from the address: SignInThrottledError, without
    checking the password. A wrong password or unknown user: AuthenticationError (the same message
    either way). Every outcome is audited and committed; a success clears the account's failures.
    """
    username = username.strip()[:64]
    now = utcnow()
    wait = max(
        _retry_after(session, LoginFailure.username == username, throttle.max_per_account, throttle.window, now),
        _retry_after(session, LoginFailure.address == address, throttle.max_per_address, throttle.window, now),
    )
    if wait:
        actor = Actor(ActorKind.USER, None, username)
        audit.record(session, actor, "login.throttled", "user", None, address=address, retry_after=wait)
        session.commit()
        raise SignInThrottledError(wait)
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.active:
        verify_password(DUMMY_PASSWORD_HASH, password)
        ok = False
    else:
        ok = verify_password(user.password_hash, password)
    actor = Actor(ActorKind.USER, user.id if user else None, username)
    if not ok or user is None:  # never ok without a user
        session.execute(delete(LoginFailure).where(LoginFailure.at < now - throttle.window))
        session.add(LoginFailure(at=now, username=username, address=address[:64]))
        audit.record(session, actor, "login.failure", "user", user.id if user else None, address=address)
        session.commit()
        raise AuthenticationError("wrong username or password")
    session.execute(delete(LoginFailure).where(LoginFailure.username == username))
    token = web_sessions.open_session(session, user, sessions, address)
    audit.record(session, actor, "login.success", "user", user.id, address=address)
    session.commit()
    return user, token


def _retry_after(session: Session, matches: ColumnElement[bool], limit: int, window: timedelta, now: datetime) -> int:
    """Seconds until fewer than `limit` failures matching remain in the window (0: not throttled)."""
    query = (
        select(LoginFailure.at)
        .where(matches, LoginFailure.at > now - window)
        .order_by(LoginFailure.at.desc())
        .offset(limit - 1)
        .limit(1)
    )
    at = session.scalar(query)
    return 0 if at is None else max(1, math.ceil((at + window - now).total_seconds()))


def set_user_active(session: Session, actor: Actor, username: str, active: bool) -> User:
    """Deactivate (or reactivate) a user: a deactivated user cannot sign in, and open sessions end."""
    _require_admin(actor)
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFoundError(f"no user named {username!r}")
    if actor.kind == ActorKind.USER and actor.id == user.id and not active:
        raise InputError("you cannot deactivate your own account")
    if user.active != active:
        user.active = active
        ended = 0 if active else web_sessions.revoke_all(session, user.id)
        action = "user.activate" if active else "user.deactivate"
        audit.record(session, actor, action, "user", user.id, sessions_ended=ended)
        session.commit()
    return user


def set_password(session: Session, actor: Actor, username: str, password: str) -> User:
    """Give a user a new password (policy-checked); every open session of theirs ends."""
    _require_admin(actor)
    user = session.scalar(select(User).where(User.username == username.strip()))
    if user is None:
        raise NotFoundError(f"no user named {username!r}")
    check_password_policy(password, user.username)
    user.password_hash = hash_password(password)
    ended = web_sessions.revoke_all(session, user.id)
    audit.record(session, actor, "user.password", "user", user.id, sessions_ended=ended)
    session.commit()
    return user


def change_own_password(session: Session, actor: Actor, current: str, new: str) -> User:
    """A signed-in person changes their own password: the current one first. Every session of theirs
    ends, this one included, so a stolen cookie stops working too."""
    user = session.get(User, actor.id) if actor.kind == ActorKind.USER else None
    if user is None:
        raise PermissionDeniedError("only a signed-in person can change their password")
    if not verify_password(user.password_hash, current):
        audit.record_apart(session, actor, "user.password.refused", "user", user.id)
        raise InputError("the current password is wrong")
    check_password_policy(new, user.username)
    user.password_hash = hash_password(new)
    ended = web_sessions.revoke_all(session, user.id)
    audit.record(session, actor, "user.password.change", "user", user.id, sessions_ended=ended)
    session.commit()
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def create_api_client(session: Session, actor: Actor, name: str) -> tuple[ApiClient, str]:
    """Create a client and return it with its key; the key is not stored and cannot be shown again."""
    _require_admin(actor)
    name = name.strip()
    if not name or len(name) > 64:
        raise InputError("API client name must be 1-64 characters")
    if session.scalar(select(ApiClient).where(ApiClient.name == name)):
        raise ConflictError(f"an API client named {name!r} already exists")
    key, lookup, key_hash = new_api_key()
    client = ApiClient(
        name=name,
        key_prefix=lookup,
        key_hash=key_hash,
        created_by_id=actor.id if actor.kind == ActorKind.USER else None,
    )
    session.add(client)
    session.flush()
    audit.record(session, actor, "apikey.create", "api_client", client.id, name=name)
    session.commit()
    return client, key


def revoke_api_client(session: Session, actor: Actor, name: str) -> ApiClient:
    _require_admin(actor)
    client = session.scalar(select(ApiClient).where(ApiClient.name == name))
    if client is None:
        raise NotFoundError(f"no API client named {name!r}")
    if client.revoked_at is None:
        client.revoked_at = utcnow()
        audit.record(session, actor, "apikey.revoke", "api_client", client.id, name=name)
        session.commit()
    return client


def list_api_clients(session: Session) -> list[ApiClient]:
    return list(session.scalars(select(ApiClient).order_by(ApiClient.name)))


def client_for_key(session: Session, key: str, address: str | None = None) -> ApiClient:
    """The active client owning this key, else AuthenticationError. A refused key is audited in its
    own transaction with its lookup prefix (never the secret) and the caller's address."""
    lookup = api_key_lookup(key)
    client = session.scalar(select(ApiClient).where(ApiClient.key_prefix == lookup)) if lookup else None
    if client is None or not api_key_matches(key, client.key_hash):
        authentication_failed(session, "apikey", "unknown or malformed API key", address, key_prefix=lookup)
        raise AuthenticationError("the API key is not valid")
    if client.revoked_at is not None:
        authentication_failed(
            session, "apikey", "revoked API key", address, key_prefix=lookup, actor=Actor.of_client(client)
        )
        raise AuthenticationError("the API key has been revoked")
    return client


def authentication_failed(
    session: Session, method: str, reason: str, address: str | None, actor: Actor = ANONYMOUS, **detail: object
) -> None:
    """Audit a refused credential at once, in its own transaction (the request itself fails)."""
    detail.update(method=method, reason=reason, address=address)
    audit.record_apart(session, actor, "auth.failure", None, None, **detail)
