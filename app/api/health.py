"""Liveness and readiness: the only routes without authentication (with /metrics).

Readiness never waits on the request pool: it uses the context's one-connection probe engine in
a thread of its own, and answers 503 when the database cannot be asked within READY_TIMEOUT_S,
so a load balancer gets an answer within a second even when every pooled connection is taken.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text

from app.api.problems import problem

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 0.8


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
    """Database reachable (through the probe engine) and the model's version."""
    context = request.app.state.context
    try:
        await asyncio.wait_for(asyncio.to_thread(_ping, context.probe_engine), timeout=READY_TIMEOUT_S)
    except TimeoutError:
        return problem(503, f"database did not answer within {READY_TIMEOUT_S} s", headers={"Retry-After": "1"})
    except Exception as exc:  # any driver error means "not ready"
        return problem(503, f"database not reachable: {type(exc).__name__}", headers={"Retry-After": "1"})
    classifier = context.models.held() if context.models is not None else context.classifier  # the serving one
    return {
        "status": "ready",
        "database": context.engine.dialect.name,
        "model_version": classifier.version,
        "typical_cell_check": classifier.ood is not None,
        "inference_precision": classifier.predictor.precision,  # int8 or float16 (LiteRT), float32 or bfloat16 (Keras)
        "tta": classifier.predictor.tta,  # the model card's test-time views
    }
