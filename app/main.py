"""The FastAPI application: REST API, health checks and browser pages around one loaded model."""

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from app import __version__
from app.api import batches, health, predictions, problems
from app.api import fhir as fhir_api
from app.api import monitoring as monitoring_api
from app.config import Settings, get_settings
from app.context import AppContext, session_secret
from app.ml.classifier import Classifier
from app.web import batches as web_batches
from app.web import dashboard as web_dashboard
from app.web import routes as web

TEMPLATES = Path(__file__).parent / "templates"


def create_app(settings: Settings | None = None, classifier: Classifier | None = None) -> FastAPI:
    """Build the app. Start-up migrates the database and loads the verified model."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.context = AppContext.start(settings, classifier)
        yield
        app.state.context.stop()

    app = FastAPI(
        title="PapCAD",
        version=__version__,
        description="Computer-assisted classification of single-cell Pap-smear images. "
        "Every result is a model's suggestion for review by a qualified person.",
        lifespan=lifespan,
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="papcad_session",
        max_age=settings.session_max_age_seconds,
        same_site="lax",
        https_only=settings.cookie_secure,
    )
    app.state.templates = Jinja2Templates(directory=TEMPLATES)
    problems.install(app)
    app.include_router(health.router)
    app.include_router(predictions.router)
    app.include_router(batches.router)
    app.include_router(fhir_api.router)
    app.include_router(monitoring_api.router)
    app.include_router(web.router)
    app.include_router(web_batches.router)
    app.include_router(web_dashboard.router)
    return app
