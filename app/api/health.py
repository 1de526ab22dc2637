"""Liveness and readiness: the only routes without authentication."""

from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import ContextDep
from app.api.problems import problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(context: ContextDep):
    try:
        with context.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        return problem(503, f"database not reachable: {type(exc).__name__}")
    return {"status": "ready", "database": context.engine.dialect.name, "model_version": context.classifier.version}
