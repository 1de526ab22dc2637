"""The review screen and the case page in a real browser (Playwright, Debian's chromium), SQLite only
like test_browser.py: keys that never misfire, mouse review with comment, undo, amendment with a reason,
the cell viewer, case sign-out, the printable report, and phone width.

Screenshots of the case page and the review screen at desktop and phone width go to
PAPCAD_DOCS_SCREENSHOTS (default: a temporary folder; docs/ holds the committed ones).
"""

import os
import re
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from app.ml.classes import CLASS_LABELS, CLASS_NAMES
from tests.server.conftest import csrf_of
from tests.server.test_batches import wait_until_done
from tests.server.test_browser import TIMEOUT_MS, browser, database_url  # noqa: F401 (fixtures)
from tests.server.test_browser import sign_in as browser_sign_in

pytestmark = pytest.mark.browser

ACCESSION = "S26-SCREEN-1"
CELLS = [("carcinoma_in_situ", 5), ("normal_intermediate", 5), ("light_dysplastic", 5), ("normal_superficiel", 5)]
PHONE = {"width": 390, "height": 844}


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("PAPCAD_DOCS_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def batch(live_server, herlev_image) -> dict:
    """One classified batch of four cells for the accession, ranked most suspicious first."""
    files = [("image", (herlev_image(n, i).name, herlev_image(n, i).read_bytes())) for n, i in CELLS]
    with live_server.client() as api:
        created = api.post("/api/v1/batches", files=files, data={"accession_id": ACCESSION, "name": "slide 1"})
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        wait_until_done(api, batch_id)
        ranked = api.get(f"/api/v1/batches/{batch_id}/items", params={"order": "suspicion"}).json()["items"]
    return {"id": batch_id, "items": ranked}


@pytest.fixture
def desk(browser):  # noqa: F811 (the imported fixture)
    """A desktop-size page; the test fails if a script error or a Content-Security-Policy violation occurred."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    yield page
    context.close()
    assert problems == []


def assert_fits(page: Page, what: str) -> None:
    """Nothing on the page is wider than the screen (no sideways scrolling), the header included."""
    width = page.viewport_size["width"]
    wide = page.evaluate(
        "w => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > w + 1)"
        ".slice(0, 5).map(e => e.tagName + '#' + e.id + '.' + e.className)",
        width,
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= width, (what, wide)
    assert page.locator("body > header").bounding_box()["width"] <= width


def reviews_of(server, prediction_id: int) -> list[dict]:
    with server.client() as api:
        return api.get(f"/api/v1/predictions/{prediction_id}").json()["reviews"]


def open_item(page: Page, server, batch: dict, index: int) -> dict:
    item = batch["items"][index]
    page.goto(f"{server.url}/queue/items/{item['id']}?batch={batch['id']}")
    expect(page.locator("#review-surface")).to_be_visible()
    return item


def test_enter_on_a_link_or_button_never_records_a_review(desk, live_server, batch, shots):
    browser_sign_in(desk, live_server, "cytotechnologist")
    item = open_item(desk, live_server, batch, 0)
    expect(desk.locator("#cell-context")).to_contain_text(ACCESSION)
    expect(desk.locator("#cell-context")).to_contain_text(f"Batch {batch['id']}")
    expect(desk.locator("#cutoff-call")).to_have_text(item["prediction"]["abnormal_call"])

    desk.focus('header nav a[href="/batches"]')
    desk.keyboard.press("Enter")
    expect(desk).to_have_url(f"{live_server.url}/batches")

    open_item(desk, live_server, batch, 0)
    desk.focus("#next")
    desk.keyboard.press("Enter")
    expect(desk).to_have_url(re.compile(rf"/queue/items/{batch['items'][1]['id']}\?"))

    open_item(desk, live_server, batch, 0)
    desk.fill("#review-comment", "c 1 2")  # typing keys in the comment field reviews nothing
    desk.keyboard.press("Enter")
    desk.focus("#heatmap-class")
    desk.keyboard.press("Enter")
    desk.focus("#heatmap-toggle")
    desk.keyboard.press("Enter")
    expect(desk).to_have_url(re.compile(rf"/queue/items/{item['id']}\?"))
    assert reviews_of(live_server, item["prediction"]["id"]) == []

    # At phone width the header and the review screen fit the screen.
    phone_context = desk.context.browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    phone_context.add_cookies(desk.context.cookies())
    phone = phone_context.new_page()
    open_item(phone, live_server, batch, 0)
    assert_fits(phone, "review")
    phone.screenshot(path=str(shots / "review-phone.png"), full_page=True)
    phone_context.close()

    # Tabbing to the Sign-out button and pressing Enter signs out: it does not confirm the cell.
    desk.focus("header .who button")
    desk.keyboard.press("Enter")
    expect(desk).to_have_url(re.compile(r"/login$"))
    assert reviews_of(live_server, item["prediction"]["id"]) == []


def test_mouse_review_comment_undo_amend_and_viewer(desk, live_server, batch, shots):
    browser_sign_in(desk, live_server, "pathologist")
    item = open_item(desk, live_server, batch, 1)
    pid, call = item["prediction"]["id"], item["prediction"]["predicted_class"]

    # The viewer: click to enlarge, 1:1 shows native pixels, zoom in doubles past it.
    desk.click("#cell-image")
    viewer = desk.locator("#cell-viewer")
    expect(viewer).to_be_visible()
    viewer.get_by_role("button", name="1:1").click()
    shown = viewer.locator(".viewer-stage img").first
    width_native = shown.evaluate("i => i.getBoundingClientRect().width")
    assert width_native == pytest.approx(shown.evaluate("i => i.naturalWidth"), abs=0.5)
    viewer.get_by_role("button", name="+").click()
    assert shown.evaluate("i => i.getBoundingClientRect().width") == pytest.approx(width_native * 1.5, rel=0.01)
    desk.keyboard.press("Escape")
    expect(viewer).to_be_hidden()

    # Grad-CAM for another class than the call.
    other = next(n for n in CLASS_NAMES if n != call)
    desk.select_option("#heatmap-class", other)
    expect(desk.locator("#heatmap")).to_have_attribute("src", re.compile(rf"class={other}"))
    desk.wait_for_function(
        "() => document.querySelector('#heatmap').complete && document.querySelector('#heatmap').naturalWidth > 0"
    )
    desk.screenshot(path=str(shots / "review-desktop.png"), full_page=True)

    # Override by mouse, with a comment: the next cell opens, the review is recorded.
    desk.fill("#review-comment", "koilocytes")
    desk.click(f"#label-{other}")
    expect(desk).to_have_url(re.compile(rf"/queue/items/{batch['items'][2]['id']}\?"))
    recorded = reviews_of(live_server, pid)
    assert [(r["action"], r["label"], r["comment"]) for r in recorded] == [("override", other, "koilocytes")]

    # Undo (within the minute) takes it back and shows that cell again.
    expect(desk.locator("#undo-form")).to_contain_text(CLASS_LABELS[other])
    desk.click("#undo-button")
    expect(desk).to_have_url(re.compile(rf"/queue/items/{item['id']}\?"))
    assert reviews_of(live_server, pid) == []

    # Confirm by mouse; then change it: without a reason it is refused, with one it is an amendment.
    desk.click("#confirm-button")
    expect(desk).to_have_url(re.compile(rf"/queue/items/{batch['items'][2]['id']}\?"))
    open_item(desk, live_server, batch, 1)
    expect(desk.locator("#final-label")).to_contain_text(CLASS_LABELS[call])
    desk.click(f"#label-{other}")
    expect(desk.locator("#review-error")).to_contain_text("reason")
    desk.fill("#review-reason", "second look: nuclear enlargement")
    desk.click(f"#label-{other}")
    expect(desk).to_have_url(re.compile(rf"/queue/items/{batch['items'][2]['id']}\?"))
    first, amended = reviews_of(live_server, pid)
    assert first["action"] == "confirm" and amended["action"] == "override" and amended["label"] == other
    assert amended["amends_review_id"] == first["id"] and amended["amend_reason"] == "second look: nuclear enlargement"

    # The gallery tile shows the final label and an override mark, the batch and the accession.
    desk.goto(f"{live_server.url}/batches/{batch['id']}")
    tile = desk.locator(f'.tile[data-item="{item["id"]}"]')
    expect(tile.locator(".final-label")).to_contain_text(CLASS_LABELS[other])
    expect(tile.locator(".tag.override")).to_be_visible()
    expect(tile).to_contain_text(ACCESSION)
    expect(desk.locator("#review-progress")).to_contain_text("1 of 4 reviewed")


def test_case_sign_out_report_and_phone_width(desk, browser, live_server, batch, sign_in, shots):  # noqa: F811
    # A cytotechnologist reviews the rest over the API and refers the case.
    cyto, token = sign_in(live_server, "cytotechnologist")
    for item in batch["items"]:
        p = item["prediction"]
        if not reviews_of(live_server, p["id"]):
            done = cyto.post(
                f"/api/v1/predictions/{p['id']}/reviews", json={"action": "confirm"}, headers={"X-CSRF-Token": token}
            )
            assert done.status_code == 201, done.text
    page = cyto.get(f"/cases/{ACCESSION}")
    referred = cyto.post(f"/cases/{ACCESSION}/refer", data={"csrf": csrf_of(page.text), "note": "please sign out"})
    assert referred.status_code == 303
    cyto.close()

    browser_sign_in(desk, live_server, "pathologist")
    desk.click('header nav a[href="/cases"]')
    desk.locator(f'#cases tr[data-accession="{ACCESSION}"] a').click()
    expect(desk).to_have_url(f"{live_server.url}/cases/{ACCESSION}")
    expect(desk.locator("#case-status")).to_have_text("referred to a pathologist")
    expect(desk.locator("#review-progress")).to_contain_text("4 of 4 reviewed")
    expect(desk.locator("#case-complete")).to_be_visible()
    expect(desk.locator("#suggestion")).to_be_visible()
    rows = desk.locator("#case-cells tbody tr")
    expect(rows).to_have_count(4)
    shown = [float(t.split()[0]) for t in desk.locator("#case-cells tbody td:nth-child(3)").all_inner_texts()]
    assert shown == sorted(shown, reverse=True)
    desk.screenshot(path=str(shots / "case-desktop.png"), full_page=True)

    desk.select_option("#interpretation", "LSIL")
    desk.fill("#sign-out-comment", "repeat cytology in 12 months")
    dismissed = []
    desk.once("dialog", lambda d: (dismissed.append(d.message), d.dismiss()))
    desk.click("#sign-out-form button[type=submit]")
    expect(desk.locator("#case-status")).to_have_text("referred to a pathologist")  # dismissed: nothing happens
    assert dismissed and "locked" in dismissed[0]
    desk.once("dialog", lambda d: d.accept())
    desk.click("#sign-out-form button[type=submit]")
    expect(desk.locator("#case-status")).to_have_text("signed out")
    expect(desk.locator("#final-interpretation")).to_contain_text("Low-grade squamous intraepithelial lesion")

    # Amendment with a reason, kept beside the original.
    desk.locator("#amend summary").click()
    desk.select_option("#amend-interpretation", "HSIL")
    desk.fill("#amend-reason", "HSIL cells found on re-screening")
    desk.get_by_role("button", name="Amend").click()
    expect(desk.locator("#case-status")).to_contain_text("amended")
    expect(desk.locator("#reports tbody tr")).to_have_count(2)
    expect(desk.locator('#reports tr[data-sequence="1"]')).to_contain_text("LSIL")
    expect(desk.locator('#reports tr[data-sequence="2"]')).to_contain_text("HSIL cells found on re-screening")

    # The printable report: the menu is gone in print, the interpretation and its history are there.
    desk.click("#print-report")
    expect(desk.locator("#report-status")).to_have_text("AMENDED")
    desk.emulate_media(media="print")
    expect(desk.locator("body > header")).to_be_hidden()
    expect(desk.locator("#print-button")).to_be_hidden()
    expect(desk.locator("#report-interpretation")).to_contain_text("High-grade")
    expect(desk.locator("#report-history li")).to_have_count(2)
    pdf = desk.pdf(format="A4")
    assert pdf.startswith(b"%PDF")
    desk.emulate_media(media="screen")

    # Phone width: neither the header nor the case page nor the review screen is wider than the screen.
    phone_context = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    phone_context.set_default_timeout(TIMEOUT_MS)
    phone = phone_context.new_page()
    browser_sign_in(phone, live_server, "pathologist")
    phone.goto(f"{live_server.url}/cases/{ACCESSION}")
    assert_fits(phone, "case")
    phone.screenshot(path=str(shots / "case-phone.png"), full_page=True)
    phone_context.close()
