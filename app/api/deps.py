"""Request dependencies: the database session, and who is calling (API key or signed-in user)."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db.models import User
from app.errors import AuthenticationError, PermissionDeniedError
from app.security import csrf_matches
from app.services.accounts import client_for_key
from app.services.actors import Actor

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def get_context(request: Request) -> AppContext:
    return request.app.state.context


def get_session(context: Annotated[AppContext, Depends(get_context)]) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


def session_user(request: Request, session: Session) -> User | None:
    """The active user of the browser session, if any."""
    user_id = request.session.get("user_id")
    if user_id is None:
        return None
    user = session.get(User, user_id)
    if user is None or not user.active:
        request.session.clear()
        return None
    return user


def get_actor(request: Request, session: Annotated[Session, Depends(get_session)]) -> Actor:
    """API callers use `Authorization: Bearer <key>`; a signed-in browser may use its session,
    with the X-CSRF-Token header on anything that changes data."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("use 'Authorization: Bearer <API key>'")
        return Actor.of_client(client_for_key(session, key.strip()))
    user = session_user(request, session)
    if user is None:
        raise AuthenticationError("authentication required: send 'Authorization: Bearer <API key>'")
    if request.method not in SAFE_METHODS and not csrf_matches(
        request.session.get("csrf"), request.headers.get("x-csrf-token")
    ):
        raise PermissionDeniedError("missing or wrong X-CSRF-Token header for a browser session")
    return Actor.of_user(user)


SessionDep = Annotated[Session, Depends(get_session)]
ActorDep = Annotated[Actor, Depends(get_actor)]
ContextDep = Annotated[AppContext, Depends(get_context)]
