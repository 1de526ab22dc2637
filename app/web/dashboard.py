"""The monitoring dashboard page: the numbers of services.monitoring as tables and an inline SVG chart."""

from dataclasses import dataclass
from datetime import date

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from app.errors import InputError
from app.http.deps import ContextDep, SessionDep
from app.services import monitoring as service
from app.services import shadow
from app.web.routes import PageActor, render

router = APIRouter(include_in_schema=False)

CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 640, 180, 36


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    day: date
    rate: float
    reviewed: int
    overridden: int


@dataclass(frozen=True)
class Section:
    """One block of the page: a model version, or all versions together."""

    title: str
    key: str  # the model version, or "all"
    metrics: service.Metrics
    bars: list[Bar]
    peak: int  # the largest confusion-matrix cell, for shading


def override_bars(days: list[service.DayRate]) -> list[Bar]:
    """Bar geometry for the override-rate chart: one bar per review day, height = override rate."""
    if not days:
        return []
    plot_width, plot_height = CHART_WIDTH - 2 * CHART_PAD, CHART_HEIGHT - 2 * CHART_PAD
    slot = plot_width / len(days)
    width = max(2.0, min(40.0, slot * 0.7))
    bars = []
    for i, d in enumerate(days):
        height = d.rate * plot_height
        x = CHART_PAD + i * slot + (slot - width) / 2
        top = CHART_PAD + plot_height - height
        bars.append(
            Bar(round(x, 1), round(top, 1), round(width, 1), round(height, 1), d.day, d.rate, d.reviewed, d.overridden)
        )
    return bars


def sections(report: service.Report) -> list[Section]:
    """Per model version, preceded by the overall numbers when there is more than one version."""
    groups = [report.overall, *report.by_version] if len(report.by_version) > 1 else report.by_version
    return [
        Section(
            title="All model versions" if m.model_version is None else f"Model {m.model_version}",
            key=m.model_version or "all",
            metrics=m,
            bars=override_bars(m.over_time),
            peak=max(max(row) for row in m.confusion),
        )
        for m in groups
    ]


def _day(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InputError(f"{name} must be a date (YYYY-MM-DD)") from exc


@router.get("/dashboard")
def dashboard(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    actor: PageActor,
    date_from: str | None = None,
    date_to: str | None = None,
) -> HTMLResponse:
    """A bad date shows the page with the message and the numbers of all dates, not a bare error page."""
    error, status = None, 200
    try:
        start, end = _day(date_from, "date_from"), _day(date_to, "date_to")
        report = service.read_report(session, actor, start, end, context.policy, page="dashboard")
    except InputError as exc:
        error, status = str(exc), 422
        report = service.read_report(session, actor, None, None, context.policy, page="dashboard")
    chart = {"width": CHART_WIDTH, "height": CHART_HEIGHT, "pad": CHART_PAD}
    return render(
        request, "dashboard.html", status, actor=actor, report=report, sections=sections(report), chart=chart,
        error=error, entered={"date_from": date_from or "", "date_to": date_to or ""}, safety=report.safety,
        shadow=shadow.comparisons(session),
    )  # fmt: skip
