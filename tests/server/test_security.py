"""Sessions, sign-in throttling, password policy, audit integrity and security headers, over real
HTTP against a live server on SQLite and on PostgreSQL.

Each test signs in from its own client address (X-Forwarded-For, which uvicorn accepts from the
loopback proxy), so the per-address throttle of one test does not reach the others.
"""

import hashlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.db.migrate import upgrade_to_head
from app.db.models import AuditEvent, LoginFailure, UserSession, utcnow
from app.main import create_app
from app.services import accounts
from app.services.actors import SYSTEM
from tests.server.conftest import PASSWORD, LiveServer, csrf_of, serving

NEW_PASSWORD = "violet-otter-lantern-42"


def browser(server, address: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60, headers={"X-Forwarded-For": address})


def log_in(client: httpx.Client, username: str, password: str) -> httpx.Response:
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"username": username, "password": password, "csrf": token})


def make_user(server, role: str = "cytotechnologist") -> str:
    name = f"u{uuid.uuid4().hex[:8]}"
    with server.context.sessions() as session:
        accounts.create_user(session, SYSTEM, name, PASSWORD, role)
        session.commit()
    return name


def events(server, action: str) -> list[AuditEvent]:
    with server.context.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))


def scalar(server, sql: str, value: object) -> object:
    with server.context.engine.connect() as connection:
        return connection.execute(text(sql), {"v": value}).scalar_one()


def signed_in(server, role: str, address: str) -> tuple[httpx.Client, str, str]:
    """(client, its CSRF token, username) for a new user with this role."""
    name = make_user(server, role)
    client = browser(server, address)
    assert log_in(client, name, PASSWORD).status_code == 303
    return client, csrf_of(client.get("/").text), name


# --- sessions ----------------------------------------------------------------------------------


def test_copied_cookie_stops_working_after_logout(live_server):
    client, csrf, name = signed_in(live_server, "pathologist", "10.1.0.1")
    cookie = client.cookies["papcad_session"]
    with live_server.context.sessions() as session:
        row = session.scalar(select(UserSession).where(UserSession.user.has(username=name)))
        assert row.token_hash == hashlib.sha256(cookie.encode()).hexdigest() and cookie not in row.token_hash
    copy = browser(live_server, "10.1.0.2")
    copy.cookies.set("papcad_session", cookie)
    assert copy.get("/", follow_redirects=False).status_code == 200

    assert client.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    refused = copy.get("/", follow_redirects=False)
    assert refused.status_code == 303 and refused.headers["location"].startswith("/login")
    assert 'papcad_session=""' in refused.headers["set-cookie"]  # the dead cookie is cleared
    api = httpx.get(f"{live_server.url}/api/v1/predictions", cookies={"papcad_session": cookie})
    assert api.status_code == 401 and api.headers["content-type"] == "application/problem+json"
    failures = [e for e in events(live_server, "auth.failure") if e.actor == f"user:{name}"]
    assert failures and all(e.detail["reason"] == "session ended" for e in failures)
    assert events(live_server, "logout")[-1].actor == f"user:{name}"
    client.close()
    copy.close()


def test_session_cookie_is_opaque_http_only_and_lax(live_server):
    name = make_user(live_server)
    with browser(live_server, "10.1.1.1") as client:
        response = log_in(client, name, PASSWORD)
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("papcad_session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert len(value) >= 43 and name not in value  # 256 random bits, nothing readable


def test_idle_and_absolute_expiry(live_server):
    settings = live_server.context.settings
    client, _, name = signed_in(live_server, "cytotechnologist", "10.1.2.1")

    def age(**fields) -> None:
        with live_server.context.sessions() as session:
            session.execute(update(UserSession).where(UserSession.user.has(username=name)).values(**fields))
            session.commit()

    # Two minutes quiet: still signed in, and the visit is noted.
    age(last_seen_at=utcnow() - timedelta(minutes=2))
    assert client.get("/", follow_redirects=False).status_code == 200
    with live_server.context.sessions() as session:
        seen = session.scalar(select(UserSession.last_seen_at).where(UserSession.user.has(username=name)))
    assert utcnow() - seen < timedelta(minutes=1)

    age(last_seen_at=utcnow() - timedelta(seconds=settings.session_idle_seconds + 1))
    assert client.get("/", follow_redirects=False).status_code == 303
    client.close()

    client = browser(live_server, "10.1.2.1")
    assert log_in(client, name, PASSWORD).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 200
    age(expires_at=utcnow() - timedelta(seconds=1))  # past the absolute maximum, though active
    assert client.get("/", follow_redirects=False).status_code == 303
    client.close()
    reasons = {e.detail["reason"] for e in events(live_server, "auth.failure") if e.actor == f"user:{name}"}
    assert {"session idle too long", "session expired"} <= reasons


def test_password_change_and_deactivation_end_sessions(live_server):
    admin, admin_csrf, _ = signed_in(live_server, "admin", "10.1.3.1")
    user, _, name = signed_in(live_server, "cytotechnologist", "10.1.3.2")
    changed = admin.post("/admin/users/password", data={"username": name, "password": NEW_PASSWORD, "csrf": admin_csrf})
    assert changed.status_code == 200 and "their open sessions have ended" in changed.text
    assert user.get("/", follow_redirects=False).status_code == 303
    assert log_in(browser(live_server, "10.1.3.2"), name, PASSWORD).status_code == 401
    again = browser(live_server, "10.1.3.2")
    assert log_in(again, name, NEW_PASSWORD).status_code == 303

    weak = admin.post("/admin/users/password", data={"username": name, "password": "123456789012", "csrf": admin_csrf})
    assert weak.status_code == 422 and "only digits" in weak.text

    off = admin.post("/admin/users/active", data={"username": name, "active": "false", "csrf": admin_csrf})
    assert off.status_code == 200
    assert again.get("/", follow_redirects=False).status_code == 303
    with live_server.context.sessions() as session:
        open_rows = session.scalars(
            select(UserSession).where(UserSession.user.has(username=name), UserSession.revoked_at.is_(None))
        ).all()
    assert open_rows == []
    assert [e.action for e in events(live_server, "user.password") if e.detail["sessions_ended"] >= 1]
    for client in (admin, user, again):
        client.close()


# --- sign-in throttling ------------------------------------------------------------------------


def test_account_is_throttled_after_five_failures(live_server):
    name = make_user(live_server)
    limit = live_server.context.settings.login_max_failures_per_account
    with browser(live_server, "10.2.0.1") as client:
        for _ in range(limit):
            assert log_in(client, name, "wrong-password-here").status_code == 401
        throttled = log_in(client, name, PASSWORD)  # the right password is not even checked
    assert throttled.status_code == 429 and "too many failed sign-ins" in throttled.text
    retry = int(throttled.headers["retry-after"])
    assert 0 < retry <= live_server.context.settings.login_failure_window_seconds
    with browser(live_server, "10.2.0.2") as elsewhere:  # per account, whatever the address
        assert log_in(elsewhere, name, PASSWORD).status_code == 429
    assert len([e for e in events(live_server, "login.failure") if e.actor == f"user:{name}"]) == limit
    throttled_events = [e for e in events(live_server, "login.throttled") if e.actor == f"user:{name}"]
    assert len(throttled_events) == 2 and throttled_events[0].detail["address"] == "10.2.0.1"

    # Once the window has passed, the right password works again and clears the count.
    with live_server.context.sessions() as session:
        window = timedelta(seconds=live_server.context.settings.login_failure_window_seconds)
        session.execute(update(LoginFailure).where(LoginFailure.username == name).values(at=utcnow() - window))
        session.commit()
    with browser(live_server, "10.2.0.3") as client:
        assert log_in(client, name, PASSWORD).status_code == 303
    assert scalar(live_server, "SELECT COUNT(*) FROM login_failures WHERE username = :v", name) == 0


def test_success_clears_the_account_count(live_server):
    name = make_user(live_server)
    limit = live_server.context.settings.login_max_failures_per_account
    with browser(live_server, "10.2.1.1") as client:
        for _ in range(limit - 1):
            assert log_in(client, name, "wrong-password-here").status_code == 401
        assert log_in(client, name, PASSWORD).status_code == 303
    with browser(live_server, "10.2.1.2") as client:
        for _ in range(limit - 1):
            assert log_in(client, name, "wrong-password-here").status_code == 401
        assert log_in(client, name, PASSWORD).status_code == 303


def test_address_is_throttled_after_twenty_failures(live_server):
    name = make_user(live_server)
    limit = live_server.context.settings.login_max_failures_per_address
    with browser(live_server, "10.2.2.1") as client:
        for i in range(limit):  # a different (unknown) account each time
            assert log_in(client, f"guess{i}", "wrong-password-here").status_code == 401
        refused = log_in(client, name, PASSWORD)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert "too many failed sign-ins" in refused.text
    with browser(live_server, "10.2.2.2") as other:
        assert log_in(other, name, PASSWORD).status_code == 303
    assert [e for e in events(live_server, "login.throttled") if e.detail["address"] == "10.2.2.1"]


# --- password policy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "words"),
    [
        ("1234567890", "at least 12"),
        (" " * 12, "only spaces"),
        ("123456789012", "only digits"),
        ("passwordpassword", "too easy to guess"),
    ],
)
def test_admin_page_refuses_weak_passwords(live_server, password, words):
    admin, csrf, _ = signed_in(live_server, "admin", "10.3.0.1")
    name = f"w{uuid.uuid4().hex[:8]}"
    response = admin.post("/admin/users", data={"username": name, "password": password, "role": "admin", "csrf": csrf})
    assert response.status_code == 422 and words in response.text
    assert scalar(live_server, "SELECT COUNT(*) FROM users WHERE username = :v", name) == 0
    same = admin.post(
        "/admin/users",
        data={"username": "carol.lindqvist", "password": "carol.lindqvist", "role": "admin", "csrf": csrf},
    )
    assert same.status_code == 422 and "username" in same.text
    admin.close()


@pytest.mark.cli
def test_cli_refuses_weak_passwords(database_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url, "PAPCAD_DATA_DIR": str(tmp_path)}

    def create(name: str, password: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "user", "create", "--username", name, "--role", "pathologist"],
            input=password + "\n", capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip

    for password, words in (
        ("1234567890", "at least 12"),
        ("            ", "only spaces"),
        ("31415926535897", "digits"),
    ):
        result = create(f"c{uuid.uuid4().hex[:6]}", password)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    assert create("cli.strong", NEW_PASSWORD).returncode == 0


# --- audit trail -------------------------------------------------------------------------------


def test_audit_events_cannot_be_replaced_changed_or_removed(live_server):
    engine = live_server.context.engine
    with engine.connect() as connection:
        first = connection.execute(text("SELECT id, actor, action FROM audit_events ORDER BY id LIMIT 1")).one()
    attempts = [
        "UPDATE audit_events SET actor = 'someone-else' WHERE id = :id",
        "DELETE FROM audit_events WHERE id = :id",
    ]
    if engine.dialect.name == "sqlite":
        attempts += [
            "INSERT OR REPLACE INTO audit_events (id, at, actor, action) VALUES (:id, '2020-01-01', 'x', 'forged')",
            "REPLACE INTO audit_events (id, at, actor, action) VALUES (:id, '2020-01-01', 'x', 'forged')",
        ]
    else:
        attempts += ["TRUNCATE audit_events"]
    for statement in attempts:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement), {"id": first.id})
    with engine.connect() as connection:
        assert (
            connection.execute(
                text("SELECT id, actor, action FROM audit_events WHERE id = :id"), {"id": first.id}
            ).one()
            == first
        )


def test_reads_and_refused_credentials_are_audited(live_server, sign_in):
    client, _ = sign_in(live_server, "pathologist")
    for path in ("/", "/batches", "/queue", "/dashboard", "/api/v1/monitoring"):
        assert client.get(path).status_code == 200, path
    client.close()
    actor = f"user:{live_server.users['pathologist']}"
    assert any(e.detail.get("page") == "home" for e in events(live_server, "prediction.list") if e.actor == actor)
    assert [e for e in events(live_server, "batch.list") if e.actor == actor]
    assert [e for e in events(live_server, "queue.read") if e.actor == actor]
    assert {e.detail.get("page") for e in events(live_server, "monitoring.read") if e.actor == actor} == {
        "dashboard",
        None,
    }

    name = f"old-lis-{uuid.uuid4().hex[:6]}"
    with live_server.context.sessions() as session:
        _, revoked_key = accounts.create_api_client(session, SYSTEM, name)
        session.commit()
    unknown_key = revoked_key[:-4] + "AAAA"
    with live_server.anonymous() as anonymous:
        assert (
            anonymous.get("/api/v1/predictions", headers={"Authorization": f"Bearer {unknown_key}"}).status_code == 401
        )
        admin, csrf = sign_in(live_server, "admin")
        assert admin.post("/admin/apikeys/revoke", data={"name": name, "csrf": csrf}).status_code == 200
        admin.close()
        assert (
            anonymous.get("/api/v1/predictions", headers={"Authorization": f"Bearer {revoked_key}"}).status_code == 401
        )
        assert anonymous.get("/api/v1/predictions", headers={"Authorization": "Basic abc"}).status_code == 401
        anonymous.cookies.set("papcad_session", "not-a-session")
        assert anonymous.get("/", follow_redirects=False).status_code == 303
    failures = events(live_server, "auth.failure")
    lookup = revoked_key.split("_")[1]
    by_reason = {e.detail["reason"]: e for e in failures}
    assert by_reason["unknown or malformed API key"].detail["key_prefix"] == lookup
    assert by_reason["revoked API key"].actor == f"apikey:{name}"
    assert "malformed Authorization header" in by_reason and "unknown session" in by_reason
    mine = ("unknown or malformed API key", "revoked API key", "malformed Authorization header", "unknown session")
    assert all(by_reason[reason].detail["address"] == "127.0.0.1" for reason in mine)
    for event in failures:  # the secret part of a key is never written down
        assert revoked_key not in str(event.detail) and unknown_key not in str(event.detail)


# --- headers -----------------------------------------------------------------------------------

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def check_headers(response: httpx.Response) -> str:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (response.request.url, name, response.headers.get(name))
    assert "camera=()" in response.headers["permissions-policy"]
    csp = response.headers["content-security-policy"]
    for directive in ("default-src 'self'", "frame-ancestors 'none'", "object-src 'none'", "base-uri 'self'",
                      "form-action 'self'", "img-src 'self' data: blob:"):  # fmt: skip
        assert directive in csp, (response.request.url, directive)
    return csp


def test_security_headers_on_pages_api_and_errors(live_server, sign_in, herlev_image):
    with live_server.client() as api:
        created = api.post(
            "/api/v1/predictions", files={"image": ("c.bmp", herlev_image("normal_superficiel", 0).read_bytes())}
        )
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        paths = [f"/api/v1/predictions/{pid}{tail}" for tail in ("", "/image", "/heatmap", "/fhir")]
        for path in (*paths, "/api/v1/predictions", "/api/v1/predictions/999999", "/healthz"):
            check_headers(api.get(path))
        check_headers(api.post("/api/v1/predictions", files={"image": ("x.txt", b"not an image")}))
    check_headers(httpx.get(f"{live_server.url}/api/v1/predictions"))  # 401

    login = httpx.get(f"{live_server.url}/login")
    csp = check_headers(login)
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    assert f'<style nonce="{nonce}">' in login.text
    assert re.search(r"'nonce-([^']+)'", check_headers(httpx.get(f"{live_server.url}/login"))).group(1) != nonce
    client, _ = sign_in(live_server, "pathologist")
    for path in ("/", f"/predictions/{pid}", "/batches", "/queue", "/dashboard", "/admin", "/no-such-page"):
        check_headers(client.get(path))
    client.close()
    docs = httpx.get(f"{live_server.url}/docs")
    # Swagger UI and ReDoc come from this server's own files: nothing outside it is allowed.
    assert "https:" not in docs.headers["content-security-policy"]
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
    assert docs.headers["x-frame-options"] == "DENY"


# --- PostgreSQL roles --------------------------------------------------------------------------


@pytest.fixture
def postgres_roles(postgres_url):
    """(app URL, owner URL) on a fresh database: an owner role that may create the schema, and a
    login role for the app with no rights of its own."""
    suffix = uuid.uuid4().hex[:8]
    owner, app = f"papcad_owner_{suffix}", f"papcad_app_{suffix}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE ROLE {owner} LOGIN PASSWORD 'owner-pw'"))
        connection.execute(text(f"CREATE ROLE {app} LOGIN PASSWORD 'app-pw'"))
        connection.execute(text(f"GRANT CREATE, USAGE ON SCHEMA public TO {owner}"))
        connection.execute(text("REVOKE CREATE ON SCHEMA public FROM PUBLIC"))
    base = make_url(postgres_url)
    urls = (
        base.set(username=app, password="app-pw").render_as_string(hide_password=False),
        base.set(username=owner, password="owner-pw").render_as_string(hide_password=False),
    )
    try:
        yield urls
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP OWNED BY {owner}, {app} CASCADE"))
            connection.execute(text(f"DROP ROLE {app}"))
            connection.execute(text(f"DROP ROLE {owner}"))
        admin.dispose()


@contextmanager
def serve_as_app_role(app_url: str, owner_url: str, classifier, data_dir: Path) -> Iterator[LiveServer]:
    """Migrate as the owner, then serve (and create the accounts) as the least-privilege app role."""
    upgrade_to_head(app_url, owner_url)
    settings = Settings(data_dir=data_dir, database_url=app_url, embedded_worker=False)
    app = create_app(settings, classifier=classifier)
    with serving(app) as url:
        context = app.state.context
        with context.sessions() as session:
            _, key = accounts.create_api_client(session, SYSTEM, "role-lis")
            accounts.create_user(session, SYSTEM, "role-admin", PASSWORD, "admin")
            session.commit()
        yield LiveServer(url, context, data_dir, key, {"admin": "role-admin"})


def test_postgres_app_role_cannot_tamper_with_the_audit_trail(
    postgres_roles, bundled_classifier, herlev_image, tmp_path
):
    app_url, owner_url = postgres_roles
    with serve_as_app_role(app_url, owner_url, bundled_classifier, tmp_path) as server:
        with server.client() as api:
            created = api.post(
                "/api/v1/predictions", files={"image": ("c.bmp", herlev_image("carcinoma_in_situ", 0).read_bytes())}
            )
        assert created.status_code == 201, created.text
    engine = create_engine(app_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT COUNT(*) FROM audit_events")).scalar_one() > 0
        for statement in (
            "UPDATE audit_events SET actor = 'x'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
            "ALTER TABLE audit_events DISABLE TRIGGER ALL",
            "DROP TABLE audit_events",
            "UPDATE alembic_version SET version_num = '0001'",
            "CREATE TABLE sneaky (id int)",
        ):
            with pytest.raises(DBAPIError, match="permission denied|must be owner"), engine.begin() as connection:
                connection.execute(text(statement))
    finally:
        engine.dispose()
