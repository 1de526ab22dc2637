"""The model registry and shadow mode on a live server (SQLite and PostgreSQL): register, shadow-score,
compare, promote and roll back without a restart, audited; the start-up rule for PAPCAD_MODEL_DIR."""

import os
import shutil
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app.config import Settings
from app.db.migrate import upgrade_to_head
from app.db.models import AuditEvent, ModelVersion, Prediction, ShadowPrediction
from app.db.session import make_engine, make_session_factory
from app.errors import ConflictError, PermissionDeniedError
from app.ml.artifact import read_card, sha256_file, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.explain import heatmap_png
from app.services import registry, site_data
from app.services.actors import SYSTEM, Actor


def papcad(args: list[str], database_url: str, data_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATABASE_URL": database_url, "PAPCAD_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env, timeout=180
    )


def upload(server, image_path: Path) -> dict:
    with server.client() as client:
        response = client.post(
            "/api/v1/predictions",
            files={"image": (image_path.name, image_path.read_bytes(), "image/bmp")},
            data={"accession_id": "REG-1"},
        )
    assert response.status_code == 201, response.text
    return response.json()


def wait_for_version(server, image_path: Path, version: str) -> dict:
    """Upload until the server's calls come from `version` (servers look at the registry every few seconds)."""
    deadline = time.monotonic() + 30
    while True:
        body = upload(server, image_path)
        if body["model_version"] == version or time.monotonic() > deadline:
            return body
        time.sleep(1)


@pytest.fixture(scope="module")
def candidate_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-candidate"
    shutil.copytree(tiny_model_dir, out)
    card = read_card(out)
    card["version"] = "tiny-candidate"
    card["cross_validation"] = {  # as `papcad record-cv` writes it (values made up: the page shows them)
        "k": 5,
        "held_out_folds": {
            "accuracy_7class": {"mean": 0.612, "std": 0.031, "folds": []},
            "binary_roc_auc": {"mean": 0.9512, "std": 0.0123, "folds": []},
        },
    }
    write_card(out, card)
    return out


@pytest.mark.slow  # shadow calls, promotion and rollback through `papcad` and a live server
@pytest.mark.cli
def test_shadow_promote_and_rollback_without_restart(live_server, candidate_dir, herlev_image, sign_in):
    server = live_server
    bundled = server.context.classifier
    listed = papcad(["model", "list"], server.context.settings.effective_database_url, server.data_dir)
    assert listed.returncode == 0, listed.stderr
    assert "active" in listed.stdout and bundled.version in listed.stdout

    registered = papcad(["model", "register", str(candidate_dir)], server.context.settings.effective_database_url,
                        server.data_dir)  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    assert "tiny-candidate: candidate" in registered.stdout
    again = papcad(["model", "register", str(candidate_dir)], server.context.settings.effective_database_url,
                   server.data_dir)  # fmt: skip
    assert again.returncode == 0  # registering the same directory twice changes nothing

    # The candidate scores new cells silently; the reviewer sees only the active model's call.
    cell = herlev_image("carcinoma_in_situ", 3)
    deadline = time.monotonic() + 30
    while True:
        shown = upload(server, cell)
        server.context.models.shadow.join()
        with server.context.sessions() as session:
            shadows = list(
                session.scalars(select(ShadowPrediction).where(ShadowPrediction.prediction_id == shown["id"]))
            )
        if shadows or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert shown["model_version"] == bundled.version
    assert [s.model_version for s in shadows] == ["tiny-candidate"]
    assert "tiny-candidate" not in str(shown)

    browser, csrf = sign_in(server, "pathologist")
    with closing(browser):
        first, amended = [name for name in CLASS_NAMES if name != shown["predicted_class"]][:2]
        for body in ({"action": "override", "label": first},
                     {"action": "override", "label": amended, "reason": "second look at the nucleus"}):  # fmt: skip
            reviewed = browser.post(
                f"/api/v1/predictions/{shown['id']}/reviews", json=body, headers={"X-CSRF-Token": csrf}
            )
            assert reviewed.status_code == 201, reviewed.text
        with server.context.sessions() as session:  # the final label is the latest review: what adapt learns
            cells = {c.prediction_id: c for c in site_data.reviewed_cells(session)}
        assert (cells[shown["id"]].label, cells[shown["id"]].group) == (amended, "accession:REG-1")
        monitoring = browser.get("/dashboard")
        assert monitoring.status_code == 200
        assert 'data-candidate="tiny-candidate"' in monitoring.text
        assert 'data-model="active"' in monitoring.text and 'data-metric="kappa"' in monitoring.text
        refused = browser.post("/admin/models/promote", data={"csrf": csrf, "version": "tiny-candidate"})
        assert refused.status_code == 403

    admin, admin_csrf = sign_in(server, "admin")
    with closing(admin):
        page = admin.get("/admin")
        assert 'data-model-version="tiny-candidate" data-status="candidate"' in page.text
        assert "cross-validation, 5 folds: 7-class 61.2 % ± 3.1 %, ROC AUC 0.951 ± 0.012" in page.text
        unknown = admin.post("/admin/models/promote", data={"csrf": admin_csrf, "version": "no-such-model"})
        assert unknown.status_code == 422 and "not registered" in unknown.text
        promoted = admin.post("/admin/models/promote", data={"csrf": admin_csrf, "version": "tiny-candidate"})
        assert promoted.status_code == 200 and "tiny-candidate is now active" in promoted.text

    after = wait_for_version(server, cell, "tiny-candidate")
    assert after["model_version"] == "tiny-candidate"
    with server.context.sessions() as session:
        row = session.get(Prediction, after["id"])
        assert row.weights_sha256 == read_card(candidate_dir)["weights_sha256"]
        assert session.get(Prediction, shown["id"]).model_version == bundled.version  # kept as it was

    rolled = papcad(["model", "rollback"], server.context.settings.effective_database_url, server.data_dir)
    assert rolled.returncode == 0, rolled.stderr
    assert f"{bundled.version} is now the active model" in rolled.stdout
    back = wait_for_version(server, cell, bundled.version)
    assert back["model_version"] == bundled.version

    with server.context.sessions() as session:
        events = [
            (e.action, e.entity_id, e.actor)
            for e in session.scalars(select(AuditEvent).where(AuditEvent.entity_type == "model_version"))
        ]
        statuses = {m.version: m.status for m in session.scalars(select(ModelVersion))}
    assert ("model.register", "tiny-candidate", "system:papcad") in events
    assert ("model.promote", "tiny-candidate", "user:admin-user") in events
    assert ("model.rollback", bundled.version, "system:papcad") in events
    assert statuses == {bundled.version: "active", "tiny-candidate": "retired"}


@pytest.fixture(scope="module")
def low_cutoff_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A registrable model of its own (other weights, same calls) whose card sets a very different cut-off."""
    out = tmp_path_factory.mktemp("models") / "tiny-low-cutoff"
    shutil.copytree(tiny_model_dir, out)
    with np.load(out / "weights.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["head/bias"] = arrays["head/bias"] + np.float16(0.5)  # a shift softmax ignores: new weights, same calls
    with open(out / "weights.npz", "wb") as handle:
        np.savez_compressed(handle, **arrays)
    card = read_card(out)
    card.update(
        version="tiny-low-cutoff",
        weights_sha256=sha256_file(out / "weights.npz"),
        abnormal_threshold={"value": 0.05, "chosen_on": "validation", "target_sensitivity": 0.95},
    )
    write_card(out, card)
    return out


def drawn_by(model: Classifier, image_path: Path, class_name: str) -> bytes:
    return heatmap_png(model.heatmap, image_path.read_bytes(), model.spec, CLASS_NAMES.index(class_name))


@pytest.mark.slow  # promotes a second model on a live server and draws heatmaps with both
def test_each_call_is_read_and_explained_by_the_model_that_made_it(live_server, low_cutoff_dir, herlev_image):
    """After a promotion new calls use the new model's cut-off and version, earlier calls keep theirs (in the
    API, the needs-review reasons and the queue's SQL filter alike), and a heatmap is drawn by the model that
    made the call: a retired model is loaded again for it, and when its files are gone the heatmap is refused."""
    server = live_server
    cell = herlev_image("moderate_dysplastic", 2)
    with server.context.sessions() as session:
        active = registry.active_version(session)
        bundled = Classifier.load(Path(active.directory))
    earlier = upload(server, cell)
    assert earlier["model_version"] == bundled.version
    assert earlier["abnormal_threshold"] == pytest.approx(bundled.abnormal_threshold)

    with server.context.sessions() as session:
        registry.register(session, SYSTEM, low_cutoff_dir)
        registry.promote(session, SYSTEM, "tiny-low-cutoff")
    later = wait_for_version(server, cell, "tiny-low-cutoff")
    assert later["model_version"] == "tiny-low-cutoff"
    assert later["abnormal_threshold"] == 0.05
    assert later["abnormal_call"] == ("abnormal" if later["abnormal_probability"] >= 0.05 else "normal")
    with server.client() as client:
        kept = client.get(f"/api/v1/predictions/{earlier['id']}").json()
        ready = client.get("/readyz").json()
    assert ready["model_version"] == "tiny-low-cutoff"
    assert kept["abnormal_threshold"] == pytest.approx(bundled.abnormal_threshold)
    assert (kept["abnormal_call"], kept["review_reasons"]) == (earlier["abnormal_call"], earlier["review_reasons"])

    policy = server.context.policy
    assert policy.abnormal_threshold == 0.05
    with server.context.sessions() as session:
        rows = list(session.scalars(select(Prediction)))
        by_sql = set(session.scalars(select(Prediction.id).where(policy.needs_review_clause())))
    assert {r.model_version for r in rows} >= {bundled.version, "tiny-low-cutoff"}
    assert by_sql == {r.id for r in rows if policy.needs_review(r)}

    with server.client() as client:
        old_map = client.get(f"/api/v1/predictions/{earlier['id']}/heatmap")
        new_map = client.get(f"/api/v1/predictions/{later['id']}/heatmap")
    assert old_map.status_code == new_map.status_code == 200
    assert old_map.content == drawn_by(bundled, cell, earlier["predicted_class"])
    tiny = Classifier.load(low_cutoff_dir)
    assert new_map.content == drawn_by(tiny, cell, later["predicted_class"]) != old_map.content

    rolled = papcad(["model", "rollback"], server.context.settings.effective_database_url, server.data_dir)
    assert rolled.returncode == 0, rolled.stderr
    assert wait_for_version(server, cell, bundled.version)["abnormal_threshold"] == pytest.approx(
        bundled.abnormal_threshold
    )
    # The retired model's files are gone: its call cannot be explained by another model, so it is refused.
    weights = low_cutoff_dir / "weights.npz"
    kept_weights = weights.read_bytes()
    weights.unlink()
    other_class = next(name for name in CLASS_NAMES if name != later["predicted_class"])
    with server.client() as client:
        refused = client.get(f"/api/v1/predictions/{later['id']}/heatmap", params={"class": other_class})
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "tiny-low-cutoff" in refused.json()["detail"] and "can no longer be loaded" in refused.json()["detail"]
    weights.write_bytes(kept_weights)
    with server.client() as client:
        again = client.get(f"/api/v1/predictions/{later['id']}/heatmap", params={"class": other_class})
    assert again.status_code == 200 and again.content == drawn_by(tiny, cell, other_class)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_url")


def test_startup_rule_and_refusals(empty_database, bundled_classifier, candidate_dir, tmp_path):
    upgrade_to_head(empty_database)
    engine = make_engine(empty_database)
    sessions = make_session_factory(engine)
    bundled_dir = bundled_classifier.model_dir
    try:
        with sessions() as session:
            # Empty registry: the configured model becomes the active one.
            first = registry.ensure_startup(session, SYSTEM, bundled_dir, explicit=False)
            assert (first.version, first.status) == (bundled_classifier.version, "active")
            # PAPCAD_MODEL_DIR set to a model the registry has never seen: registered and served.
            models = registry.start_models(sessions, Settings(data_dir=tmp_path, model_dir=candidate_dir))
            assert models.active().version == "tiny-candidate"
            models.stop()
        with sessions() as session:
            # A model the registry knows stays as the registry says: a restart does not undo a rollback.
            kept = registry.ensure_startup(session, SYSTEM, bundled_dir, explicit=True)
            assert kept.version == "tiny-candidate"
            with pytest.raises(PermissionDeniedError):
                registry.promote(session, Actor("user", 99, "dr.x", "pathologist"), bundled_classifier.version)
            with pytest.raises(ConflictError, match="already the active model"):
                registry.promote(session, SYSTEM, "tiny-candidate")
            twin = tmp_path / "twin"
            shutil.copytree(candidate_dir, twin)
            card = read_card(twin)
            card["version"] = "twin"
            write_card(twin, card)
            with pytest.raises(ConflictError, match="already registered as version 'tiny-candidate'"):
                registry.register(session, SYSTEM, twin)
            (twin / "weights.npz").write_bytes(b"not weights")
            with pytest.raises(Exception, match="SHA-256"):
                registry.register(session, SYSTEM, twin)
            session.rollback()
            assert [m.version for m in registry.list_versions(session)] == [
                "tiny-candidate",
                bundled_classifier.version,
            ]
            back = registry.rollback(session, SYSTEM)
            assert back.version == bundled_classifier.version
            with pytest.raises(ConflictError, match="already the active model"):
                registry.rollback(session, SYSTEM, to=bundled_classifier.version)
    finally:
        engine.dispose()


def test_registry_migration_downgrades_and_upgrades(empty_database):
    from alembic import command
    from sqlalchemy import create_engine, inspect

    from app.db.migrate import alembic_config

    upgrade_to_head(empty_database)
    config = alembic_config(empty_database)
    engine = create_engine(empty_database)
    try:
        command.downgrade(config, "0006")
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
        assert not {"model_versions", "shadow_predictions"} & tables and "predictions" in tables
        command.upgrade(config, "head")
        with engine.connect() as connection:
            assert {"model_versions", "shadow_predictions"} <= set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
