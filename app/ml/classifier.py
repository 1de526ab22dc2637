"""`Classifier`: the one interface the rest of PapCAD uses to get a model's call on cells."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from app.errors import ModelIntegrityError
from app.ml.artifact import (
    read_card,
    verified_file,
    verified_ood_path,
    verified_serving_path,
    verified_weights_path,
)
from app.ml.calibration import apply_temperature
from app.ml.classes import ABNORMAL_CLASSES, CLASS_NAMES
from app.ml.input_checks import as_sent, input_flags
from app.ml.ood import FeatureDistance
from app.ml.preprocessing import InputSpec, decode_image, prepare_image
from app.ml.routing import DomainGate
from app.ml.runtime import LITE_PRECISIONS, Precision, release_free_memory, resolve_precision

if TYPE_CHECKING:
    import keras

    from app.ml.inference import Predictor
    from app.ml.lite import LitePredictor


@dataclass(frozen=True)
class Prediction:
    """The model's call on one image, and how far that image is from what the model knows.

    in_distribution / ood_score: None when the model directory has no OOD model; a score > 1 is
    beyond the cut-off (not a typical cell). input_flags: what `input_checks` found odd in the file.
    """

    probabilities: dict[str, float]
    predicted_class: str
    abnormal_probability: float
    model_version: str
    in_distribution: bool | None = None
    ood_score: float | None = None
    input_flags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Routing:
    """An adapted model's general model and the gate that sends it the cells unlike the site's (`app.ml.routing`)."""

    general: "Classifier"
    gate: DomainGate


class Classifier:
    """A loaded, verified model: images in, per-class probabilities out."""

    def __init__(
        self,
        model_dir: Path,
        card: dict[str, Any],
        predictor: "Predictor | LitePredictor",
        ood: FeatureDistance | None = None,
        routing: Routing | None = None,
    ):
        self.model_dir = Path(model_dir)
        self.card = card
        self.predictor = predictor
        # Without an OOD model (older model directories) predictions carry in_distribution=None.
        self.ood = ood
        self.version: str = card["version"]
        self.weights_sha256: str = card["weights_sha256"]
        self.class_names: tuple[str, ...] = tuple(card["class_names"])
        self.spec = InputSpec.from_dict(card["input"])
        abnormal = set(card.get("abnormal_classes", ABNORMAL_CLASSES))
        self.abnormal_mask = np.array([name in abnormal for name in self.class_names])
        calibration = card.get("calibration") or {}
        self.temperature: float = float(calibration.get("temperature", 1.0))
        self.routing = routing
        # The validation-chosen P(abnormal) cut-off; a lab may configure its own in the server.
        self.abnormal_threshold: float = float((card.get("abnormal_threshold") or {}).get("value", 0.5))

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        batch_size: int = 32,
        with_ood: bool = True,
        precision: str | None = None,
        max_images_per_pass: int | None = None,
    ) -> "Classifier":
        """Read the card, check the weights' SHA-256, build the network and load the weights.

        with_ood=False skips the card's OOD model (for refitting it). precision: "auto", "float32", "bfloat16",
        "int8" or "float16" (default: $PAPCAD_INFERENCE_PRECISION, else auto; see `runtime.resolve_precision`:
        int8 and float16 run on LiteRT, without TensorFlow; the others build the Keras network);
        max_images_per_pass bounds the network inputs (cells x TTA views) of one forward call (default:
        $PAPCAD_INFERENCE_MAX_IMAGES_PER_PASS).

        Raises ModelIntegrityError for anything wrong with the directory, never a bare KeyError.
        """
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        chosen = resolve_precision(precision, card)  # a bad setting is the operator's error, not the model's
        weights_path = verified_weights_path(model_dir, card)
        try:
            if tuple(card["class_names"]) != CLASS_NAMES:
                raise ValueError(f"unexpected classes {card['class_names']}")
            spec = InputSpec.from_dict(card["input"])
            tta = card.get("tta", "none")
            if chosen in LITE_PRECISIONS:
                predictor: Predictor | LitePredictor = _lite_predictor(
                    model_dir, card, chosen, tta, batch_size, max_images_per_pass
                )
            else:
                predictor = _keras_predictor(card, weights_path, chosen, tta, batch_size, max_images_per_pass)
            ood_path = verified_ood_path(model_dir, card) if with_ood else None
            ood = FeatureDistance.load(ood_path) if ood_path else None
            if ood is not None and ood.dims != predictor.feature_dims:
                raise ValueError(
                    f"the OOD model's stages {ood.dims} do not match the network's {predictor.feature_dims} "
                    "(refit it with papcad fit-ood)"
                )
            routing = None
            if card.get("routing"):
                routing = _routing(model_dir, card["routing"], batch_size, with_ood, precision, max_images_per_pass)
                if routing.gate.coef.shape != (sum(predictor.feature_dims),):
                    raise ValueError("the routing gate was not fitted on this network's features")
                if routing.general.spec != spec:  # routed cells are prepared once, for both networks
                    raise ValueError("the general model takes another input than the site network")
            release_free_memory()
            return cls(model_dir, card, predictor, ood, routing)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ModelIntegrityError(f"model directory {model_dir} is not usable: {exc!r}") from exc

    @property
    def network(self) -> Any:
        """The Keras network, for tools that train, convert or re-run it (loaded with precision float32)."""
        from app.ml.inference import Predictor

        if not isinstance(self.predictor, Predictor):
            raise TypeError(f"model {self.version} runs on LiteRT ({self.predictor.precision}); load it as float32")
        return self.predictor.model

    @property
    def parts(self) -> list["Classifier"]:
        """The models whose calls this one serves: itself, and a routed model's general model."""
        return [self] if self.routing is None else [self, self.routing.general]

    def heatmap(self, pixels: np.ndarray, class_index: int) -> np.ndarray:
        """Class-activation map of one prepared image for a class, by the network that made its call."""
        if self.routing is not None and self.to_general(self.predictor.with_features(pixels[None])[1])[0]:
            return self.routing.general.heatmap(pixels, class_index)  # one more forward pass, routed models only
        return self.predictor.heatmap(pixels, class_index)

    def to_general(self, features: np.ndarray) -> np.ndarray:
        """Which cells (by this network's features) a routed model's general model answers: none without one."""
        if self.routing is None:
            return np.zeros(len(features), dtype=bool)
        return self.routing.gate.general(features)

    def cutoffs(self, features: np.ndarray) -> np.ndarray:
        """Each cell's P(abnormal) cut-off: that of the model that answers it."""
        general = self.routing.general.abnormal_threshold if self.routing is not None else 0.0
        return np.where(self.to_general(features), general, self.abnormal_threshold)

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Prepared uint8 pixels (n, size, size, 3) -> (n, classes) calibrated probabilities, as served (a routed
        model's general cells by its general model)."""
        return self.routed(pixels, *self.predict_pixels_with_features(pixels))

    def routed(self, pixels: np.ndarray, probs: np.ndarray, features: np.ndarray) -> np.ndarray:
        """This network's probabilities and features of the pixels -> the probabilities as served: a routed
        model's general cells get its general model's."""
        general = self.to_general(features)
        if self.routing is not None and general.any():
            probs = probs.copy()
            probs[general] = self.routing.general.predict_pixels(pixels[general])
        return probs

    def predict_pixels_with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prepared pixels -> calibrated probabilities and the pooled features of this network (a routed model's
        site network), from one forward pass."""
        raw, features = self.predictor.with_features(pixels)
        return (raw if self.temperature == 1.0 else apply_temperature(raw, self.temperature)), features

    def predict(self, images: Sequence[bytes | Image.Image]) -> list[Prediction]:
        """Cell images (file bytes or PIL) -> one Prediction each, in order.

        Raises InvalidImageError for the first image that cannot be decoded.
        """
        if not images:
            return []
        pixels, flags = self._prepare(images)
        return self._predict_prepared(pixels, flags)

    def _predict_prepared(self, pixels: np.ndarray, flags: list[list[str]]) -> list[Prediction]:
        probs, features = self.predict_pixels_with_features(pixels)
        scores = self.ood.scores(features) if self.ood is not None else [None] * len(probs)
        predictions = [self._to_prediction(*row) for row in zip(probs, scores, flags, strict=True)]
        general = [int(i) for i in np.flatnonzero(self.to_general(features))]
        if self.routing is not None and general:  # the general model's calls, with its version (same input spec)
            calls = self.routing.general._predict_prepared(pixels[general], [flags[i] for i in general])
            for i, call in zip(general, calls, strict=True):
                predictions[i] = call
        return predictions

    def weights_sha256_of(self, version: str) -> str:
        """The weights of the part (`parts`) that made a prediction of this version."""
        for part in self.parts:
            if part.version == version:
                return part.weights_sha256
        raise KeyError(version)

    def _prepare(self, images: Sequence[bytes | Image.Image]) -> tuple[np.ndarray, list[list[str]]]:
        """Network input and input flags of images (decoded once)."""
        decoded = [decode_image(image) for image in images]
        flags = [input_flags(as_sent(image), rgb) for image, rgb in zip(images, decoded, strict=True)]
        return np.stack([prepare_image(rgb, self.spec) for rgb in decoded]), flags

    def analyse(self, images: Sequence[bytes | Image.Image]) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """Calibrated probabilities, pooled features and input flags of images, in one forward pass (this network's:
        a routed model's site network)."""
        pixels, flags = self._prepare(images)
        probs, features = self.predict_pixels_with_features(pixels)
        return probs, features, flags

    def _to_prediction(self, row: np.ndarray, score: float | None, flags: list[str]) -> Prediction:
        return Prediction(
            probabilities={name: float(p) for name, p in zip(self.class_names, row, strict=False)},
            predicted_class=self.class_names[int(np.argmax(row))],
            abnormal_probability=float(row[self.abnormal_mask].sum()),
            model_version=self.version,
            in_distribution=None if score is None else bool(score <= 1.0),
            ood_score=None if score is None else float(score),
            input_flags=flags,
        )


def _routing(
    model_dir: Path,
    section: dict[str, Any],
    batch_size: int,
    with_ood: bool,
    precision: str | None,
    max_images: int | None,
) -> Routing:
    """The general model (its own files checked by its own card, its weights against this card) and the gate."""
    name = section["general"]
    if Path(name).name != name:
        raise ValueError(f"the routing section names a general model {name!r} outside the model directory")
    general = Classifier.load(model_dir / name, batch_size, with_ood, precision, max_images)
    if general.weights_sha256 != section["general_weights_sha256"]:
        raise ModelIntegrityError(f"{model_dir / name} does not hold the general model this adapted model names")
    gate_path = verified_file(model_dir, section["gate"]["file"], section["gate"]["sha256"], "routing gate")
    return Routing(general, DomainGate.load(gate_path))


def _lite_predictor(
    model_dir: Path, card: dict[str, Any], precision: Precision, tta: Any, batch_size: int, max_images: int | None
) -> "LitePredictor":
    """The card's LiteRT network of that precision (no TensorFlow in the process)."""
    from app.ml.lite import LitePredictor

    path = verified_serving_path(model_dir, card, precision)
    section = card["serving"][precision]
    if path is None or section["weights_sha256"] != card["weights_sha256"]:
        raise ValueError(f"the {precision} serving file was not made from these weights (run papcad export)")
    dims = tuple(section["feature_dims"])
    return LitePredictor(path, tta, dims, batch_size=batch_size, max_images=max_images, precision=precision)


def keras_network(card: dict[str, Any], weights_path: Path, precision: Precision = "float32") -> "keras.Model":
    """The card's network with these weights, in float32 or bfloat16 for serving (imports TensorFlow)."""
    from app.ml.inference import build_in_precision
    from app.ml.model import build_model, load_weights

    model = build_in_precision(
        lambda: build_model(
            int(card["input"]["size"]),
            num_classes=len(CLASS_NAMES),
            dropout=card["recipe"]["dropout"],
            normalization=card["input"].get("normalization", "caffe"),
        ),
        precision,
    )
    load_weights(model, weights_path)
    return model


def _keras_predictor(
    card: dict[str, Any],
    weights_path: Path,
    precision: Precision,
    tta: Any,
    batch_size: int,
    max_images: int | None,
) -> "Predictor":
    """The Keras network as a predictor."""
    from app.ml.inference import Predictor

    model = keras_network(card, weights_path, precision)
    return Predictor(model, tta, batch_size, max_images=max_images, precision=precision)
