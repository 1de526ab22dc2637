"""Shared pytest fixtures.

Sections: ML core (below). Server fixtures go in their own section.
"""

# =============================================================================
# ML core (app/ml): the shared Herlev images and a tiny model directory.
#
#   herlev_dir            the real Herlev folder (fails, never skips, when it is missing)
#   herlev_one_per_class  {class name: path of one real image}, in CLASS_NAMES order
#   tiny_model_dir        a 32 px, randomly initialised model directory that Classifier.load
#                         accepts (session-scoped: copy it before changing anything in it)
# =============================================================================

import json
import os
from pathlib import Path

import pytest

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
