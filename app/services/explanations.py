"""Grad-CAM heatmaps for stored predictions: computed on demand, cached on disk by image and model."""

import threading
from pathlib import Path

from app.db.models import Prediction
from app.errors import ConflictError, InputError
from app.ml.classifier import Classifier
from app.ml.explain import GradCam, heatmap_png


class Heatmaps:
    """On demand, so the plain prediction path never pays for explanations."""

    def __init__(self, classifier: Classifier, cache_dir: Path):
        self.classifier = classifier
        self.cache_dir = Path(cache_dir)
        self._cam: GradCam | None = None
        self._lock = threading.Lock()

    def _gradcam(self) -> GradCam:
        with self._lock:
            if self._cam is None:
                self._cam = GradCam(self.classifier.predictor.model)
            return self._cam

    def png(self, prediction: Prediction, image_bytes: bytes, class_name: str | None = None) -> bytes:
        """PNG of the map for class_name (default: the model's call), in the image's aspect (at most 1024 px a side)."""
        if prediction.weights_sha256 != self.classifier.weights_sha256:
            raise ConflictError(
                f"prediction {prediction.id} was made by model {prediction.model_version}; this server runs "
                f"{self.classifier.version}, whose heatmap would not explain that call"
            )
        class_name = class_name or prediction.predicted_class
        if class_name not in self.classifier.class_names:
            raise InputError(f"class must be one of: {', '.join(self.classifier.class_names)}")
        index = self.classifier.class_names.index(class_name)
        path = self.cache_dir / f"{prediction.image.sha256}-{self.classifier.weights_sha256[:16]}-{index}.png"
        if path.is_file():
            return path.read_bytes()
        data = heatmap_png(self._gradcam(), image_bytes, self.classifier.spec, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data
