"""Shared pytest fixtures.

Sections: ML core, then marks. Server fixtures live in tests/server/conftest.py.
"""

# =============================================================================
# ML core (app/ml): the shared Herlev images and a tiny model directory.
#
#   herlev_dir            the real Herlev folder (fails, never skips, when it is missing)
#   herlev_one_per_class  {class name: path of one real image}, in CLASS_NAMES order
#   tiny_model_dir        a 32 px, randomly initialised model directory that Classifier.load
#                         accepts (session-scoped: copy it before changing anything in it)
# =============================================================================

import io
import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared data sits beside the repository: <repo>/../shared/datasets/herlev.
HERLEV_DIR = Path(os.environ.get("PAPCAD_HERLEV_DIR") or REPO_ROOT.parent / "shared" / "datasets" / "herlev")
TINY_MODEL_SIZE = 32


def write_tiny_model_dir(out_dir: Path, size: int = TINY_MODEL_SIZE, tta: str = "dihedral8", seed: int = 7) -> Path:
    """Write a model directory with random weights, laid out as `app.ml.train.train` writes one."""
    import keras

    from app.ml.artifact import CARD_FILE, WEIGHTS_FILE, sha256_file
    from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES, NORMAL_CLASSES
    from app.ml.model import build_model, save_weights
    from app.ml.preprocessing import InputSpec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    dropout = 0.5
    save_weights(build_model(size, num_classes=len(CLASS_NAMES), dropout=dropout), out_dir / WEIGHTS_FILE)
    card = {
        "version": f"tiny-test-r{size}",
        "class_names": list(CLASS_NAMES),
        "normal_classes": [c for c in CLASS_NAMES if c in NORMAL_CLASSES],
        "abnormal_classes": [c for c in CLASS_NAMES if c in ABNORMAL_CLASSES],
        "input": InputSpec(size=size, fit="resize").to_dict(),
        "tta": tta,
        "recipe": {"name": "tiny-test", "dropout": dropout, "seed": seed},
        "weights_file": WEIGHTS_FILE,
        "weights_dtype": "float16",
        "weights_sha256": sha256_file(out_dir / WEIGHTS_FILE),
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return out_dir


@contextmanager
def _postgres_database(prefix: str = "papcad_test", template: str | None = None) -> Iterator[str]:
    """Create a PostgreSQL database on the test server (empty, or a copy of `template`), yield its URL,
    drop it afterwards."""
    base = os.environ.get("PAPCAD_TEST_POSTGRES_URL")
    if not base:
        pytest.fail("PAPCAD_TEST_POSTGRES_URL is not set: run the tests with `make test`, which starts PostgreSQL")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Callable[..., AbstractContextManager[str]]:
    """`with postgres_database(prefix, template=None) as url:` a throwaway database on the test server."""
    return _postgres_database


@pytest.fixture(scope="session")
def non_cell_images() -> dict[str, bytes]:
    """The inputs the "not a typical cell" guard must refuse or flag (PNG bytes): noise, a flat square,
    a 1x1 image, a 16-bit gradient."""

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(5)
    gradient = np.linspace(0, 65535, 160 * 120).reshape(120, 160).astype(np.uint16)
    return {
        "random noise": png(Image.fromarray(rng.integers(0, 256, (150, 150, 3), dtype=np.uint8))),
        "flat grey square": png(Image.new("RGB", (128, 128), (128, 128, 128))),
        "1x1 image": png(Image.new("RGB", (1, 1), (200, 120, 160))),
        "16-bit gradient": png(Image.fromarray(gradient)),
    }


@pytest.fixture(scope="session")
def herlev_dir() -> Path:
    if not (HERLEV_DIR / "manifest.csv").is_file():
        pytest.fail(f"Herlev dataset not found at {HERLEV_DIR} (set PAPCAD_HERLEV_DIR to its folder)")
    return HERLEV_DIR


@pytest.fixture(scope="session")
def herlev_one_per_class(herlev_dir: Path) -> dict[str, Path]:
    from app.ml.classes import CLASS_NAMES

    return {name: sorted((herlev_dir / name).glob("*.BMP"))[0] for name in CLASS_NAMES}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


# ============================ end of ML core section ==========================


# =============================================================================
# Marks (registered in pyproject.toml). `postgres` is set here rather than by hand, so that every
# test that reaches PostgreSQL carries it (`make test-fast` deselects it and runs on SQLite alone).
# =============================================================================


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `postgres` each test that takes a PostgreSQL database: the `postgres_url` fixture, or a
    parameter (of the test or of one of its fixtures) whose value is "postgresql" (or "postgres")."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec else ()
        if "postgres_url" in getattr(item, "fixturenames", ()) or any(
            isinstance(value, str) and value in ("postgresql", "postgres") for value in params
        ):
            item.add_marker(pytest.mark.postgres)
