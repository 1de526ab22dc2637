"""Request dependencies shared by the REST API and the pages: the app context, the database session,
and who is calling (API key or signed-in user)."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db.models import User
from app.errors import AuthenticationError, PermissionDeniedError
from app.http import sessions as browser_sessions
from app.security import csrf_matches
from app.services.accounts import authentication_failed, client_for_key
from app.services.actors import Actor

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


def get_session(context: Annotated[AppContext, Depends(get_context)]) -> Iterator[Session]:
    with context.sessions() as session:
        yield session


def session_user(request: Request, session: Session) -> User | None:
    """The active user of the browser's server-side session, if any (revoked, expired or idle
    sessions are refused, audited, and their cookie cleared)."""
    found = browser_sessions.current(request, session)
    return found.user if found is not None else None


def get_actor(request: Request, session: Annotated[Session, Depends(get_session)]) -> Actor:
    """API callers use `Authorization: Bearer <key>`; a signed-in browser may use its session,
    with the X-CSRF-Token header on anything that changes data."""
    authorization = request.headers.get("authorization")
    address = browser_sessions.client_address(request)
    if authorization:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            authentication_failed(session, "apikey", "malformed Authorization header", address)
            raise AuthenticationError("use 'Authorization: Bearer <API key>'")
        return Actor.of_client(client_for_key(session, key.strip(), address))
    user = session_user(request, session)
    if user is None:
        raise AuthenticationError("authentication required: send 'Authorization: Bearer <API key>'")
    if request.method not in SAFE_METHODS and not csrf_matches(
        browser_sessions.expected_csrf(request, session), request.headers.get("x-csrf-token")
    ):
        raise PermissionDeniedError("missing or wrong X-CSRF-Token header for a browser session")
    return Actor.of_user(user)


def release(session: Session) -> None:
    """End the session's transaction so its pooled connection goes back at once: a request must
    not hold one while it reads an upload, waits for the model or for a second connection. The
    session stays usable (loaded objects are kept) and checks a connection out again if used."""
    session.commit()


def get_released_actor(request: Request, session: Annotated[Session, Depends(get_session)]) -> Actor:
    """The caller (see get_actor), with the request's connection back in the pool."""
    actor = get_actor(request, session)
    release(session)
    return actor


SessionDep = Annotated[Session, Depends(get_session)]
ActorDep = Annotated[Actor, Depends(get_released_actor)]
ContextDep = Annotated[AppContext, Depends(get_context)]
