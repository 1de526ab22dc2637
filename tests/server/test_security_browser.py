"""The Content-Security-Policy in a real browser: every page's own scripts and styles run, and
chromium reports no violation. SQLite only (like test_browser.py); the headers themselves are
checked on both databases in test_security.py."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.server.conftest import PASSWORD

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PAPCAD_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"]


@pytest.fixture(scope="module")
def database_url(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('csp-sqlite') / 'papcad.db'}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium not found at {CHROMIUM} (set PAPCAD_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


def test_pages_run_under_the_content_security_policy(browser, live_server, herlev_image):
    with live_server.client() as api:
        created = api.post(
            "/api/v1/predictions", files={"image": ("c.bmp", herlev_image("severe_dysplastic", 1).read_bytes())}
        )
        assert created.status_code == 201, created.text
        batch = api.post(
            "/api/v1/batches", files=[("image", ("b.bmp", herlev_image("normal_columnar", 1).read_bytes()))]
        )
        assert batch.status_code == 202, batch.text
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation',"
        " e => console.error('Content Security Policy violation: ' + e.violatedDirective))"
    )
    try:
        page.goto(f"{live_server.url}/login")
        page.fill("#username", live_server.users["pathologist"])
        page.fill("#password", PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"{live_server.url}/")
        pages = ["/", f"/predictions/{created.json()['id']}", "/batches", f"/batches/{batch.json()['id']}", "/queue"]
        for path in [*pages, "/dashboard"]:
            page.goto(f"{live_server.url}{path}")
            page.wait_for_load_state("networkidle")
            # base.html's <style> applied: the header is white, not the browser's transparent default.
            assert page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor") == (
                "rgb(255, 255, 255)"
            ), path
        page.goto(f"{live_server.url}/predictions/{created.json()['id']}")
        page.locator("#heatmap-opacity").fill("90")  # driven by the page's own (nonce'd) script
        assert page.evaluate("document.querySelector('#heatmap').style.opacity") == "0.9"
    finally:
        context.close()
    assert violations == []
