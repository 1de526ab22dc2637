"""Class-activation heatmaps for stored predictions: computed on demand, cached on disk by image and model.

A heatmap explains a call only when drawn by the model that made it: the prediction's weights pick the model
(the active one, the candidate, or a retired version the registry loads for it; see `LiveModels.model_for`).
"""

from pathlib import Path
from typing import Protocol

from app.db.models import Prediction
from app.errors import ConflictError, InputError
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.explain import heatmap_png


class ModelSource(Protocol):
    """Where the model that made a prediction is found (`LiveModels` in a server)."""

    def model_for(self, weights_sha256: str) -> Classifier: ...


class Heatmaps:
    """On demand, so the plain prediction path never pays for explanations."""

    def __init__(self, models: Classifier | ModelSource, cache_dir: Path):
        self.models = models
        self.cache_dir = Path(cache_dir)

    def _model(self, prediction: Prediction) -> Classifier:
        if isinstance(self.models, Classifier):
            if prediction.weights_sha256 != self.models.weights_sha256:
                raise ConflictError(
                    f"prediction {prediction.id} was made by model {prediction.model_version}; this server runs "
                    f"{self.models.version}, whose heatmap would not explain that call"
                )
            return self.models
        return self.models.model_for(prediction.weights_sha256)

    def png(self, prediction: Prediction, image_bytes: bytes, class_name: str | None = None) -> bytes:
        """PNG of the map for class_name (default: the model's call), in the image's aspect (at most 1024 px a side),
        drawn by the model that made the prediction."""
        class_name = class_name or prediction.predicted_class
        if class_name not in CLASS_NAMES:  # every loadable model has these classes (`Classifier.load`)
            raise InputError(f"class must be one of: {', '.join(CLASS_NAMES)}")
        model = self._model(prediction)
        index = model.class_names.index(class_name)
        path = self.cache_dir / f"{prediction.image.sha256}-{model.weights_sha256[:16]}-{index}.png"
        if path.is_file():
            return path.read_bytes()
        data = heatmap_png(model.heatmap, image_bytes, model.spec, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data
