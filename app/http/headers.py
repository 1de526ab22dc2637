"""Security headers on every response: a strict Content-Security-Policy with a per-request nonce
for the pages' own <script> and <style> elements, no framing, no sniffing, no referrer, and
`Cache-Control: no-store` on everything but static files (pages, images and heatmaps carry
patient data)."""

import secrets

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

NONCE = "csp_nonce"

# Style attributes (bar widths, table shading) cannot carry a nonce; they cannot run code either.
PAGE_CSP = (
    "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; "
    "style-src-attr 'unsafe-inline'; img-src 'self' data: blob:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
# /docs and /redoc: Swagger UI and ReDoc from this server's own files (fastapi-offline), started by an
# inline script FastAPI writes without a nonce; ReDoc runs a web worker from a blob.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'self'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")
CACHEABLE_PREFIXES = ("/static/", "/static-offline-docs/")

FIXED = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def csp_nonce(request: Request) -> dict[str, str]:
    """Jinja context processor: `{{ csp_nonce }}` for the pages' <script> and <style> elements."""
    return {NONCE: request.scope.get("state", {}).get(NONCE, "")}


class SecurityHeaders:
    """ASGI middleware adding the headers to every HTTP response, error pages included."""

    def __init__(self, app: ASGIApp, hsts: bool = False) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = secrets.token_urlsafe(18)
        scope.setdefault("state", {})[NONCE] = nonce
        path: str = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                docs = path.startswith(DOCS_PATHS)
                headers["Content-Security-Policy"] = DOCS_CSP if docs else PAGE_CSP.format(nonce=nonce)
                for name, value in FIXED.items():
                    headers[name] = value
                if not path.startswith(CACHEABLE_PREFIXES):
                    headers["Cache-Control"] = "no-store"
                    headers["Pragma"] = "no-cache"
                if self.hsts:
                    headers["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)

        await self.app(scope, receive, send_with_headers)
