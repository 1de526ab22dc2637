"""Request-body limits, enforced as the body streams in: before any parsing or authentication.

A body is refused with 413 as soon as it is known to be too big: at once when its Content-Length
says so, or on the chunk that passes the limit when it streams without one. Upload routes also
refuse a request that carries no credentials at all (no Authorization header, no session cookie)
before reading a byte of its body, so an anonymous client cannot make the server spool a large file.
"""

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import RedirectResponse, Response

from app.api.problems import problem
from app.config import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Multipart boundaries, part headers and the small text fields that travel with one image.
MULTIPART_OVERHEAD = 64 * 1024


@dataclass(frozen=True)
class UploadRoute:
    kind: str  # "image" (one cell) or "batch" (many cells, or one zip)
    api: bool  # REST (problem+json, 401) or page (redirect to the sign-in page)


UPLOAD_ROUTES: dict[tuple[str, str], UploadRoute] = {
    ("POST", "/api/v1/predictions"): UploadRoute("image", api=True),
    ("POST", "/api/v1/batches"): UploadRoute("batch", api=True),
    ("POST", "/upload"): UploadRoute("image", api=False),
    ("POST", "/batches"): UploadRoute("batch", api=False),
}


class BodyTooLarge(Exception):
    """Raised into the application when the streamed body passes its limit."""


class RequestBodyLimit:
    """Pure ASGI middleware: per-route body limits and the credential check for uploads."""

    def __init__(self, app: ASGIApp, settings: Settings, session_cookie: str = "papcad_session"):
        self.app = app
        self.session_cookie = session_cookie
        self.limits = {
            "image": settings.max_upload_bytes + MULTIPART_OVERHEAD,
            "batch": settings.max_batch_upload_bytes,
        }
        self.default_limit = settings.max_request_bytes

    def route_of(self, scope: Scope) -> UploadRoute | None:
        path = scope["path"].rstrip("/") or "/"
        return UPLOAD_ROUTES.get((scope["method"], path))

    def limit_for(self, route: UploadRoute | None) -> int:
        return self.limits[route.kind] if route else self.default_limit

    def has_credentials(self, headers: Headers) -> bool:
        """Presence only: the application checks the key or session itself once the body is read."""
        if headers.get("authorization"):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no credential
            return False
        return self.session_cookie in cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        route = self.route_of(scope)
        limit = self.limit_for(route)
        if route is not None and not self.has_credentials(headers):
            await _unauthenticated(route)(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _closing(problem(400, "the Content-Length header is not a number"))(scope, receive, send)
                return
            if int(declared) > limit:
                await _too_large(limit)(scope, receive, send)
                return
        await self._limited(scope, receive, send, limit)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Count the body as it arrives; past the limit, stop reading and answer 413 instead."""
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the application made of the cut-off body, the answer is 413
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _too_large(limit)(scope, receive, send)


def _closing(response: Response) -> Response:
    """The body was not (fully) read: the connection cannot carry another request."""
    response.headers["Connection"] = "close"
    return response


def _too_large(limit: int) -> Response:
    return _closing(problem(413, f"the request body is over the limit of {limit:,} bytes for this route"))


def _unauthenticated(route: UploadRoute) -> Response:
    if not route.api:
        return _closing(RedirectResponse("/login", status_code=303))
    return _closing(
        problem(
            401,
            "authentication required: send 'Authorization: Bearer <API key>'",
            {"WWW-Authenticate": 'Bearer realm="papcad"'},
        )
    )
