"""`Classifier`: the one interface the rest of PapCAD uses to get a model's call on cells."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.errors import ModelIntegrityError
from app.ml.artifact import read_card, verified_weights_path
from app.ml.calibration import apply_temperature
from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES
from app.ml.inference import Predictor
from app.ml.model import build_model, load_weights
from app.ml.preprocessing import InputSpec, prepare_batch


@dataclass(frozen=True)
class Prediction:
    probabilities: dict[str, float]
    predicted_class: str
    abnormal_probability: float
    model_version: str


class Classifier:
    """A loaded, verified model: images in, per-class probabilities out."""

    def __init__(self, model_dir: Path, card: dict, predictor: Predictor):
        self.model_dir = Path(model_dir)
        self.card = card
        self.predictor = predictor
        self.version: str = card["version"]
        self.weights_sha256: str = card["weights_sha256"]
        self.class_names: tuple[str, ...] = tuple(card["class_names"])
        self.spec = InputSpec.from_dict(card["input"])
        abnormal = set(card.get("abnormal_classes", ABNORMAL_CLASSES))
        self._abnormal_mask = np.array([name in abnormal for name in self.class_names])
        calibration = card.get("calibration") or {}
        self.temperature: float = float(calibration.get("temperature", 1.0))
        # The validation-chosen P(abnormal) cut-off; a lab may configure its own in the server.
        self.abnormal_threshold: float = float((card.get("abnormal_threshold") or {}).get("value", 0.5))

    @classmethod
    def load(cls, model_dir: Path | str, batch_size: int = 32) -> "Classifier":
        """Read the card, check the weights' SHA-256, build the network and load the weights.

        Raises ModelIntegrityError for anything wrong with the directory, never a bare KeyError.
        """
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        weights_path = verified_weights_path(model_dir, card)
        try:
            if tuple(card["class_names"]) != CLASS_NAMES:
                raise ValueError(f"unexpected classes {card['class_names']}")
            spec = InputSpec.from_dict(card["input"])
            model = build_model(
                spec.size,
                num_classes=len(CLASS_NAMES),
                dropout=card["recipe"]["dropout"],
                normalization=card["input"].get("normalization", "caffe"),
            )
            load_weights(model, weights_path)
            predictor = Predictor(model, tta=card.get("tta", "none"), batch_size=batch_size)
            return cls(model_dir, card, predictor)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelIntegrityError(f"model directory {model_dir} is not usable: {exc!r}") from exc

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Prepared uint8 pixels (n, size, size, 3) -> (n, classes) calibrated probabilities."""
        raw = self.predictor(pixels)
        return raw if self.temperature == 1.0 else apply_temperature(raw, self.temperature)

    def predict(self, images: Sequence[bytes | Image.Image]) -> list[Prediction]:
        """Cell images (file bytes or PIL) -> one Prediction each, in order.

        Raises InvalidImageError for the first image that cannot be decoded.
        """
        if not images:
            return []
        probs = self.predict_pixels(prepare_batch(list(images), self.spec))
        return [self._to_prediction(row) for row in probs]

    def _to_prediction(self, row: np.ndarray) -> Prediction:
        return Prediction(
            probabilities={name: float(p) for name, p in zip(self.class_names, row, strict=False)},
            predicted_class=self.class_names[int(np.argmax(row))],
            abnormal_probability=float(row[self._abnormal_mask].sum()),
            model_version=self.version,
        )
