"""The smaller page fixes over real HTTP on SQLite and PostgreSQL: sign-in keeps the query string of
`next`, a bad Monitoring date shows the page with a message, the 403 page keeps the menu, the favicon,
Swagger UI and ReDoc from local files, the admin form's role has no default and changes ask first,
changing one's own password, and the start-up hint."""

import re

import httpx

from app.context import AppContext
from tests.server.conftest import PASSWORD, csrf_of


def test_sign_in_returns_to_the_full_address(live_server):
    with live_server.anonymous() as client:
        sent = client.get("/queue?unreviewed=1&order=uncertainty")
        assert sent.status_code == 303
        location = sent.headers["location"]
        assert location == "/login?next=/queue%3Funreviewed%3D1%26order%3Duncertainty"
        form = client.get(location)
        assert 'name="next" value="/queue?unreviewed=1&amp;order=uncertainty"' in form.text
        signed_in = client.post(
            "/login",
            data={
                "username": live_server.users["pathologist"],
                "password": PASSWORD,
                "csrf": csrf_of(form.text),
                "next": "/queue?unreviewed=1&order=uncertainty",
            },
        )
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/queue?unreviewed=1&order=uncertainty"


def test_bad_monitoring_date_and_forbidden_page_keep_the_page(live_server, sign_in):
    patho, _ = sign_in(live_server, "pathologist")
    bad = patho.get("/dashboard", params={"date_from": "2026-13-45"})
    patho.close()
    assert bad.status_code == 422
    assert 'id="date-error"' in bad.text and "date_from must be a date" in bad.text
    assert 'id="date-filter"' in bad.text and '<a href="/cases">Cases</a>' in bad.text

    cyto, _ = sign_in(live_server, "cytotechnologist")
    forbidden = cyto.get("/admin")
    cyto.close()
    assert forbidden.status_code == 403
    assert (
        '<a href="/batches">Batches</a>' in forbidden.text and live_server.users["cytotechnologist"] in forbidden.text
    )
    token = re.search(r'action="/logout"><input type="hidden" name="csrf" value="([^"]+)"', forbidden.text)
    assert token and token.group(1)  # the menu's sign-out works from the error page


def test_favicon_docs_offline_and_static_files(live_server):
    with live_server.anonymous() as client:
        login = client.get("/login")
        icon = client.get("/static/favicon.svg")
        docs, redoc = client.get("/docs"), client.get("/redoc")
        bundle = client.get("/static-offline-docs/swagger-ui-bundle.js")
        redoc_js = client.get("/static-offline-docs/redoc.standalone.js")
    assert '<link rel="icon" href="/static/favicon.svg"' in login.text
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    for page in (docs, redoc):
        assert page.status_code == 200 and "cdn." not in page.text and "https://" not in page.text.split("<body")[0]
        assert "https:" not in page.headers["content-security-policy"]
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs.text and bundle.status_code == 200
    assert "/static-offline-docs/redoc.standalone.js" in redoc.text and redoc_js.status_code == 200


def test_admin_form_role_has_no_default_and_changes_ask_first(live_server, sign_in):
    admin, token = sign_in(live_server, "admin")
    with live_server.context.sessions() as session:
        from app.services import accounts
        from app.services.actors import SYSTEM

        accounts.create_api_client(session, SYSTEM, "lis-to-revoke")
        session.commit()
    page = admin.get("/admin").text
    no_role = admin.post(
        "/admin/users", data={"csrf": token, "username": "no-role", "password": "a-long-passphrase-42", "role": ""}
    )
    admin.close()
    assert '<option value="" selected disabled>Choose a role…</option>' in page
    assert re.search(r'<select id="new-role" name="role" required>', page)
    assert 'data-confirm="Deactivate ' in page and 'data-confirm="Revoke the API key of lis-to-revoke' in page
    assert no_role.status_code == 422 and live_server.count("users WHERE username = 'no-role'") == 0


def test_change_own_password(live_server, sign_in):
    with live_server.context.sessions() as session:
        from app.services import accounts
        from app.services.actors import SYSTEM

        accounts.create_user(session, SYSTEM, "changer", PASSWORD, "cytotechnologist")
        session.commit()
    client = live_server.anonymous()
    form = client.get("/login")
    client.post("/login", data={"username": "changer", "password": PASSWORD, "csrf": csrf_of(form.text)})
    token = csrf_of(client.get("/account").text)
    wrong = client.post("/account/password", data={"csrf": token, "current": "nope", "password": "new-passphrase-77"})
    assert wrong.status_code == 422 and "current password is wrong" in wrong.text
    weak = client.post("/account/password", data={"csrf": token, "current": PASSWORD, "password": "short"})
    assert weak.status_code == 422
    changed = client.post(
        "/account/password", data={"csrf": token, "current": PASSWORD, "password": "violet-kettle-harbour-9"}
    )
    assert changed.status_code == 303 and changed.headers["location"] == "/login?changed=1"
    assert client.get("/account").status_code == 303  # every session ended, this one too
    client.close()
    again = live_server.anonymous()
    form = again.get("/login?changed=1")
    assert "Your password was changed" in form.text
    old = again.post("/login", data={"username": "changer", "password": PASSWORD, "csrf": csrf_of(form.text)})
    new = again.post(
        "/login", data={"username": "changer", "password": "violet-kettle-harbour-9", "csrf": csrf_of(form.text)}
    )
    again.close()
    assert old.status_code == 401 and new.status_code == 303


def test_start_up_hint_names_the_virtual_environment(tmp_path, bundled_classifier, caplog):
    from app.config import Settings

    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    with caplog.at_level("WARNING"):
        context = AppContext.start(settings, bundled_classifier)
    context.stop()
    assert ".venv/bin/papcad user create --username admin --role admin" in caplog.text


def test_normal_tag_contrast_meets_aa(live_server):
    with httpx.Client(base_url=live_server.url) as client:
        css = client.get("/login").text
    normal = re.search(r"--normal:(#[0-9a-f]{6})", css).group(1)
    background = re.search(r"\.tag\.normal \{ background:(#[0-9a-f]{6})", css).group(1)

    def luminance(colour: str) -> float:
        channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(normal), luminance(background)), reverse=True)
    assert (high + 0.05) / (low + 0.05) >= 4.5
