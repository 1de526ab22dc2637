"""The network on LiteRT: the serving path without TensorFlow.

`papcad export` converts a model's Keras network to a LiteRT (TensorFlow Lite) file with int8 weights
(dynamic-range quantisation: activations stay float) and checks it against the Keras network on the test
split; where that check fails, it also writes one with float16 weights (computed in float32 on CPUs without
float16 arithmetic) and checks that. The card's "serving" section names the files, their SHA-256 and checks.
This predictor runs either with the same test-time views and the same per-pass bound as
`inference.Predictor`, and answers the same questions: probabilities, the stage features of the typical-cell
guard, and the class-activation map.

The file's one signature takes uint8 pixels (n, size, size, 3) and returns "probs" (n, classes),
"features" (n, sum of the stage widths) and "class_maps" (n, h, w, classes): the last block's maps times the
head's weights, from which the class-activation map is read without a gradient (for a pooled linear head,
Grad-CAM of a class score is exactly that map).
"""

import os
import threading
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from app.ml.runtime import TTA, VIEW_INDICES, Precision, ViewAverage, max_images_per_pass, numpy_view


def cpu_threads() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class LitePredictor(ViewAverage):
    """`inference.Predictor`'s interface over a LiteRT file. One interpreter, used by one thread at a time.

    precision names the file's weights ("int8" or "float16"), as /readyz reports it.
    """

    def __init__(
        self,
        path: Path,
        tta: TTA = "none",
        feature_dims: tuple[int, ...] = (),
        batch_size: int = 32,
        max_images: int | None = None,
        precision: Precision = "int8",
    ):
        if tta not in VIEW_INDICES:
            raise ValueError(f"unknown test-time augmentation {tta!r}")
        self.tta = tta
        self.precision = precision
        self.n_views = len(VIEW_INDICES[tta])
        self.batch_size = batch_size
        self.cells_per_pass = max(1, max_images_per_pass(max_images) // self.n_views)
        self.feature_dims = tuple(feature_dims)
        self._interpreter = Interpreter(model_path=str(path), num_threads=cpu_threads())
        self._runner = self._interpreter.get_signature_runner()
        self._lock = threading.Lock()

    def _run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            return dict(self._runner(pixels=np.ascontiguousarray(pixels, dtype=np.uint8)))

    def per_view(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float32 probabilities (views, n, classes) and features (views, n, d)."""
        prob_chunks, feature_chunks = [], []
        step = min(self.batch_size, self.cells_per_pass)
        for i in range(0, len(pixels), step):
            chunk = pixels[i : i + step]
            out = self._run(np.concatenate([numpy_view(chunk, k) for k in VIEW_INDICES[self.tta]]))
            n = len(chunk)
            prob_chunks.append(out["probs"].reshape(self.n_views, n, -1))
            feature_chunks.append(out["features"].reshape(self.n_views, n, -1))
        return np.concatenate(prob_chunks, axis=1), np.concatenate(feature_chunks, axis=1)

    def heatmap(self, pixels: np.ndarray, class_index: int) -> np.ndarray:
        """Class-activation map of one prepared uint8 image (size, size, 3): float map in [0, 1]."""
        maps = self._run(pixels[None])["class_maps"][0, :, :, class_index]
        heat = np.maximum(maps, 0.0)
        result: np.ndarray = (heat / (heat.max() + 1e-9)).astype(np.float32)
        return result
