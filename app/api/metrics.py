"""GET /metrics in the Prometheus text format: counts and timings only, never patient data.

Per process (request counts and latency by route template and status, requests in flight):
prometheus_client metrics updated by `RequestMetrics`. From the database at scrape time (the
same for every process and worker): stored predictions by class and model version, and batch
items waiting or being classified. With several server processes set PROMETHEUS_MULTIPROC_DIR to
an empty folder shared by them: every process then writes its metrics there and /metrics sums them.
"""

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.api.problems import problem
from app.context import AppContext
from app.db.models import BatchItem, Prediction
from app.domain import PENDING_ITEM_STATUSES

SCRAPE_TIMEOUT_S = 2.0

REQUESTS = Counter("papcad_http_requests", "HTTP requests answered.", ["method", "route", "status"])
LATENCY = Histogram(
    "papcad_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
IN_FLIGHT = Gauge("papcad_http_requests_in_flight", "HTTP requests being served.", multiprocess_mode="livesum")
CLASSIFYING_IN_FLIGHT = Gauge(
    "papcad_classifying_requests_in_flight",
    "Classifying requests (uploads, batches) being served; bounded by PAPCAD_MAX_IN_FLIGHT.",
    multiprocess_mode="livesum",
)
ADMISSION_REJECTED = Counter(
    "papcad_admission_rejected", "Classifying requests answered 503 because PAPCAD_MAX_IN_FLIGHT were in flight."
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by its route template (not the
    raw path, which holds record ids) and status."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            IN_FLIGHT.dec()
            route = getattr(scope.get("route"), "path", None) or scope.get("route_path") or "<unmatched>"
            labels = (scope["method"], route, str(status))
            REQUESTS.labels(*labels).inc()
            LATENCY.labels(*labels).observe(time.perf_counter() - start)


class DatabaseCollector(Collector):
    """Counts read from the database at scrape time, through the small probe engine (never the
    request pool); the same numbers whichever process or worker is asked."""

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        context = self.context
        up = GaugeMetricFamily("papcad_metrics_database_up", "1 if the database counts below could be read.")
        try:
            with context.probe_engine.connect() as connection:
                by_class = connection.execute(
                    select(Prediction.predicted_class, Prediction.model_version, func.count()).group_by(
                        Prediction.predicted_class, Prediction.model_version
                    )
                ).all()
                by_status = dict(
                    connection.execute(
                        select(BatchItem.status, func.count())
                        .where(BatchItem.status.in_(PENDING_ITEM_STATUSES))
                        .group_by(BatchItem.status)
                    ).all()
                )
        except Exception:  # noqa: BLE001 - a scrape must answer even when the database does not
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        predictions = CounterMetricFamily(
            "papcad_predictions", "Stored predictions by class and model version.", labels=["class", "model_version"]
        )
        for predicted_class, model_version, count in by_class:
            predictions.add_metric([predicted_class, model_version], count)
        yield predictions
        queue = GaugeMetricFamily(
            "papcad_batch_queue_items", "Batch items waiting for a worker or being classified.", labels=["status"]
        )
        for status in PENDING_ITEM_STATUSES:
            queue.add_metric([status.value], by_status.get(status, 0))
        yield queue
        batcher = context.batcher
        passes = CounterMetricFamily(
            "papcad_inference_batches", "Forward passes run for single-cell requests (this process)."
        )
        passes.add_metric([], batcher.batches_run)
        yield passes
        waiting = GaugeMetricFamily("papcad_inference_queue_images", "Images waiting to join a forward pass.")
        waiting.add_metric([], batcher.queued)
        yield waiting


def process_registry() -> CollectorRegistry:
    """This process's metrics, or every process's when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        return registry
    return REGISTRY


router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format. No authentication, like the health checks: it holds counts only."""
    context = request.app.state.context
    database = CollectorRegistry()
    database.register(DatabaseCollector(context))

    def render() -> bytes:
        return generate_latest(process_registry()) + generate_latest(database)

    try:  # its own thread, not the request thread pool, so a busy server still answers
        body = await asyncio.wait_for(asyncio.to_thread(render), timeout=SCRAPE_TIMEOUT_S)
    except TimeoutError:
        return problem(503, "metrics could not be gathered in time", headers={"Retry-After": "1"})
    return Response(body, media_type=CONTENT_TYPE_LATEST)
