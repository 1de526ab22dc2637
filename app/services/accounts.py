"""Users (people, with roles) and API clients (systems, with hashed keys)."""

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import ApiClient, User, utcnow
from app.errors import AuthenticationError, ConflictError, InputError, NotFoundError, PermissionDeniedError
from app.roles import Role
from app.security import (
    DUMMY_PASSWORD_HASH,
    MIN_PASSWORD_LENGTH,
    api_key_lookup,
    api_key_matches,
    hash_password,
    new_api_key,
    verify_password,
)
from app.services import audit
from app.services.actors import SYSTEM, Actor


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
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InputError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if session.scalar(select(User).where(User.username == username)):
        raise ConflictError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:
        raise ConflictError(f"user {username!r} already exists") from exc
    audit.record(session, actor, "user.create", "user", user.id, username=username, role=role)
    return user


def authenticate_user(session: Session, username: str, password: str) -> User:
    """The active user with this password, else AuthenticationError (same message either way)."""
    user = session.scalar(select(User).where(User.username == username.strip()))
    if user is None or not user.active:
        verify_password(DUMMY_PASSWORD_HASH, password)
        ok = False
    else:
        ok = verify_password(user.password_hash, password)
    audit.record(
        session,
        Actor("user", user.id if user else None, username[:64]),
        "login.success" if ok else "login.failure",
        "user",
        user.id if user else None,
    )
    if not ok:
        raise AuthenticationError("wrong username or password")
    return user


def set_user_active(session: Session, actor: Actor, username: str, active: bool) -> User:
    """Deactivate (or reactivate) a user: a deactivated user cannot sign in, and open sessions end."""
    _require_admin(actor)
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFoundError(f"no user named {username!r}")
    if actor.kind == "user" and actor.id == user.id and not active:
        raise InputError("you cannot deactivate your own account")
    if user.active != active:
        user.active = active
        audit.record(session, actor, "user.activate" if active else "user.deactivate", "user", user.id)
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
        name=name, key_prefix=lookup, key_hash=key_hash, created_by_id=actor.id if actor.kind == "user" else None
    )
    session.add(client)
    session.flush()
    audit.record(session, actor, "apikey.create", "api_client", client.id, name=name)
    return client, key


def revoke_api_client(session: Session, actor: Actor, name: str) -> ApiClient:
    _require_admin(actor)
    client = session.scalar(select(ApiClient).where(ApiClient.name == name))
    if client is None:
        raise NotFoundError(f"no API client named {name!r}")
    if client.revoked_at is None:
        client.revoked_at = utcnow()
        audit.record(session, actor, "apikey.revoke", "api_client", client.id, name=name)
    return client


def list_api_clients(session: Session) -> list[ApiClient]:
    return list(session.scalars(select(ApiClient).order_by(ApiClient.name)))


def client_for_key(session: Session, key: str) -> ApiClient:
    """The active client owning this key, else AuthenticationError."""
    lookup = api_key_lookup(key)
    client = session.scalar(select(ApiClient).where(ApiClient.key_prefix == lookup)) if lookup else None
    if client is None or not api_key_matches(key, client.key_hash):
        raise AuthenticationError("the API key is not valid")
    if client.revoked_at is not None:
        raise AuthenticationError("the API key has been revoked")
    return client
