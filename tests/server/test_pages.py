"""Browser pages over HTTP: sign-in, CSRF on every form, roles on admin pages, upload errors."""

from sqlalchemy import text


def csrf_of(html: str) -> str:
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def test_sign_in_failure_is_refused_and_audited(live_server):
    with live_server.anonymous() as client:
        token = csrf_of(client.get("/login").text)
        wrong = client.post(
            "/login", data={"username": live_server.users["pathologist"], "password": "nope", "csrf": token}
        )
        unknown = client.post("/login", data={"username": "ghost", "password": "whatever-long", "csrf": token})
        assert wrong.status_code == 401 and "wrong username or password" in wrong.text
        assert unknown.status_code == 401 and "wrong username or password" in unknown.text
        assert client.get("/", follow_redirects=False).status_code == 303
    with live_server.context.engine.connect() as connection:
        failures = (
            connection.execute(text("SELECT actor FROM audit_events WHERE action = 'login.failure'")).scalars().all()
        )
    assert f"user:{live_server.users['pathologist']}" in failures and "user:ghost" in failures


def test_forms_without_csrf_token_are_refused(live_server, sign_in, herlev_image):
    with live_server.anonymous() as client:
        no_token = client.post(
            "/login", data={"username": live_server.users["pathologist"], "password": "correct-horse-battery"}
        )
        assert no_token.status_code == 403
    client, csrf = sign_in(live_server, "pathologist")
    try:
        before = live_server.count("predictions")
        forged = client.post(
            "/upload", files={"image": ("c.bmp", herlev_image("light_dysplastic", 4).read_bytes())}, data={"csrf": "x"}
        )
        assert forged.status_code == 403 and live_server.count("predictions") == before
        ok = client.post(
            "/upload",
            files={"image": ("c.bmp", herlev_image("light_dysplastic", 4).read_bytes())},
            data={"csrf": csrf, "accession_id": "ACC-WEB"},
            follow_redirects=False,
        )
        assert ok.status_code == 303 and ok.headers["location"].startswith("/predictions/")
        page = client.get(ok.headers["location"])
        assert page.status_code == 200 and "Model suggestion" in page.text and "ACC-WEB" in page.text
        prediction_id = int(ok.headers["location"].rsplit("/", 1)[1])
        forged_review = client.post(f"/predictions/{prediction_id}/reviews", data={"action": "confirm", "csrf": "x"})
        assert forged_review.status_code == 403
        assert "Not reviewed yet" in client.get(f"/predictions/{prediction_id}").text
    finally:
        client.close()


def test_admin_pages_are_for_admins_only(live_server, sign_in):
    client, csrf = sign_in(live_server, "pathologist")
    try:
        assert client.get("/admin").status_code == 403
        assert client.post("/admin/apikeys", data={"name": "sneaky", "csrf": csrf}).status_code == 403
    finally:
        client.close()
    admin, csrf = sign_in(live_server, "admin")
    try:
        page = admin.get("/admin")
        assert page.status_code == 200 and live_server.users["cytotechnologist"] in page.text
        created = admin.post(
            "/admin/users",
            data={"username": "new.cytotech", "password": "long-enough-pw", "role": "cytotechnologist", "csrf": csrf},
        )
        assert created.status_code == 200 and "User new.cytotech created." in created.text
        bad = admin.post("/admin/users", data={"username": "x", "password": "short", "role": "admin", "csrf": csrf})
        assert bad.status_code == 422 and "at least 12" in bad.text
    finally:
        admin.close()
    with live_server.context.engine.connect() as connection:
        assert connection.execute(text("SELECT role FROM users WHERE username = 'new.cytotech'")).scalar_one() == (
            "cytotechnologist"
        )


def _browser_sign_in(live_server, username: str, password: str):
    client = live_server.anonymous()
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"username": username, "password": password, "csrf": token})
    return client, response


def test_admin_deactivates_and_reactivates_a_user(live_server, sign_in):
    admin, csrf = sign_in(live_server, "admin")
    try:
        created = admin.post(
            "/admin/users",
            data={
                "username": "leaving.cytotech",
                "password": "long-enough-pw",
                "role": "cytotechnologist",
                "csrf": csrf,
            },
        )
        assert created.status_code == 200
        leaving, response = _browser_sign_in(live_server, "leaving.cytotech", "long-enough-pw")
        assert response.status_code == 303 and leaving.get("/", follow_redirects=False).status_code == 200

        off = admin.post("/admin/users/active", data={"username": "leaving.cytotech", "active": "false", "csrf": csrf})
        assert off.status_code == 200 and "User leaving.cytotech deactivated." in off.text
        assert leaving.get("/", follow_redirects=False).status_code == 303  # the open session ends
        _, refused = _browser_sign_in(live_server, "leaving.cytotech", "long-enough-pw")
        assert refused.status_code == 401

        on = admin.post("/admin/users/active", data={"username": "leaving.cytotech", "active": "true", "csrf": csrf})
        assert on.status_code == 200
        again, accepted = _browser_sign_in(live_server, "leaving.cytotech", "long-enough-pw")
        assert accepted.status_code == 303
        again.close()
        leaving.close()

        myself = admin.post(
            "/admin/users/active", data={"username": live_server.users["admin"], "active": "false", "csrf": csrf}
        )
        assert myself.status_code == 422 and "your own account" in myself.text
        unknown = admin.post("/admin/users/active", data={"username": "nobody", "active": "false", "csrf": csrf})
        assert unknown.status_code == 422 and "no user named" in unknown.text
    finally:
        admin.close()
    with live_server.context.engine.connect() as connection:
        actions = (
            connection.execute(text("SELECT action FROM audit_events WHERE action LIKE 'user.%activate' ORDER BY id"))
            .scalars()
            .all()
        )
    assert actions == ["user.deactivate", "user.activate"]
