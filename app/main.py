"""The FastAPI application: REST API, health checks and browser pages around one loaded model."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api import batches, cases, health, metrics, predictions, problems
from app.api import fhir as fhir_api
from app.api import monitoring as monitoring_api
from app.api.metrics import RequestMetrics
from app.config import Settings, get_settings
from app.context import AppContext
from app.domain import BatchStatus, CaseStatus, ItemStatus, ModelStatus
from app.http import admission
from app.http.headers import SecurityHeaders, csp_nonce
from app.http.limits import RequestBodyLimit
from app.http.sessions import SessionCookies
from app.ml.classifier import Classifier
from app.web import batches as web_batches
from app.web import cases as web_cases
from app.web import dashboard as web_dashboard
from app.web import review as web_review
from app.web import routes as web

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> FastAPI:
    """Build the app. Start-up migrates the database and loads the verified model."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.context = AppContext.start(settings, classifier)
        admission.widen_thread_pool(settings.max_in_flight)
        yield
        app.state.context.stop()

    # Swagger UI and ReDoc from files in the fastapi-offline package: the docs work on a lab network
    # without internet.
    app: FastAPI = FastAPIOffline(
        title="PapCAD",
        version=__version__,
        description="Computer-assisted classification of single-cell Pap-smear images. "
        "Every result is a model's suggestion for review by a qualified person.",
        lifespan=lifespan,
        favicon_url="/static/favicon.svg",
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # Sessions live in the database (app.services.web_sessions); this sets the cookies they ask for.
    app.add_middleware(SessionCookies)
    admission.install(app, settings.max_in_flight, settings.retry_after_seconds)
    app.add_middleware(RequestMetrics)  # outside admission control: its 503s are counted too
    # Added last, so outermost: a too-large or anonymous upload is refused before anything reads it.
    app.add_middleware(RequestBodyLimit, settings=settings, session_cookie="papcad_session")
    # Outermost of all: every response, refusals by the limits above included, gets the headers.
    app.add_middleware(SecurityHeaders, hsts=settings.cookie_secure)
    app.state.templates = Jinja2Templates(directory=TEMPLATES, context_processors=[csp_nonce])
    app.state.templates.env.globals.update(
        BatchStatus=BatchStatus, CaseStatus=CaseStatus, ItemStatus=ItemStatus, ModelStatus=ModelStatus
    )
    problems.install(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(predictions.router)
    app.include_router(batches.router)
    app.include_router(cases.router)
    app.include_router(fhir_api.router)
    app.include_router(monitoring_api.router)
    app.include_router(web.router)
    app.include_router(web_batches.router)
    app.include_router(web_dashboard.router)
    app.include_router(web_cases.router)
    app.include_router(web_review.router)
    return app
