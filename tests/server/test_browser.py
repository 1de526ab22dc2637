"""The browser pages in a real browser: Playwright driving Debian's chromium against a live server.

This module runs on SQLite only: it overrides the `database_url` fixture of tests/server/conftest.py,
so `live_server` here is one server on a fresh SQLite file (the API tests cover PostgreSQL).
Chromium is the system one (/usr/bin/chromium, or PAPCAD_CHROMIUM); nothing is downloaded.
"""

import csv
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.ml.classes import CLASS_LABELS, CLASS_NAMES
from tests.server.conftest import PASSWORD

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PAPCAD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(os.environ.get("PAPCAD_SCREENSHOT", "/tmp/papcad_result.png"))
TIMEOUT_MS = 60_000  # for waits on the server: one classification on a busy 2-core machine takes seconds


@pytest.fixture(scope="module")
def database_url(tmp_path_factory) -> str:
    """Overrides the conftest's sqlite/postgresql parametrisation: one SQLite server for this module."""
    return f"sqlite:///{tmp_path_factory.mktemp('browser-sqlite') / 'papcad.db'}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM} (set PAPCAD_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies) per test, at a desktop size."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def sign_in(page: Page, server, role: str) -> None:
    """Open / as nobody, get sent to the sign-in page, sign in, and land back on /."""
    page.goto(f"{server.url}/")
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    page.fill("#username", server.users[role])
    page.fill("#password", PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{server.url}/")
    expect(page.locator("header .who")).to_contain_text(server.users[role])


def box(page: Page, selector: str) -> dict:
    found = page.locator(selector).bounding_box()
    assert found is not None, f"{selector} is not rendered"
    return found


def test_pathologist_uploads_reads_and_overrides(page, live_server, herlev_image, bundled_classifier):
    image_path = herlev_image("moderate_dysplastic", 2)
    sign_in(page, live_server, "pathologist")

    page.set_input_files("#image", str(image_path))
    page.fill("#accession_id", "ACC-BROWSER-1")
    page.get_by_role("button", name="Classify").click()
    expect(page).to_have_url(re.compile(r"/predictions/\d+$"), timeout=TIMEOUT_MS)
    prediction_id = int(page.url.rsplit("/", 1)[1])

    # The submitted cell is shown, decoded by the browser.
    image = page.locator("#cell-image")
    expect(image).to_be_visible()
    page.wait_for_function("() => { const i = document.querySelector('#cell-image'); return i && i.complete; }")
    assert image.evaluate("i => i.naturalWidth") > 0
    assert image.evaluate("i => i.naturalHeight") > 0

    # ... beside the probabilities: left of the list, sharing some vertical band.
    img_box, list_box = box(page, "#cell-image"), box(page, "#probabilities")
    assert img_box["x"] + img_box["width"] <= list_box["x"], (img_box, list_box)
    assert img_box["y"] < list_box["y"] + list_box["height"], (img_box, list_box)
    assert list_box["y"] < img_box["y"] + img_box["height"], (img_box, list_box)

    # Seven bars, one per class, whose shown percentages add up to 100 % (up to rounding).
    bars = page.locator("#probabilities li")
    expect(bars).to_have_count(len(CLASS_NAMES))
    assert bars.evaluate_all("items => items.map(li => li.dataset.class)") == list(CLASS_NAMES)
    shown = [float(t.replace("%", "").strip()) for t in page.locator("#probabilities li .mono").all_inner_texts()]
    assert len(shown) == len(CLASS_NAMES)
    assert sum(shown) == pytest.approx(100.0, abs=0.05 * len(CLASS_NAMES) + 1e-9)
    raw = [float(v) for v in bars.evaluate_all("items => items.map(li => li.dataset.probability)")]
    assert sum(raw) == pytest.approx(1.0, abs=1e-5)

    # The model notice says this is a model's suggestion, and which model.
    notice = page.locator("#model-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(bundled_classifier.version)
    expect(notice).to_contain_text("model")
    predicted = page.locator("#probabilities li.top").get_attribute("data-class")
    assert predicted == CLASS_NAMES[max(range(len(raw)), key=raw.__getitem__)]

    # Override with another class.
    chosen = next(name for name in ("carcinoma_in_situ", "normal_intermediate") if name != predicted)
    page.select_option("#override-label", chosen)
    page.fill("#override-comment", "nucleus larger than the model suggests")
    page.get_by_role("button", name="Override", exact=True).click()
    expect(page).to_have_url(re.compile(rf"/predictions/{prediction_id}#reviews$"), timeout=TIMEOUT_MS)
    history = page.locator("#review-history")
    expect(history).to_be_visible()
    row = history.locator("tbody tr")
    expect(row).to_have_count(1)
    expect(row).to_contain_text(live_server.users["pathologist"])
    expect(row).to_contain_text("override")
    expect(row).to_contain_text(CLASS_LABELS[chosen])
    expect(page.locator("#final-label")).to_contain_text(CLASS_LABELS[chosen])
    expect(page.locator("#predicted-class")).to_have_text(CLASS_LABELS[predicted])
    page.screenshot(path=str(SCREENSHOT), full_page=True)  # for a person to look at; not in the repository

    # The REST view: the model's call is kept, the override is a separate review.
    with live_server.client() as client:
        body = client.get(f"/api/v1/predictions/{prediction_id}").json()
    assert body["predicted_class"] == predicted
    assert body["accession_id"] == "ACC-BROWSER-1"
    assert body["original_filename"] == image_path.name
    assert body["final_label"] == chosen
    assert len(body["reviews"]) == 1
    review = body["reviews"][0]
    assert (review["action"], review["label"], review["reviewer"]) == (
        "override",
        chosen,
        live_server.users["pathologist"],
    )
    assert review["comment"] == "nucleus larger than the model suggests"


def test_admin_creates_an_api_key_shown_once(page, live_server):
    sign_in(page, live_server, "admin")
    page.get_by_role("link", name="Administration").click()
    expect(page).to_have_url(f"{live_server.url}/admin")

    page.fill("#key-name", "browser-lis")
    page.get_by_role("button", name="Create API key").click()
    shown = page.locator("#new-key")
    expect(shown).to_be_visible()
    expect(shown).to_contain_text("browser-lis")
    key = shown.locator(".mono").inner_text().strip()
    assert re.fullmatch(r"pcad_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}", key), key

    with live_server.client(key) as client:
        response = client.get("/api/v1/predictions")
    assert response.status_code == 200, response.text
    assert {"items", "total"} <= set(response.json())

    # A fresh GET of the page (not a re-POST) lists the client but never the key again.
    page.goto(f"{live_server.url}/admin")
    expect(page.locator("#new-key")).to_have_count(0)
    expect(page.locator("table", has_text="Key starts")).to_contain_text("browser-lis")
    assert key not in page.content()
    assert key.split("_")[1] in page.content()  # only the lookup prefix is shown


def test_cytotechnologist_uploading_text_sees_an_error_and_nothing_is_stored(page, live_server):
    sign_in(page, live_server, "cytotechnologist")
    before = (live_server.count("predictions"), live_server.count("images"), live_server.stored_files())

    page.set_input_files(
        "#image", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a cell image\n" * 20}]
    )
    page.fill("#accession_id", "ACC-TEXT-1")
    page.get_by_role("button", name="Classify").click()

    alert = page.get_by_role("alert")
    expect(alert).to_be_visible(timeout=TIMEOUT_MS)
    expect(alert).to_contain_text("not an image")
    expect(page).to_have_url(f"{live_server.url}/upload")
    # The form is still there, with what was typed, ready for another try.
    expect(page.locator("#image")).to_be_visible()
    expect(page.locator("#accession_id")).to_have_value("ACC-TEXT-1")

    after = (live_server.count("predictions"), live_server.count("images"), live_server.stored_files())
    assert after == before


def test_result_page_shows_heatmap_and_calibrated_probabilities(page, live_server, herlev_image, bundled_classifier):
    sign_in(page, live_server, "pathologist")
    path = herlev_image("severe_dysplastic", 4)
    page.set_input_files("#image", str(path))
    page.get_by_role("button", name="Classify").click()
    expect(page).to_have_url(re.compile(r"/predictions/\d+$"), timeout=TIMEOUT_MS)
    prediction_id = int(page.url.rsplit("/", 1)[1])

    heat = page.locator("#heatmap")
    page.wait_for_function("() => { const h = document.querySelector('#heatmap'); return h && h.complete; }")
    assert heat.evaluate("h => h.naturalWidth") == page.locator("#cell-image").evaluate("i => i.naturalWidth") > 0
    heat_box, list_box = box(page, "#heatmap"), box(page, "#probabilities")
    assert heat_box["x"] + heat_box["width"] <= list_box["x"]  # overlay beside the probabilities too
    page.locator("#heatmap-opacity").fill("80")
    assert heat.evaluate("h => h.style.opacity") == "0.8"
    page.locator("#heatmap-toggle").uncheck()
    expect(heat).to_be_hidden()
    page.locator("#heatmap-toggle").check()
    expect(heat).to_be_visible()

    # The bars show the calibrated probabilities the server stored, and the lab's call on them.
    with live_server.client() as client:
        stored = client.get(f"/api/v1/predictions/{prediction_id}").json()
    direct = bundled_classifier.predict([path.read_bytes()])[0].probabilities
    for li in page.locator("#probabilities li").all():
        name = li.get_attribute("data-class")
        assert float(li.get_attribute("data-probability")) == pytest.approx(stored["probabilities"][name], abs=1e-9)
        assert stored["probabilities"][name] == pytest.approx(direct[name], abs=1e-5)
    expect(page.locator("#abnormal-probability")).to_contain_text("%")
    expect(page.locator("#abnormal-call")).to_have_text(stored["abnormal_call"])
    expect(page.get_by_text("calibrated")).to_be_visible()


def test_keyboard_review_of_a_batch_and_csv(page, live_server, herlev_image):
    paths = [
        herlev_image(c, 10) for c in ("normal_intermediate", "light_dysplastic", "carcinoma_in_situ", "normal_columnar")
    ]
    with live_server.client() as client:
        batch_id = client.post(
            "/api/v1/batches", files=[("image", (p.name, p.read_bytes(), "image/bmp")) for p in paths],
            data={"accession_id": "S26-KEYS"},
        ).json()["id"]  # fmt: skip
        for _ in range(600):
            if client.get(f"/api/v1/batches/{batch_id}").json()["status"] == "done":
                break
            page.wait_for_timeout(200)
        ranked = client.get(f"/api/v1/batches/{batch_id}/items", params={"order": "suspicion"}).json()["items"]

    sign_in(page, live_server, "pathologist")
    page.goto(f"{live_server.url}/batches/{batch_id}")
    expect(page.locator("#gallery .tile")).to_have_count(len(paths))
    page.keyboard.press("r")  # start the review: the most suspicious cell first
    expect(page).to_have_url(re.compile(rf"/queue/items/{ranked[0]['id']}\?"))

    expected = []
    for step, item in enumerate(ranked[:3]):
        expect(page).to_have_url(re.compile(rf"/queue/items/{item['id']}\?"))
        call = item["prediction"]["predicted_class"]
        if step == 1:  # override with the first class that is not the model's call, by its number key
            number = next(i for i, name in enumerate(CLASS_NAMES, start=1) if name != call)
            page.keyboard.press(str(number))
            expected.append(("override", CLASS_NAMES[number - 1]))
        else:
            page.keyboard.press("Enter" if step == 0 else "c")
            expected.append(("confirm", call))
        page.wait_for_load_state()
    expect(page).to_have_url(re.compile(rf"/queue/items/{ranked[3]['id']}\?"))
    page.keyboard.press("k")  # back to the third cell: it shows its review
    expect(page.locator("#final-label")).to_contain_text(CLASS_LABELS[expected[2][1]])

    with live_server.client() as client:
        for item, (action, label) in zip(ranked[:3], expected, strict=True):
            reviews = client.get(f"/api/v1/predictions/{item['prediction']['id']}").json()["reviews"]
            assert [(r["action"], r["label"], r["reviewer"]) for r in reviews] == [
                (action, label, live_server.users["pathologist"])
            ]
        assert client.get(f"/api/v1/predictions/{ranked[3]['prediction']['id']}").json()["reviews"] == []
        export = client.get(f"/api/v1/batches/{batch_id}/export.csv").text
    rows = {row["item_id"]: row for row in csv.DictReader(io.StringIO(export))}
    for item, (action, label) in zip(ranked[:3], expected, strict=True):
        row = rows[str(item["id"])]
        assert (row["review_action"], row["final_label"], row["reviewer"]) == (
            action, label, live_server.users["pathologist"],
        )  # fmt: skip
        assert row["accession_id"] == "S26-KEYS" and row["file_name"] == item["file_name"]
    assert rows[str(ranked[3]["id"])]["review_action"] == ""
