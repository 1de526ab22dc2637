"""Errors as RFC 9457 `application/problem+json` for the API, plain pages for the browser."""

from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors
from app.http.sessions import signed_in_csrf

STATUS_FOR_ERROR: list[tuple[type[errors.PapcadError], int]] = [
    (errors.ImageTooLargeError, 413),
    (errors.InvalidImageError, 422),
    (errors.InputError, 422),
    (errors.NotFoundError, 404),
    (errors.PermissionDeniedError, 403),
    (errors.AuthenticationError, 401),
    (errors.ConflictError, 409),
]


def status_for(exc: errors.PapcadError) -> int:
    return next((status for kind, status in STATUS_FOR_ERROR if isinstance(exc, kind)), 400)


def problem(status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith(("/api/", "/healthz", "/readyz", "/docs", "/openapi"))


def _respond(
    request: Request, status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    if _wants_html(request):
        if status == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)
        templates: Jinja2Templates = request.app.state.templates
        # The signed-in user, when the page's own dependency found one, keeps the menu on error pages.
        actor = getattr(request.state, "actor", None)
        return templates.TemplateResponse(
            request,
            "error.html",
            {
                "status": status,
                "title": HTTPStatus(status).phrase,
                "detail": detail,
                "actor": actor,
                "csrf": signed_in_csrf(request) if actor else "",
            },
            status_code=status,
        )
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="papcad"'}
    return problem(status, detail, headers, **extra)


def _field_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "header", "path")),
            "message": err["msg"],
        }
        for err in exc.errors()
    ]


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.PapcadError)
    async def _domain(request: Request, exc: errors.PapcadError) -> Response:
        return _respond(request, status_for(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return _respond(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        fields = _field_errors(exc)
        detail = "; ".join(f"{f['field'] or 'request'}: {f['message']}" for f in fields)
        return _respond(request, 422, f"invalid request: {detail}", errors=fields)
