"""A versioned model directory: weights, model card (JSON), metrics and plots.

    model_store/<version>/
        weights.npz        every variable as float16, keyed by variable path
        model_card.json    classes, grouping, input spec, provenance, recipe, data, metrics, hash
        metrics.json       the evaluation command's full output
        *.png              curves, confusion matrices, ROC

The card's `weights_sha256` is checked before any weight is loaded.
"""

import hashlib
import json
from pathlib import Path

from app.errors import ModelIntegrityError

WEIGHTS_FILE = "weights.npz"
CARD_FILE = "model_card.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_card(model_dir: Path) -> dict:
    card_path = Path(model_dir) / CARD_FILE
    if not card_path.is_file():
        raise ModelIntegrityError(f"no {CARD_FILE} in model directory {model_dir}")
    try:
        return json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelIntegrityError(f"{card_path} is not valid JSON: {exc}") from exc


def write_card(model_dir: Path, card: dict) -> None:
    (Path(model_dir) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def verified_weights_path(model_dir: Path, card: dict) -> Path:
    """The weights file, after checking it against the card's SHA-256."""
    path = Path(model_dir) / card.get("weights_file", WEIGHTS_FILE)
    if not path.is_file():
        raise ModelIntegrityError(f"weights file missing: {path}")
    expected = card.get("weights_sha256")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"weights file {path} has SHA-256 {actual} but the model card says {expected}; "
            "refusing to load a model that does not match its card"
        )
    return path
