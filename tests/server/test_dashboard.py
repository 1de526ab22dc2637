"""Monitoring: the agreement maths against hand-computed numbers, then the same numbers over real HTTP."""

import re
from collections import defaultdict
from datetime import date, datetime, timedelta

import pytest

from app.errors import InputError
from app.ml.classes import CLASS_NAMES
from app.services import monitoring
from app.web.dashboard import CHART_HEIGHT, CHART_PAD, override_bars

NS, NI, LD, CIS = "normal_superficiel", "normal_intermediate", "light_dysplastic", "carcinoma_in_situ"
D1, D2 = date(2024, 3, 1), date(2024, 3, 2)


def matrix_of(cells: dict[tuple[str, str], int]) -> list[list[int]]:
    """A 7x7 matrix (rows: model call, columns: final label) from its non-zero cells."""
    return [[cells.get((row, col), 0) for col in CLASS_NAMES] for row in CLASS_NAMES]


def by_class(metrics: monitoring.Metrics) -> dict[str, tuple[int, int, float | None]]:
    return {pc.class_name: (pc.called, pc.confirmed, pc.rate) for pc in metrics.per_class}


def test_maths_match_hand_computed_numbers():
    calls = [NS, NS, NI, NI, LD, LD, CIS, CIS, CIS]
    finals = [NS, NI, NI, NI, LD, NS, CIS, CIS, CIS]
    versions = ["v1"] * 6 + ["v2"] * 3
    dates = [D1, D1, D2, D2, D2, D2, D2, D2, D2]
    report = monitoring.summarize(calls, finals, versions, dates)
    v1, v2 = report.by_version
    assert (v1.model_version, v2.model_version, report.overall.model_version) == ("v1", "v2", None)

    # v1: 6 cells, 4 kept (items 1, 3, 4, 5) -> agreement 4/6, override 2/6.
    # Model marginals NS 2, NI 2, LD 2; reviewer marginals NS 2, NI 3, LD 1.
    # p_o = 4/6 = 2/3; p_e = (2*2 + 2*3 + 2*1) / 36 = 1/3; kappa = (2/3 - 1/3) / (1 - 1/3) = 0.5.
    assert (v1.reviewed, v1.agreed) == (6, 4)
    assert v1.agreement_rate == pytest.approx(2 / 3) and v1.override_rate == pytest.approx(1 / 3)
    assert v1.kappa == pytest.approx(0.5)
    assert v1.confusion == matrix_of({(NS, NS): 1, (NS, NI): 1, (NI, NI): 2, (LD, LD): 1, (LD, NS): 1})
    classes = by_class(v1)
    assert classes[NS] == (2, 1, 0.5) and classes[NI] == (2, 2, 1.0) and classes[LD] == (2, 1, 0.5)
    assert classes[CIS] == (0, 0, None)
    # Day 1: items 1-2, one override -> 1/2. Day 2: items 3-6, one override -> 1/4.
    assert [(d.day, d.reviewed, d.overridden, d.rate) for d in v1.over_time] == [(D1, 2, 1, 0.5), (D2, 4, 1, 0.25)]

    # v2: every call and every label is CIS: p_o = p_e = 1, kappa = 0/0 -> reported as None, not NaN.
    assert (v2.reviewed, v2.agreed, v2.agreement_rate, v2.override_rate, v2.kappa) == (3, 3, 1.0, 0.0, None)
    assert v2.confusion == matrix_of({(CIS, CIS): 3})

    # Overall: 9 cells, 7 kept. Model marginals NS 2, NI 2, LD 2, CIS 3; reviewer NS 2, NI 3, LD 1, CIS 3.
    # p_o = 7/9 = 21/27; p_e = (4 + 6 + 2 + 9) / 81 = 7/27; kappa = (14/27) / (20/27) = 0.7.
    overall = report.overall
    assert (overall.reviewed, overall.agreed) == (9, 7)
    assert overall.override_rate == pytest.approx(2 / 9)
    assert overall.kappa == pytest.approx(0.7)
    assert overall.confusion == [
        [a + b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(v1.confusion, v2.confusion, strict=True)
    ]
    # Day 2 overall: 4 cells of v1 (1 override) + 3 of v2 -> 1/7.
    assert [(d.day, d.reviewed, d.overridden) for d in overall.over_time] == [(D1, 2, 1), (D2, 7, 1)]
    assert overall.over_time[1].rate == pytest.approx(1 / 7)


def test_date_range_and_edge_cases():
    calls = [NS, NS, NI, NI, LD, LD, CIS, CIS, CIS]
    finals = [NS, NI, NI, NI, LD, NS, CIS, CIS, CIS]
    dates = [D1, D1, D2, D2, D2, D2, D2, D2, D2]
    # From day 2 only: calls NI NI LD LD CIS CIS CIS, labels NI NI LD NS CIS CIS CIS -> 6 of 7 kept.
    # Model NI 2, LD 2, CIS 3; reviewer NI 2, LD 1, NS 1, CIS 3.
    # p_e = (2*2 + 2*1 + 0*1 + 3*3) / 49 = 15/49; p_o = 42/49; kappa = (42 - 15) / (49 - 15) = 27/34.
    late = monitoring.summarize(calls, finals, ["v1"] * 9, dates, date_from=D2).overall
    assert (late.reviewed, late.agreed) == (7, 6)
    assert late.kappa == pytest.approx(27 / 34)
    # Day 1 only: calls NS NS, labels NS NI -> p_o = 1/2; model NS 2, reviewer NS 1, NI 1:
    # p_e = (2*1 + 0*1) / 4 = 1/2 -> kappa = 0 (defined: two labels are in use).
    early = monitoring.summarize(calls, finals, ["v1"] * 9, dates, date_from=D1, date_to=D1).overall
    assert (early.reviewed, early.agreed) == (2, 1) and early.kappa == pytest.approx(0.0)


def test_complete_disagreement_and_empty_input():
    # Two cells, each label swapped: p_o = 0, p_e = (1*1 + 1*1) / 4 = 1/2 -> kappa = (0 - 1/2) / (1/2) = -1.
    swapped = monitoring.summarize([NS, NI], [NI, NS], ["v1", "v1"], [D1, D1]).overall
    assert swapped.kappa == pytest.approx(-1.0) and swapped.agreement_rate == 0.0
    empty = monitoring.summarize([], [], [], [])
    assert empty.by_version == []
    assert (empty.overall.reviewed, empty.overall.agreement_rate, empty.overall.kappa) == (0, None, None)
    assert empty.overall.confusion == matrix_of({}) and empty.overall.over_time == []
    with pytest.raises(InputError):
        monitoring.summarize([], [], [], [], date_from=D2, date_to=D1)
    with pytest.raises(InputError):
        monitoring.summarize(["ASC-US"], [NS], ["v1"], [D1])


def test_chart_bar_heights_are_override_rates():
    days = [monitoring.DayRate(D1, 2, 1, 0.5), monitoring.DayRate(D2, 4, 0, 0.0)]
    plot_height = CHART_HEIGHT - 2 * CHART_PAD
    bars = override_bars(days)
    assert [b.height for b in bars] == [pytest.approx(plot_height / 2), 0.0]
    assert bars[0].y + bars[0].height == pytest.approx(CHART_HEIGHT - CHART_PAD)
    assert bars[0].x < bars[1].x


# ---- over real HTTP ---------------------------------------------------------------------------------

# (image class, image index, reviews in order); the latest review is the one that counts.
PLAN = [
    ("normal_superficiel", 0, ["confirm"]),
    ("light_dysplastic", 0, ["confirm"]),
    ("severe_dysplastic", 0, ["override"]),
    ("carcinoma_in_situ", 0, ["override", "confirm"]),  # back to the model's call: agreement
    ("normal_columnar", 0, ["confirm", "override"]),  # changed its mind: override
    ("moderate_dysplastic", 0, []),  # never reviewed: not counted anywhere
]


def submit(client, path) -> dict:
    with open(path, "rb") as handle:
        response = client.post("/api/v1/predictions", files={"image": (path.name, handle, "image/bmp")})
    assert response.status_code == 201, response.text
    return response.json()


def other_class(call: str) -> str:
    return CIS if call != CIS else NS


def hand_kappa(confusion: list[list[int]]) -> float | None:
    """Cohen's kappa from its definition (rows: model call, columns: final label), independent of scikit-learn."""
    n = sum(map(sum, confusion))
    p_o = sum(confusion[k][k] for k in range(len(confusion))) / n
    p_e = sum(sum(confusion[k]) * sum(row[k] for row in confusion) for k in range(len(confusion))) / n**2
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def counts_of(group: dict | None) -> tuple[int, int, list[list[int]], dict[str, list[int]]]:
    """(reviewed, agreed, confusion, {day: [reviewed, overridden]}) of a monitoring group; zeros for none."""
    if group is None:
        return 0, 0, [[0] * len(CLASS_NAMES) for _ in CLASS_NAMES], {}
    days = {d["day"]: [d["reviewed"], d["overridden"]] for d in group["over_time"]}
    return group["reviewed"], group["agreed"], group["confusion"], days


def version_group(report: dict, version: str) -> dict | None:
    return next((g for g in report["by_version"] if g["model_version"] == version), None)


def page_numbers(html: str) -> tuple[dict[str, str], dict[tuple[str, str], int]]:
    metrics = dict(re.findall(r'data-metric="(\w+)" data-value="([^"]*)"', html))
    cells = re.findall(r'data-row="(\w+)" data-col="(\w+)"[^>]*>(\d+)</td>', html)
    return metrics, {(row, col): int(count) for row, col, count in cells}


def test_dashboard_numbers_match_the_reviews_made(live_server, herlev_image, sign_in, bundled_classifier):
    # The server may hold reviews from other tests: the expected numbers are those counts plus ours.
    browser, csrf = sign_in(live_server, "pathologist")
    calls, finals, days = [], [], []
    try:
        first_look = browser.get("/api/v1/monitoring")
        assert first_look.status_code == 200, first_look.text
        before = first_look.json()
        with live_server.client() as lis:
            for class_name, index, reviews in PLAN:
                created = submit(lis, herlev_image(class_name, index))
                call = created["predicted_class"]
                for n, action in enumerate(reviews):
                    body = {"action": action} if action == "confirm" else {"action": action, "label": other_class(call)}
                    if n:  # a second review amends the first, with a reason
                        body["reason"] = "second look"
                    response = browser.post(
                        f"/api/v1/predictions/{created['id']}/reviews", json=body, headers={"X-CSRF-Token": csrf}
                    )
                    assert response.status_code == 201, response.text
                    review = response.json()
                if reviews:
                    calls.append(call)
                    finals.append(review["label"])
                    days.append(datetime.fromisoformat(review["created_at"].replace("Z", "+00:00")).date())
                    assert lis.get(f"/api/v1/predictions/{created['id']}").json()["final_label"] == review["label"]

        # The expected numbers, from the definitions: the counts before plus the reviews made here.
        n, agreed = len(calls), sum(a == b for a, b in zip(calls, finals, strict=True))
        assert (n, agreed) == (5, 3)  # confirm, confirm, override, override->confirm, confirm->override
        ours = [[0] * 7 for _ in CLASS_NAMES]
        for call, final in zip(calls, finals, strict=True):
            ours[CLASS_NAMES.index(call)][CLASS_NAMES.index(final)] += 1
        our_days: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for call, final, day in zip(calls, finals, days, strict=True):
            our_days[day.isoformat()][0] += 1
            our_days[day.isoformat()][1] += call != final

        def expected(group_before: dict | None) -> tuple[int, int, list[list[int]], dict[str, list[int]]]:
            reviewed, kept, confusion, per_day = counts_of(group_before)
            confusion = [[a + b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(confusion, ours, strict=True)]
            per_day = {day: list(counts) for day, counts in per_day.items()}
            for day, (r, o) in our_days.items():
                per_day[day] = [per_day.get(day, [0, 0])[0] + r, per_day.get(day, [0, 0])[1] + o]
            return reviewed + n, kept + agreed, confusion, per_day

        response = browser.get("/api/v1/monitoring")
        assert response.status_code == 200, response.text
        report = response.json()
        version = bundled_classifier.version
        assert {g["model_version"] for g in report["by_version"]} == {
            *(g["model_version"] for g in before["by_version"]),
            version,
        }
        pairs = [
            (report["overall"], before["overall"]),
            (version_group(report, version), version_group(before, version)),
        ]
        for group, group_before in pairs:
            reviewed, kept, confusion, per_day = expected(group_before)
            kappa = hand_kappa(confusion)
            assert group["reviewed"] == reviewed and group["agreed"] == kept
            assert group["agreement_rate"] == pytest.approx(kept / reviewed)
            assert group["override_rate"] == pytest.approx(1 - kept / reviewed)
            assert group["kappa"] == (None if kappa is None else pytest.approx(kappa))
            assert group["confusion"] == confusion
            assert {d["day"]: [d["reviewed"], d["overridden"]] for d in group["over_time"]} == per_day
            for pc in group["per_class"]:
                row = confusion[CLASS_NAMES.index(pc["class_name"])]
                assert pc["called"] == sum(row) and pc["confirmed"] == row[CLASS_NAMES.index(pc["class_name"])]
        assert report["overall"]["model_version"] is None
        reviewed, kept, confusion, per_day = expected(before["overall"])
        kappa = hand_kappa(confusion)

        # A period after the last review has nothing in it; a reversed period is refused.
        later = (max(days) + timedelta(days=1)).isoformat()
        empty = browser.get("/api/v1/monitoring", params={"date_from": later}).json()
        assert empty["overall"]["reviewed"] == 0 and empty["overall"]["kappa"] is None and empty["by_version"] == []
        reversed_ = browser.get("/api/v1/monitoring", params={"date_from": later, "date_to": min(days).isoformat()})
        assert reversed_.status_code == 422
        assert reversed_.headers["content-type"].startswith("application/problem+json")

        # The page shows the same numbers.
        page = browser.get("/dashboard")
        assert page.status_code == 200
        assert f'data-version="{bundled_classifier.version}"' in page.text and "<svg" in page.text
        assert 'href="/dashboard"' in page.text
        shown, cells = page_numbers(page.text)
        assert shown["reviewed"] == str(reviewed)
        assert float(shown["override_rate"]) == pytest.approx(1 - kept / reviewed)
        assert (shown["kappa"] == "") if kappa is None else float(shown["kappa"]) == pytest.approx(kappa)
        assert cells == {(r, c): confusion[i][j] for i, r in enumerate(CLASS_NAMES) for j, c in enumerate(CLASS_NAMES)}
        assert page.text.count('<rect class="bar"') == len(per_day)
        assert "No reviewed predictions" in browser.get("/dashboard", params={"date_from": later}).text
    finally:
        browser.close()


def test_monitoring_is_for_admins_and_pathologists_only(live_server, sign_in):
    admin, _ = sign_in(live_server, "admin")
    cytotech, _ = sign_in(live_server, "cytotechnologist")
    try:
        assert admin.get("/dashboard").status_code == 200
        assert admin.get("/api/v1/monitoring").status_code == 200
        assert 'href="/dashboard"' in admin.get("/").text
        refused = cytotech.get("/dashboard")
        assert refused.status_code == 403 and "administrators and pathologists" in refused.text
        assert cytotech.get("/api/v1/monitoring").status_code == 403
        assert 'href="/dashboard"' not in cytotech.get("/").text
    finally:
        admin.close()
        cytotech.close()
    with live_server.client() as lis:
        by_key = lis.get("/api/v1/monitoring")
    assert by_key.status_code == 403
    assert by_key.headers["content-type"].startswith("application/problem+json")
    with live_server.anonymous() as anonymous:
        assert anonymous.get("/api/v1/monitoring").status_code == 401
        assert anonymous.get("/dashboard", follow_redirects=False).status_code == 303
