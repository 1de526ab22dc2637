"""HTML pages. Forms post back here; every change checks the session's CSRF token."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.context import AppContext
from app.db.models import Prediction
from app.domain import PredictionSource
from app.errors import AuthenticationError, ConflictError, InputError, PapcadError, PermissionDeniedError
from app.http import sessions as browser_sessions
from app.http.deps import ContextDep, SessionDep, release, session_user
from app.http.params import RecordId
from app.ml.classes import BETHESDA_HINT, CLASS_LABELS, CLASS_NAMES, NORMAL_CLASSES
from app.roles import Role
from app.security import csrf_matches
from app.services import accounts, registry, reviews, web_sessions
from app.services import predictions as service
from app.services.actors import Actor
from app.services.text import strip_control_characters

router = APIRouter(include_in_schema=False)


def csrf_token(request: Request) -> str:
    """The signed-in session's CSRF token (looked up already by the page's actor), else the
    sign-in form's cookie token."""
    return browser_sessions.signed_in_csrf(request) or browser_sessions.anonymous_csrf(request)


def check_csrf(request: Request, session: SessionDep, csrf: Annotated[str | None, Form()] = None) -> None:
    if not csrf_matches(browser_sessions.expected_csrf(request, session), csrf):
        raise PermissionDeniedError("the form has expired or did not come from this site; reload the page and retry")


def page_actor(request: Request, session: SessionDep) -> Actor:
    user = session_user(request, session)
    if user is None:
        raise AuthenticationError("sign in first")
    release(session)
    actor = Actor.of_user(user)
    request.state.actor = actor  # error pages (403, 404) show the signed-in menu too
    return actor


PageActor = Annotated[Actor, Depends(page_actor)]
CsrfChecked = Depends(check_csrf)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("actor", None)
    context.update(
        csrf=csrf_token(request), class_names=CLASS_NAMES, class_labels=CLASS_LABELS, normal_classes=NORMAL_CLASSES
    )
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, template, context, status_code=status_code)


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login")
def login_page(
    request: Request, session: SessionDep, next: str | None = None, changed: str | None = None
) -> HTMLResponse:
    browser_sessions.current(request, session)  # a signed-in browser's form carries its session's token
    message = "Your password was changed: sign in with the new one." if changed else None
    return render(request, "login.html", next=_safe_next(next), message=message)


@router.post("/login", dependencies=[CsrfChecked])
def login(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str | None, Form()] = None,
) -> Response:
    settings = context.settings
    address = browser_sessions.client_address(request)
    throttle, lifetime = accounts.ThrottlePolicy.of(settings), web_sessions.SessionPolicy.of(settings)
    try:
        _, token = accounts.sign_in(session, username, password, address, throttle, lifetime)
    except accounts.SignInThrottledError as exc:
        response = render(request, "login.html", 429, error=str(exc), next=_safe_next(next), username=username)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except AuthenticationError as exc:
        return render(request, "login.html", status_code=401, error=str(exc), next=_safe_next(next), username=username)
    browser_sessions.start(request, token)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", dependencies=[CsrfChecked])
def logout(request: Request, session: SessionDep) -> RedirectResponse:
    """End the session in the database too, so a copy of the cookie stops working at once."""
    web_sessions.end_session(session, browser_sessions.session_token(request), browser_sessions.client_address(request))
    browser_sessions.clear(request)
    return RedirectResponse("/login", status_code=303)


def _home_view(request: Request, session: Session, actor: Actor, status_code: int = 200, **extra: Any) -> HTMLResponse:
    """The upload form and the 20 newest results."""
    recent = service.recent(session, actor)
    return render(request, "home.html", status_code, actor=actor, recent=recent, bethesda=BETHESDA_HINT, **extra)


@router.get("/")
def home(request: Request, session: SessionDep, actor: PageActor) -> HTMLResponse:
    return _home_view(request, session, actor)


@router.post("/upload", dependencies=[CsrfChecked])
async def upload(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    image: Annotated[UploadFile, File()],
    accession_id: Annotated[str | None, Form()] = None,
) -> Response:
    try:
        submission = service.Submission(
            data=image.file,
            source=PredictionSource.WEB,
            accession_id=accession_id,
            filename=strip_control_characters(image.filename),
        )
        prediction, _ = await run_in_threadpool(
            service.create_prediction, session, context.batcher, context.images, context.settings, actor, submission
        )
    except PapcadError as exc:
        return _home_view(request, session, actor, 422, error=str(exc), accession_id=accession_id)
    return RedirectResponse(f"/predictions/{prediction.id}", status_code=303)


def _prediction_view(
    request: Request,
    context: AppContext,
    actor: Actor,
    prediction: Prediction,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return render(
        request, "prediction.html", status_code, actor=actor, p=prediction, bethesda=BETHESDA_HINT,
        final_label=service.final_label(prediction), error=error, policy=context.policy,
    )  # fmt: skip


@router.get("/predictions/{prediction_id}")
def prediction_page(
    prediction_id: RecordId, request: Request, context: ContextDep, session: SessionDep, actor: PageActor
) -> HTMLResponse:
    return _prediction_view(request, context, actor, service.read_prediction(session, actor, prediction_id))


@router.post("/predictions/{prediction_id}/reviews", dependencies=[CsrfChecked])
def review(
    prediction_id: RecordId,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    action: Annotated[str, Form()],
    label: Annotated[str | None, Form()] = None,
    comment: Annotated[str | None, Form()] = None,
    reason: Annotated[str | None, Form()] = None,
) -> Response:
    try:
        reviews.add_review(session, actor, prediction_id, action, label, comment, reason)
    except (PermissionDeniedError, InputError, ConflictError) as exc:
        session.rollback()
        status = {PermissionDeniedError: 403, ConflictError: 409}.get(type(exc), 422)
        return _prediction_view(
            request, context, actor, service.get_prediction(session, prediction_id), str(exc), status
        )
    return RedirectResponse(f"/predictions/{prediction_id}#reviews", status_code=303)


def admin_actor(actor: PageActor) -> Actor:
    """The signed-in user, if an administrator: every admin page and form depends on this."""
    if not actor.is_admin:
        raise PermissionDeniedError("this page is for administrators")
    return actor


AdminActor = Annotated[Actor, Depends(admin_actor)]


def _admin_action(
    request: Request, session: Session, actor: Actor, action: Callable[[], dict[str, str]], error_status: int = 422
) -> Response:
    """Run one change for the admin page (the service commits it), then show the page with its outcome.

    `action()` returns what the page should show (a message, or a new key); a domain error leaves
    nothing changed and is shown instead.
    """
    try:
        shown = action()
    except PapcadError as exc:
        session.rollback()
        return _admin_with(request, session, actor, error_status, error=str(exc))
    return _admin_with(request, session, actor, 200, **shown)


@router.get("/admin")
def admin_page(request: Request, session: SessionDep, actor: AdminActor) -> Response:
    return _admin_with(request, session, actor, 200)


@router.post("/admin/users", dependencies=[CsrfChecked])
def admin_create_user(
    request: Request,
    session: SessionDep,
    actor: AdminActor,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    role: Annotated[str, Form()],
) -> Response:
    def create() -> dict[str, str]:
        accounts.create_user(session, actor, username, password, role)
        return {"message": f"User {username} created."}

    return _admin_action(request, session, actor, create)


@router.post("/admin/users/active", dependencies=[CsrfChecked])
def admin_set_active(
    request: Request,
    session: SessionDep,
    actor: AdminActor,
    username: Annotated[str, Form()],
    active: Annotated[bool, Form()],
) -> Response:
    def switch() -> dict[str, str]:
        accounts.set_user_active(session, actor, username, active)
        return {"message": f"User {username} {'reactivated' if active else 'deactivated'}."}

    return _admin_action(request, session, actor, switch)


@router.post("/admin/users/password", dependencies=[CsrfChecked])
def admin_set_password(
    request: Request,
    session: SessionDep,
    actor: AdminActor,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> Response:
    def change() -> dict[str, str]:
        accounts.set_password(session, actor, username, password)
        return {"message": f"Password of {username} changed; their open sessions have ended."}

    return _admin_action(request, session, actor, change)


@router.post("/admin/apikeys", dependencies=[CsrfChecked])
def admin_create_key(
    request: Request, session: SessionDep, actor: AdminActor, name: Annotated[str, Form()]
) -> Response:
    def create() -> dict[str, str]:
        client, key = accounts.create_api_client(session, actor, name)
        return {"new_key": key, "new_key_name": client.name}

    return _admin_action(request, session, actor, create)


@router.post("/admin/apikeys/revoke", dependencies=[CsrfChecked])
def admin_revoke_key(
    request: Request, session: SessionDep, actor: AdminActor, name: Annotated[str, Form()]
) -> Response:
    def revoke() -> dict[str, str]:
        accounts.revoke_api_client(session, actor, name)
        return {"message": f"API key {name} revoked."}

    return _admin_action(request, session, actor, revoke, error_status=404)


def _admin_with(request: Request, session: Session, actor: Actor, status: int, **extra: Any) -> Response:
    return render(
        request,
        "admin.html",
        status_code=status,
        actor=actor,
        users=accounts.list_users(session),
        clients=accounts.list_api_clients(session),
        roles=[r.value for r in Role],
        model_versions=registry.list_versions(session),
        **extra,
    )


@router.post("/admin/models/promote", dependencies=[CsrfChecked])
def admin_promote_model(
    request: Request, session: SessionDep, actor: AdminActor, version: Annotated[str, Form()]
) -> Response:
    def promote() -> dict[str, str]:
        registry.promote(session, actor, version)
        return {"message": f"Model {version} is now active; servers and workers switch within seconds."}

    return _admin_action(request, session, actor, promote)


@router.post("/admin/models/rollback", dependencies=[CsrfChecked])
def admin_rollback_model(request: Request, session: SessionDep, actor: AdminActor) -> Response:
    def rollback() -> dict[str, str]:
        row = registry.rollback(session, actor)
        return {"message": f"Rolled back: model {row.version} is active again."}

    return _admin_action(request, session, actor, rollback, error_status=409)


@router.get("/account")
def account_page(request: Request, actor: PageActor) -> Response:
    return render(request, "account.html", actor=actor)


@router.post("/account/password", dependencies=[CsrfChecked])
def change_password(
    request: Request,
    session: SessionDep,
    actor: PageActor,
    current: Annotated[str, Form()],
    password: Annotated[str, Form()],
) -> Response:
    """Change one's own password; every session ends, so sign in again with the new one."""
    try:
        accounts.change_own_password(session, actor, current, password)
    except InputError as exc:
        session.rollback()
        return render(request, "account.html", 422, actor=actor, error=str(exc))
    browser_sessions.clear(request)
    return RedirectResponse("/login?changed=1", status_code=303)
