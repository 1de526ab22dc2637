"""A versioned model directory: weights, model card (JSON), metrics and plots.

    model_store/<version>/
        weights.npz        every variable as float16, keyed by variable path
        model_card.json    classes, grouping, input spec, provenance, recipe, data, metrics, hash
        metrics.json       the evaluation command's full output
        ood.npz            optional: the out-of-distribution model (card section "ood", with its SHA-256)
        serving_int8.tflite optional: the network with int8 weights for LiteRT (card section "serving")
        serving_float16.tflite optional: the same with float16 weights, where int8 failed its check
        robustness.json    optional: metrics under image shifts (card section "robustness")
        gate.npz, general/ an adapted model's routing (card section "routing", `app.ml.routing`)
        *.png              curves, confusion matrices, ROC

The card's `weights_sha256` (and the OOD and serving files' SHA-256) is checked before anything is loaded.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from app.errors import ModelIntegrityError

WEIGHTS_FILE = "weights.npz"
CARD_FILE = "model_card.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_card(model_dir: Path) -> dict[str, Any]:
    card_path = Path(model_dir) / CARD_FILE
    if not card_path.is_file():
        raise ModelIntegrityError(f"no {CARD_FILE} in model directory {model_dir}")
    try:
        card: dict[str, Any] = json.loads(card_path.read_text())
        return card
    except json.JSONDecodeError as exc:
        raise ModelIntegrityError(f"{card_path} is not valid JSON: {exc}") from exc


def write_card(model_dir: Path, card: dict[str, Any]) -> None:
    """Replace the card in one step: a process killed while writing leaves the old card, never half of one."""
    path = Path(model_dir) / CARD_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(card, indent=2) + "\n")
    partial.replace(path)


def verified_file(model_dir: Path, name: str, expected: str | None, what: str) -> Path:
    """A file of the model directory, after checking it against the SHA-256 its card names."""
    path = Path(model_dir) / name
    if Path(name).name != name:
        raise ModelIntegrityError(f"the model card names {what} {name!r} outside the model directory")
    if not path.is_file():
        raise ModelIntegrityError(f"{what} missing: {path}")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelIntegrityError(
            f"{what} {path} has SHA-256 {actual} but the model card says {expected}; "
            "refusing to load a model that does not match its card"
        )
    return path


def verified_weights_path(model_dir: Path, card: dict[str, Any]) -> Path:
    """The weights file, after checking it against the card's SHA-256."""
    return verified_file(model_dir, card.get("weights_file", WEIGHTS_FILE), card.get("weights_sha256"), "weights file")


def verified_ood_path(model_dir: Path, card: dict[str, Any]) -> Path | None:
    """The out-of-distribution model named in the card's "ood" section, checked; None when the card has none."""
    section = card.get("ood")
    if not section:
        return None
    return verified_file(model_dir, section.get("file", ""), section.get("sha256"), "out-of-distribution file")


def verified_serving_path(model_dir: Path, card: dict[str, Any], precision: str) -> Path | None:
    """The LiteRT network of that precision named in the card's "serving" section, checked; None when absent."""
    section = (card.get("serving") or {}).get(precision)
    if not section:
        return None
    return verified_file(model_dir, section.get("file", ""), section.get("sha256"), f"{precision} serving file")
