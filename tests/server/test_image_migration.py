"""Migration 0003 moves file-stored images into the database (a missing file is skipped), keeps one
row per (user, Idempotency-Key), and its downgrade writes the files back. SQLite and PostgreSQL."""

import hashlib

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, text

from app.db.migrate import alembic_config


def _alembic(url: str) -> Config:
    return alembic_config(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def test_0003_moves_image_files_into_the_database_and_back(empty_url, tmp_path, monkeypatch, herlev_image):
    data_dir = tmp_path / "data"
    monkeypatch.setenv("PAPCAD_DATA_DIR", str(data_dir))
    config = _alembic(empty_url)
    command.upgrade(config, "0002")

    kept = herlev_image("normal_columnar", 3).read_bytes()
    sha = hashlib.sha256(kept).hexdigest()
    (data_dir / "images" / sha[:2]).mkdir(parents=True)
    (data_dir / "images" / sha[:2] / f"{sha}.bmp").write_bytes(kept)
    engine = create_engine(empty_url)
    insert_image = text(
        "INSERT INTO images (id, sha256, format, width, height, byte_size, storage_path, created_at) "
        "VALUES (:id, :sha, 'BMP', 1, 1, 1, :path, CURRENT_TIMESTAMP)"
    )
    insert_prediction = text(
        "INSERT INTO predictions (id, image_id, source, predicted_class, probabilities, abnormal_probability, "
        "model_version, weights_sha256, user_id, idempotency_key, created_at) VALUES "
        "(:id, 1, 'web', 'normal_columnar', '{}', 0.1, 'v', 'w', 1, 'twice', CURRENT_TIMESTAMP)"
    )
    with engine.begin() as connection:
        connection.execute(insert_image, {"id": 1, "sha": sha, "path": f"{sha[:2]}/{sha}.bmp"})
        connection.execute(insert_image, {"id": 2, "sha": "0" * 64, "path": f"00/{'0' * 64}.bmp"})  # file lost
        connection.execute(
            text(
                "INSERT INTO users (id, username, password_hash, role, active, created_at) "
                "VALUES (1, 'u', 'x', 'pathologist', true, CURRENT_TIMESTAMP)"
            )
        )
        for prediction_id in (1, 2):  # a pair the old race stored twice
            connection.execute(insert_prediction, {"id": prediction_id})

    command.upgrade(config, "0003")
    with engine.connect() as connection:
        stored = dict(connection.execute(text("SELECT image_id, data FROM image_data")).all())
        keys = dict(connection.execute(text("SELECT id, idempotency_key FROM predictions")).all())
        columns = {c["name"] for c in inspect(connection).get_columns("images")}
    assert stored == {1: kept}
    assert keys == {1: "twice", 2: None}
    assert "storage_path" not in columns
    with engine.begin() as connection, pytest.raises(Exception, match="(?i)unique"):
        connection.execute(insert_prediction, {"id": 3})

    (data_dir / "images" / sha[:2] / f"{sha}.bmp").unlink()
    command.downgrade(config, "0002")
    assert (data_dir / "images" / sha[:2] / f"{sha}.bmp").read_bytes() == kept
    with engine.connect() as connection:
        paths = dict(connection.execute(text("SELECT id, storage_path FROM images")).all())
    engine.dispose()
    assert paths == {1: f"{sha[:2]}/{sha}.bmp", 2: f"00/{'0' * 64}.bmp"}
