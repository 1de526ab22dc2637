"""How a model runs: its test-time views and its arithmetic, decided without importing TensorFlow.

A server that serves a LiteRT network (`app.ml.lite`: int8 weights, or float16 weights where int8 failed its
check) never loads TensorFlow; one that serves float32 or bfloat16 builds the Keras network
(`app.ml.inference`). The choice is made here, from the setting and the model card, before either is imported.
"""

import os
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

TTA = Literal["none", "flips4", "dihedral8"]
Precision = Literal["float32", "bfloat16", "int8", "float16"]
PrecisionSetting = Literal["auto", "float32", "bfloat16", "int8", "float16"]
# The precisions served from a LiteRT file named in the card's "serving" section (`app.ml.export`).
LITE_PRECISIONS: tuple[Precision, ...] = ("int8", "float16")

# Which of the eight dihedral views (index k < 4: turned k quarter turns; k >= 4: mirrored left-right,
# then turned k - 4 quarter turns) each setting averages. flips4 = original, mirrored, upside down, both.
VIEW_INDICES: dict[TTA, tuple[int, ...]] = {"none": (0,), "flips4": (0, 4, 6, 2), "dihedral8": tuple(range(8))}

# The environment variables the server's settings document (PAPCAD_INFERENCE_*), read here so that
# every process that loads a model (server, worker, registry reloads, CLI) follows them.
PRECISION_ENV = "PAPCAD_INFERENCE_PRECISION"
MAX_IMAGES_ENV = "PAPCAD_INFERENCE_MAX_IMAGES_PER_PASS"
DEFAULT_MAX_IMAGES_PER_PASS = 8

# CPU flags that mean hardware bfloat16 arithmetic (AVX-512 BF16, or Intel AMX tiles).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Whether "auto" picks bfloat16 on such a CPU (when the model has no int8 network that passed its check): only
# if it meets its bar (>= 1.8x throughput at <= 0.5 points of 7-class accuracy lost on the grouped test split,
# bench/bench_serving.py). It does not: on v3 it changes no test call but is only 1.35x faster through the serving
# path (v2: 0.54 points lost); the int8 network (3.2x, no call changed) is what auto serves.
AUTO_BF16 = False


def numpy_view(batch: np.ndarray, index: int) -> np.ndarray:
    """Dihedral view `index` (0-7, see VIEW_INDICES) of a (n, h, w, c) batch; the same as `inference.view`."""
    source = batch[:, :, ::-1] if index >= 4 else batch
    return np.rot90(source, index % 4, axes=(1, 2))


class ViewAverage:
    """What a predictor answers, from its `per_view`: the mean over the test-time views (Keras or LiteRT)."""

    def per_view(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float32 probabilities (views, n, classes) and features (views, n, d)."""
        raise NotImplementedError

    def with_features(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1, float32 (n, d) features."""
        per_view_probs, per_view_features = self.per_view(pixels)
        probs = per_view_probs.mean(axis=0, dtype=np.float64)
        return probs / probs.sum(axis=1, keepdims=True), per_view_features.mean(axis=0).astype(np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (n, size, size, 3) -> float64 (n, classes) probabilities summing to 1."""
        return self.with_features(pixels)[0]


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises hardware bfloat16 arithmetic (False where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(BF16_CPU_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def check_setting(setting: str | None = None) -> str:
    """The setting (default: $PAPCAD_INFERENCE_PRECISION, else "auto"), lower-cased; ValueError if unknown."""
    setting = (setting or os.environ.get(PRECISION_ENV) or "auto").lower()
    if setting not in get_args(PrecisionSetting):
        raise ValueError(f"inference precision must be one of {get_args(PrecisionSetting)}, not {setting!r}")
    return setting


def resolve_precision(setting: str | None = None, card: dict[str, Any] | None = None) -> Precision:
    """The arithmetic to run a model in.

    "auto": the LiteRT network the card's "serving" section chose (`export`: int8 when its check passed, else
    float16 weights when theirs did), else bfloat16 on CPUs with bfloat16 instructions (when AUTO_BF16), else
    float32. "int8" or "float16" asked for a model without that file runs float32 (a registry may hold older
    versions); /readyz says which runs.
    """
    setting = check_setting(setting)
    serving = (card or {}).get("serving") or {}
    if setting == "auto":
        chosen = serving.get("auto")
        if chosen in LITE_PRECISIONS and serving.get(chosen):
            return chosen  # type: ignore[no-any-return]
        return "bfloat16" if AUTO_BF16 and cpu_has_bf16() else "float32"
    if setting in LITE_PRECISIONS and not serving.get(setting):
        return "float32"
    return setting  # type: ignore[return-value]


def max_images_per_pass(value: int | None = None) -> int:
    """Network inputs per forward call (argument, else $PAPCAD_INFERENCE_MAX_IMAGES_PER_PASS, else 8)."""
    value = value if value is not None else int(os.environ.get(MAX_IMAGES_ENV, DEFAULT_MAX_IMAGES_PER_PASS))
    if value < 1:
        raise ValueError("at least one image per forward pass")
    return value


def release_free_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise): loading a model leaves
    tens of MiB of temporaries behind. A no-op where glibc's malloc_trim is not available."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
