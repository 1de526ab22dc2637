"""HTML pages. Forms post back here; every change checks the session's CSRF token."""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from app.api.deps import ContextDep, SessionDep, session_user
from app.api.predictions import checked_upload
from app.db.models import Prediction
from app.errors import AuthenticationError, InputError, PapcadError, PermissionDeniedError
from app.ml.classes import BETHESDA_HINT, CLASS_LABELS, CLASS_NAMES, NORMAL_CLASSES
from app.roles import Role
from app.security import csrf_matches, new_csrf_token
from app.services import accounts
from app.services import predictions as service
from app.services.actors import Actor

router = APIRouter(include_in_schema=False)


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = new_csrf_token()
    return token


def check_csrf(request: Request, csrf: Annotated[str | None, Form()] = None) -> None:
    if not csrf_matches(request.session.get("csrf"), csrf):
        raise PermissionDeniedError("the form has expired or did not come from this site; reload the page and retry")


def page_actor(request: Request, session: SessionDep) -> Actor:
    user = session_user(request, session)
    if user is None:
        raise AuthenticationError("sign in first")
    return Actor.of_user(user)


PageActor = Annotated[Actor, Depends(page_actor)]
CsrfChecked = Depends(check_csrf)


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    context.setdefault("actor", None)
    context.update(
        csrf=csrf_token(request), class_names=CLASS_NAMES, class_labels=CLASS_LABELS, normal_classes=NORMAL_CLASSES
    )
    return request.app.state.templates.TemplateResponse(request, template, context, status_code=status_code)


def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login")
def login_page(request: Request, next: str | None = None):
    return render(request, "login.html", next=_safe_next(next))


@router.post("/login", dependencies=[CsrfChecked])
def login(
    request: Request,
    session: SessionDep,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str | None, Form()] = None,
):
    try:
        user = accounts.authenticate_user(session, username, password)
    except AuthenticationError as exc:
        session.commit()  # keep the audit record of the failed attempt
        return render(request, "login.html", status_code=401, error=str(exc), next=_safe_next(next), username=username)
    session.commit()
    request.session.clear()
    request.session.update(user_id=user.id, csrf=new_csrf_token())
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", dependencies=[CsrfChecked])
def logout(request: Request):
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


def _home_view(request: Request, session, actor: Actor, status_code: int = 200, **extra) -> HTMLResponse:
    """The upload form and the 20 newest results."""
    recent = list(session.scalars(select(Prediction).order_by(Prediction.id.desc()).limit(20)))
    return render(request, "home.html", status_code, actor=actor, recent=recent, bethesda=BETHESDA_HINT, **extra)


@router.get("/")
def home(request: Request, session: SessionDep, actor: PageActor):
    return _home_view(request, session, actor)


@router.post("/upload", dependencies=[CsrfChecked])
async def upload(
    request: Request,
    context: ContextDep,
    actor: PageActor,
    image: Annotated[UploadFile, File()],
    accession_id: Annotated[str | None, Form()] = None,
):
    try:
        checked = await checked_upload(image, context.settings)
        submission = service.Submission(image=checked, source="web", accession_id=accession_id, filename=image.filename)
        prediction, _ = await run_in_threadpool(
            service.create_prediction, context.sessions, context.classifier, context.images, actor, submission
        )
    except PapcadError as exc:
        with context.sessions() as session:
            return _home_view(request, session, actor, 422, error=str(exc), accession_id=accession_id)
    return RedirectResponse(f"/predictions/{prediction.id}", status_code=303)


def _prediction_view(request: Request, context, actor: Actor, prediction, error=None, status_code=200):
    return render(
        request, "prediction.html", status_code, actor=actor, p=prediction, bethesda=BETHESDA_HINT,
        final_label=service.final_label(prediction), error=error, policy=context.policy,
    )  # fmt: skip


@router.get("/predictions/{prediction_id}")
def prediction_page(prediction_id: int, request: Request, context: ContextDep, session: SessionDep, actor: PageActor):
    return _prediction_view(request, context, actor, service.read_prediction(session, actor, prediction_id))


@router.post("/predictions/{prediction_id}/reviews", dependencies=[CsrfChecked])
def review(
    prediction_id: int,
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    action: Annotated[str, Form()],
    label: Annotated[str | None, Form()] = None,
    comment: Annotated[str | None, Form()] = None,
):
    try:
        service.add_review(session, actor, prediction_id, action, label, comment)
    except (PermissionDeniedError, InputError) as exc:
        session.rollback()
        status = 403 if isinstance(exc, PermissionDeniedError) else 422
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


def _admin_action(request: Request, session, actor: Actor, action, error_status: int = 422) -> Response:
    """Run one change for the admin page in its own transaction, then show the page with its outcome.

    `action()` returns what the page should show (a message, or a new key); a domain error rolls
    everything back and is shown instead.
    """
    try:
        shown = action()
        session.commit()
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
):
    def create() -> dict:
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
):
    def switch() -> dict:
        accounts.set_user_active(session, actor, username, active)
        return {"message": f"User {username} {'reactivated' if active else 'deactivated'}."}

    return _admin_action(request, session, actor, switch)


@router.post("/admin/apikeys", dependencies=[CsrfChecked])
def admin_create_key(request: Request, session: SessionDep, actor: AdminActor, name: Annotated[str, Form()]):
    def create() -> dict:
        client, key = accounts.create_api_client(session, actor, name)
        return {"new_key": key, "new_key_name": client.name}

    return _admin_action(request, session, actor, create)


@router.post("/admin/apikeys/revoke", dependencies=[CsrfChecked])
def admin_revoke_key(request: Request, session: SessionDep, actor: AdminActor, name: Annotated[str, Form()]):
    def revoke() -> dict:
        accounts.revoke_api_client(session, actor, name)
        return {"message": f"API key {name} revoked."}

    return _admin_action(request, session, actor, revoke, error_status=404)


def _admin_with(request: Request, session, actor: Actor, status: int, **extra) -> Response:
    return render(
        request,
        "admin.html",
        status_code=status,
        actor=actor,
        users=accounts.list_users(session),
        clients=accounts.list_api_clients(session),
        roles=[r.value for r in Role],
        **extra,
    )
