"""Admission control: shed load at once instead of queueing without bound.

The classifying routes (one cell, a batch, in the API and on the pages) hold memory, a worker
thread and, briefly, database connections. When more than `max_in_flight` of them are being
served, a new one gets 503 with `Retry-After` straight away, so the server's latency and memory
stay bounded and clients retry later. Retry-After is the configured minimum, or longer when the
requests in flight will take longer: about the time the model needs for half of them, so a crowd
of waiting clients does not retry every second (each retry re-sends its upload), spread by up to half
again at random, so the refused clients do not all come back in one wave while the model runs dry
between waves (the "thundering herd"). A request that
still cannot get a database connection within `pool_timeout` gets a 503 too, rather than a 500.
"""

import math
import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from app.api.metrics import ADMISSION_REJECTED, CLASSIFYING_IN_FLIGHT
from app.api.problems import problem
from app.ml.batching import BatcherStopped

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_RETRY_AFTER_S = 60
CLASSIFYING_ROUTES = {
    ("POST", "/api/v1/predictions"),
    ("POST", "/api/v1/batches"),
    ("POST", "/upload"),
    ("POST", "/batches"),
}


class AdmissionControl:
    """Pure ASGI middleware counting the classifying requests in flight (one event loop: no lock)."""

    def __init__(self, app: ASGIApp, max_in_flight: int, retry_after_seconds: int = 1):
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after_seconds
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"].rstrip("/") or "/") not in CLASSIFYING_ROUTES:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            ADMISSION_REJECTED.inc()
            scope["route_path"] = scope["path"]  # for the request metrics: no route ran
            wait = jittered(self.retry_after_for(scope))
            response = problem(
                503,
                f"the server is classifying {self.in_flight} requests already; retry after {wait} s",
                headers={"Retry-After": str(wait)},
            )
            await response(scope, receive, send)
            return
        self.in_flight += 1
        CLASSIFYING_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            CLASSIFYING_IN_FLIGHT.dec()

    def retry_after_for(self, scope: Scope) -> int:
        """Seconds until about half the work in flight is done (the model's recent cost per image)."""
        context = getattr(getattr(scope.get("app"), "state", None), "context", None)
        per_image: float | None = getattr(getattr(context, "batcher", None), "seconds_per_image", None)
        if not per_image:
            return self.retry_after
        return max(self.retry_after, min(MAX_RETRY_AFTER_S, math.ceil(self.in_flight * per_image / 2)))


def jittered(wait: int) -> int:
    """`wait` plus up to half again, at random (never over MAX_RETRY_AFTER_S)."""
    return min(MAX_RETRY_AFTER_S, wait + random.randint(0, wait // 2))


def widen_thread_pool(max_in_flight: int, others: int = 40) -> None:
    """Every admitted classifying request may wait in a worker thread for its forward pass; keep
    `others` threads beyond them so pages, reads and sign-ins never queue behind the uploads.
    Call from the running event loop (the app's lifespan)."""
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, max_in_flight + others)


def install(app: FastAPI, max_in_flight: int, retry_after_seconds: int) -> None:
    """The in-flight limit, and 503 + Retry-After (never 500) when the pool or the model is not available."""
    app.add_middleware(AdmissionControl, max_in_flight=max_in_flight, retry_after_seconds=retry_after_seconds)
    headers = {"Retry-After": str(retry_after_seconds)}

    @app.exception_handler(PoolTimeoutError)
    async def _pool_exhausted(request: Request, exc: PoolTimeoutError) -> JSONResponse:
        return problem(503, "the database is busy (no free connection); retry shortly", headers=headers)

    @app.exception_handler(BatcherStopped)
    async def _stopping(request: Request, exc: BatcherStopped) -> JSONResponse:
        return problem(503, "the server is shutting down; retry shortly", headers=headers)
