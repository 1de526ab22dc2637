"""Train a model from a labelled folder and write a versioned, evaluated model directory.

split (by group) -> load pixels -> augment -> fit -> save float16 weights + card -> evaluate
"""

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from app.ml import augment, windows
from app.ml.artifact import WEIGHTS_FILE, sha256_file, write_card
from app.ml.classes import ABNORMAL_CLASSES, BETHESDA_HINT, CLASS_NAMES, NORMAL_CLASSES
from app.ml.data import Dataset, fixed_split, load_arrays
from app.ml.evaluation import plot_history
from app.ml.model import build_model, count_params, load_weights, save_weights
from app.ml.recipes import Recipe


def augmentation(kind: str) -> keras.Sequential:
    """Random views of a cell. Cells have no orientation, so the 'cell' kind flips and turns freely."""
    if kind == "published":
        layers = [
            keras.layers.RandomRotation(20 / 360, fill_mode="nearest"),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest"),
            keras.layers.RandomZoom(0.1, fill_mode="nearest"),
            keras.layers.RandomFlip("horizontal"),
        ]
    elif kind == "cell":
        layers = [
            keras.layers.RandomFlip("horizontal_and_vertical"),
            keras.layers.RandomRotation(0.5, fill_mode="reflect"),
            keras.layers.RandomZoom(0.1, fill_mode="reflect"),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="reflect"),
            keras.layers.RandomContrast(0.1, value_range=(0, 255)),
            keras.layers.RandomBrightness(0.1, value_range=(0, 255)),
        ]
    else:
        raise ValueError(f"unknown augmentation {kind!r}")
    return keras.Sequential(layers, name=f"{kind}_augmentation")


def augmenter(kind: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """The recipe's augmentation as one batch function (pixels RGB 0-255 in, float32 out)."""
    if kind in ("robust", "robust_windows"):
        return augment.robust
    layers = augmentation(kind)
    return lambda images: layers(tf.cast(images, tf.float32), training=True)


def training_pixels(dataset: Dataset, indices: np.ndarray, x: np.ndarray, stages: Sequence[Recipe]) -> np.ndarray:
    """What the recipe's stages train on: the prepared crops `x[indices]`, plus fixed-size windows of each cell
    when a stage uses the "robust_windows" augmentation (cut from the original images of `indices` only)."""
    windowed = [stage for stage in stages if stage.cuts_windows]
    if not windowed:
        crops: np.ndarray = x[indices]
        return crops
    return windows.window_views(dataset, indices, windowed[0].input, windowed[0].seed)


def training_dataset(x: np.ndarray, y: np.ndarray, recipe: Recipe) -> tf.data.Dataset:
    """x: (n, size, size, 3) crops, or (n, views, size, size, 3) from `training_pixels` (view 0: the crop)."""
    augment_batch = augmenter(recipe.augmentation)
    if x.ndim == 5 and not recipe.cuts_windows:
        x = x[:, 0]  # an earlier stage of a cross-validated recipe trains on the crops alone
    onehot = keras.utils.to_categorical(y, len(CLASS_NAMES))
    return (
        tf.data.Dataset.from_tensor_slices((x, onehot))
        .shuffle(len(x), seed=recipe.seed, reshuffle_each_iteration=True)
        .batch(recipe.batch_size)
        .map(
            lambda images, labels: (augment_batch(images), labels),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )


def optimizer(recipe: Recipe, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate = recipe.learning_rate
    if recipe.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if recipe.warmup_epochs else recipe.learning_rate,
            decay_steps=max(1, (recipe.epochs - recipe.warmup_epochs) * steps_per_epoch),
            warmup_target=recipe.learning_rate if recipe.warmup_epochs else None,
            warmup_steps=recipe.warmup_epochs * steps_per_epoch,
        )
    if recipe.optimizer == "adamw":
        return keras.optimizers.AdamW(rate, weight_decay=recipe.weight_decay)
    return keras.optimizers.Adam(rate)


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under a dtype policy without leaking it to later code (e.g. serving)."""
    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def network(recipe: Recipe) -> keras.Model:
    """The recipe's network, with the weights of its starting model (`init_from`) when it has one."""
    with dtype_policy("mixed_bfloat16" if recipe.mixed_precision else "float32"):
        model = build_model(
            recipe.input.size,
            num_classes=len(CLASS_NAMES),
            weights=recipe.backbone,
            freeze_backbone=recipe.freeze_backbone,
            dropout=recipe.dropout,
            normalization=recipe.normalization,
        )
    if recipe.init_from is not None:
        load_weights(model, Path(recipe.init_from) / WEIGHTS_FILE)
    return model


class EpochSeconds(keras.callbacks.Callback):  # type: ignore[misc]
    """Appends each finished epoch's seconds to a file: a run resumed after a kill still knows its total time."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        with self.path.open("a") as handle:
            handle.write(f"{time.perf_counter() - self._started:.1f}\n")


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    recipe: Recipe,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    verbose: int = 2,
    backup_dir: Path | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build the network for the recipe and train it; returns (model, per-epoch history).

    With `backup_dir`, weights and optimizer state are saved there after every epoch and a rerun continues from
    the last saved epoch (the folder is removed when training ends): a long run survives a killed process. The
    seconds of every finished epoch, over all runs, are kept beside it in `<backup_dir>.seconds`.
    """
    keras.utils.set_random_seed(recipe.seed)
    model = network(recipe)
    steps = int(np.ceil(len(x_train) / recipe.batch_size))
    model.compile(
        optimizer=optimizer(recipe, steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        metrics=["accuracy"],
    )
    val_data = None
    if validation is not None:
        x_val, y_val = validation
        val_data = (x_val.astype(np.float32), keras.utils.to_categorical(y_val, len(CLASS_NAMES)))
    history = model.fit(
        training_dataset(x_train, y_train, recipe),
        validation_data=val_data,
        epochs=recipe.epochs,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=verbose,
        callbacks=None
        if backup_dir is None
        else [EpochSeconds(Path(f"{backup_dir}.seconds")), keras.callbacks.BackupAndRestore(str(backup_dir))],
    )
    return model, {k: [float(v) for v in vals] for k, vals in history.history.items()}


def train(dataset: Dataset, recipe: Recipe, out_dir: Path, version: str) -> dict[str, Any]:
    """Train on the fixed grouped split and write the model directory; returns the model card."""
    from app.ml.evaluate import evaluate_model_dir  # evaluation reloads what was written

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = fixed_split(dataset, recipe.seed, val_folds=recipe.val_folds)
    x, y = load_arrays(dataset, recipe.input)
    watched = split.val if len(split.val) else split.test
    started = datetime.now(UTC)
    x_train = training_pixels(dataset, split.train, x, [recipe])
    model, history = fit(x_train, y[split.train], recipe, validation=(x[watched], y[watched]))
    minutes = (datetime.now(UTC) - started).total_seconds() / 60

    save_weights(model, out_dir / WEIGHTS_FILE)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    plot_history(history, out_dir / "training_curves.png")
    trainable, frozen = count_params(model)
    card = {
        "version": version,
        "created_at": started.isoformat(timespec="seconds"),
        "intended_use": (
            "Decision support for cytology staff reviewing single-cell Pap-smear images. "
            "Every result is a model's suggestion that a qualified person must confirm. "
            "Not validated for clinical use."
        ),
        "architecture": "Keras ResNet50 (include_top=False) -> GlobalAveragePooling -> Dropout -> Dense softmax",
        "parameters": {"trainable": trainable, "non_trainable": frozen},
        "class_names": list(CLASS_NAMES),
        "normal_classes": [c for c in CLASS_NAMES if c in NORMAL_CLASSES],
        "abnormal_classes": [c for c in CLASS_NAMES if c in ABNORMAL_CLASSES],
        "bethesda_hint": BETHESDA_HINT,
        "input": {
            **recipe.input.to_dict(),
            "pixels": "RGB 0-255; normalised inside the network",
            "normalization": recipe.normalization,
            "function": "app.ml.preprocessing.prepare_image",
        },
        "tta": recipe.tta,
        "backbone": recipe.backbone.describe(),
        "recipe": recipe.to_dict(),
        "data": {
            "root_name": dataset.root.name,
            "images": len(dataset.samples),
            "fingerprint_sha256": dataset.fingerprint(),
            "split": {
                "method": "StratifiedGroupKFold by group_prefix; fold 0 of 5 = test, fold 0 of "
                f"{recipe.val_folds} of the rest = validation",
                "seed": recipe.seed,
                "val_folds": recipe.val_folds,
                "train": len(split.train),
                "val": len(split.val),
                "test": len(split.test),
            },
        },
        "training": {
            "minutes": round(minutes, 1),
            "final_epoch": {k: v[-1] for k, v in history.items()},
        },
        "weights_file": WEIGHTS_FILE,
        "weights_dtype": "float16",
        "weights_sha256": sha256_file(out_dir / WEIGHTS_FILE),
    }
    write_card(out_dir, card)
    return evaluate_model_dir(out_dir, dataset)
