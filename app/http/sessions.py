"""Browser session cookies: the opaque token of a server-side session, and a CSRF cookie for the
forms shown before sign-in.

The session itself lives in the database (app.services.web_sessions). Routes and dependencies
ask for cookies to be set or cleared; `SessionCookies` adds them to whatever response goes out,
error pages and redirects included.
"""

from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.db.models import UserSession
from app.security import new_csrf_token
from app.services import web_sessions

SESSION_COOKIE = "papcad_session"
CSRF_COOKIE = "papcad_csrf"  # double-submit token for forms shown before sign-in (the sign-in form)
_PENDING = "papcad_set_cookies"
LOOKED_UP = "papcad_web_session"


def client_address(request: Request) -> str:
    """The caller's address (uvicorn resolves X-Forwarded-For only from trusted proxies)."""
    return request.client.host if request.client else "unknown"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.context.settings
    return settings


def current(request: Request, session: Session) -> UserSession | None:
    """The live server-side session of this browser, looked up once per request."""
    state = request.scope.setdefault("state", {})
    if LOOKED_UP not in state:
        token = request.cookies.get(SESSION_COOKIE)
        found = None
        if token:
            policy = web_sessions.SessionPolicy.of(_settings(request))
            found = web_sessions.resolve(session, token, policy, client_address(request))
            if found is None:
                _queue(request, _cookie(SESSION_COOKIE, "", 0, _settings(request)))
        state[LOOKED_UP] = found
    looked_up: UserSession | None = state[LOOKED_UP]
    return looked_up


def signed_in_csrf(request: Request) -> str | None:
    """The CSRF token of the session already looked up for this request (by the page's actor), if any."""
    found = request.scope.get("state", {}).get(LOOKED_UP)
    return found.csrf_token if found is not None else None


def session_token(request: Request) -> str | None:
    return request.cookies.get(SESSION_COOKIE)


def start(request: Request, token: str) -> None:
    """Give the browser its new session token (after sign-in)."""
    settings = _settings(request)
    _queue(request, _cookie(SESSION_COOKIE, token, settings.session_max_age_seconds, settings))
    request.scope.setdefault("state", {})[LOOKED_UP] = None  # the old session, if any, is not this one


def clear(request: Request) -> None:
    """Remove the session token from the browser (after sign-out)."""
    _queue(request, _cookie(SESSION_COOKIE, "", 0, _settings(request)))


def anonymous_csrf(request: Request) -> str:
    """The CSRF token of a browser that is not signed in, set as a cookie on first use."""
    token = request.cookies.get(CSRF_COOKIE)
    state = request.scope.setdefault("state", {})
    if not token:
        token = state.get(CSRF_COOKIE)
        if token is None:
            token = state[CSRF_COOKIE] = new_csrf_token()
            _queue(request, _cookie(CSRF_COOKIE, token, None, _settings(request)))
    return token


def expected_csrf(request: Request, session: Session) -> str | None:
    """The token a form or X-CSRF-Token header must carry: the session's, or before sign-in the cookie's."""
    found = current(request, session)
    return found.csrf_token if found is not None else request.cookies.get(CSRF_COOKIE)


def _cookie(name: str, value: str, max_age: int | None, settings: Settings) -> str:
    response = Response()
    response.set_cookie(
        name, value, max_age=max_age, path="/", httponly=True, samesite="lax", secure=settings.cookie_secure
    )
    return response.headers["set-cookie"]


def _queue(request: Request, header: str) -> None:
    request.scope.setdefault("state", {}).setdefault(_PENDING, []).append(header)


class SessionCookies:
    """ASGI middleware: adds the Set-Cookie headers queued during the request to its response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def send_with_cookies(message: Message) -> None:
            if message["type"] == "http.response.start":
                pending = state.get(_PENDING) or []
                if pending:
                    message["headers"] = [*message.get("headers", []), *((b"set-cookie", c.encode()) for c in pending)]
            await send(message)

        await self.app(scope, receive, send_with_cookies)
