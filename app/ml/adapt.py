"""Adapt a model to one laboratory from the cells its own reviewers labelled.

    site cells --(grouped by accession)--> train | validation | held-out test
    base model --fine-tune on site train (+ base training data)--> adapted model
    validation --> temperature and abnormal cut-off;  held-out site + base test --> before / after

The recipe tries not to forget the base data (the forgetting check on the base model's own test split
is in the card; on the simulated site of model_store/README.md it still loses about 6 points there):
  * every batch mixes site cells with base training images (`base_share` of the batch);
  * the base images' targets blend their label with the base model's own probabilities (learning
    without forgetting: the adapted network is asked to answer as before);
  * BatchNorm statistics and scales, and the convolution biases in front of them, stay the base
    model's, so base-data inputs are normalised exactly as before;
  * an L2-SP penalty pulls every weight towards its base value, and the learning rate is small,
    with a one-epoch warm-up and cosine decay to zero.
No database, no HTTP: the caller hands over the site cells (see `app.services.site_data`).
"""

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from app.errors import DatasetError, InputError, InvalidImageError, PapcadError
from app.ml import calibration as cal
from app.ml.artifact import WEIGHTS_FILE, read_card, sha256_file, verified_weights_path, write_card
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import Classifier
from app.ml.data import Dataset, discover, fixed_split, load_arrays
from app.ml.evaluation import ABNORMAL_MASK, compute_metrics, write_report
from app.ml.model import build_model, load_weights, save_weights
from app.ml.preprocessing import prepare_image
from app.ml.train import augmentation

# Fewer reviewed cells, or fewer accessions, cannot give a grouped train / validation / test split
# with enough cells on each side to fit a cut-off and to judge the result.
MIN_REVIEWED_CELLS = 40
MIN_ACCESSIONS = 5
TARGET_SENSITIVITY = 0.95  # as for the base model: a missed abnormal cell is the costly error
SITE_TEST_FOLDS = 5  # 1/5 of the site's accessions held out for the before/after comparison
SITE_VAL_FOLDS = 5  # 1/5 of the rest for the temperature and cut-off


class TooFewCellsError(PapcadError):
    """Not enough reviewed cells (or accessions) to adapt and still judge the result."""


@dataclass(frozen=True)
class SiteCell:
    """One reviewed cell of the laboratory: its stored image, its final label, its accession."""

    data: bytes
    label: str
    group: str  # the accession (or the image itself when the cell came without one)


@dataclass(frozen=True)
class AdaptConfig:
    epochs: int = 6
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    learning_rate: float = 1e-4
    batch_size: int = 32
    base_share: float = 0.5  # of every batch, when base data is given
    distillation: float = 1.0  # weight of the base model's probabilities in the base images' targets
    l2sp: float = 0.1  # alpha/2 * ||w - w_base||^2, summed over every trainable weight
    label_smoothing: float = 0.1
    augmentation: str = "cell"
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError("epochs must be at least 1")
        if not 0 <= self.base_share < 1:
            raise InputError("base_share must be in [0, 1)")


@dataclass(frozen=True)
class SiteSplit:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def check_enough(cells: Sequence[SiteCell]) -> None:
    """Raise TooFewCellsError unless the cells can be split by accession and still judged."""
    accessions = len({c.group for c in cells})
    if len(cells) < MIN_REVIEWED_CELLS or accessions < MIN_ACCESSIONS:
        raise TooFewCellsError(
            f"{len(cells)} reviewed cells from {accessions} accessions; adaptation needs at least "
            f"{MIN_REVIEWED_CELLS} reviewed cells from at least {MIN_ACCESSIONS} accessions "
            "(review more cells, or widen --since)"
        )


def split_site(labels: np.ndarray, groups: np.ndarray, seed: int) -> SiteSplit:
    """Grouped by accession, stratified by class: one slide's cells never sit on two sides."""
    indices = np.arange(len(labels))
    try:
        rest, test = next(StratifiedGroupKFold(SITE_TEST_FOLDS, shuffle=True, random_state=seed).split(
            indices, labels, groups))  # fmt: skip
        train_local, val_local = next(
            StratifiedGroupKFold(SITE_VAL_FOLDS, shuffle=True, random_state=seed).split(
                rest, labels[rest], groups[rest]
            )
        )
    except ValueError as exc:  # fewer accessions than folds on one side
        raise TooFewCellsError(f"the accessions cannot be split into train/validation/test: {exc}") from exc
    return SiteSplit(train=rest[train_local], val=rest[val_local], test=test)


def site_arrays(cells: Sequence[SiteCell], spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Network input, label indices and accession of every cell."""
    pixels = []
    for cell in tqdm(cells, desc="preparing site cells", unit="img", disable=len(cells) < 200):
        try:
            pixels.append(prepare_image(cell.data, spec))
        except InvalidImageError as exc:  # stored images were checked on upload; this is damage
            raise DatasetError(f"a stored image of accession {cell.group} cannot be read: {exc}") from exc
    labels = np.array([CLASS_NAMES.index(c.label) for c in cells])
    return np.stack(pixels), labels, np.array([c.group for c in cells])


@dataclass
class BaseData:
    """The base model's training data: what is mixed in, and its own test split for the forgetting check."""

    dataset: Dataset
    mix: np.ndarray
    test: np.ndarray | None  # None when the data is not what the base model was trained on
    note: str


def base_data(folder: Path, card: dict) -> BaseData:
    dataset = discover(folder)
    data = card.get("data") or {}
    split_info = data.get("split") or {}
    if data.get("fingerprint_sha256") and dataset.fingerprint() == data["fingerprint_sha256"] and split_info:
        split = fixed_split(dataset, split_info["seed"], val_folds=split_info["val_folds"])
        mix = np.concatenate([split.train, split.val])
        note = "the base model's training data: its train and validation splits mixed in, its test split held out"
        return BaseData(dataset, mix, split.test, note)
    note = (
        "not the data the base model was trained on (fingerprint differs or the card has none): "
        "all of it mixed in, no forgetting check"
    )
    return BaseData(dataset, np.arange(len(dataset.samples)), None, note)


def _all_layers(layer: keras.layers.Layer):
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from _all_layers(inner)


def _network(model_dir: Path, card: dict) -> keras.Model:
    model = build_model(
        int(card["input"]["size"]),
        num_classes=len(CLASS_NAMES),
        dropout=card["recipe"]["dropout"],
        normalization=card["input"].get("normalization", "caffe"),
    )
    load_weights(model, verified_weights_path(model_dir, card))
    return model


def _smoothed(labels: tf.Tensor, smoothing: float) -> tf.Tensor:
    onehot = tf.one_hot(labels, len(CLASS_NAMES))
    return onehot * (1.0 - smoothing) + smoothing / len(CLASS_NAMES)


def _cross_entropy(targets: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    return -tf.reduce_mean(tf.reduce_sum(targets * tf.math.log(tf.clip_by_value(probs, 1e-7, 1.0)), axis=1))


def _batches(x: np.ndarray, y: np.ndarray, size: int, seed: int, augment) -> tf.data.Dataset:
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(size, drop_remainder=True)
        .map(lambda images, labels: (augment(tf.cast(images, tf.float32), training=True), labels))
        .prefetch(2)
    )


def fine_tune(
    base_dir: Path,
    card: dict,
    site: tuple[np.ndarray, np.ndarray],
    base: tuple[np.ndarray, np.ndarray] | None,
    config: AdaptConfig,
    progress: bool = True,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """The base network, fine-tuned on the site cells (and base images); returns it with its per-epoch losses."""
    keras.utils.set_random_seed(config.seed)
    student = _network(base_dir, card)
    for layer in _all_layers(student):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # keeps the base statistics and runs in inference mode
    mixing = base is not None and len(base[0]) > 0 and config.base_share > 0
    base_size = max(1, round(config.batch_size * config.base_share)) if mixing else 0
    site_size = max(1, min(config.batch_size - base_size, len(site[0])))
    steps = max(1, len(site[0]) // site_size)
    augment = augmentation(config.augmentation)
    site_ds = _batches(*site, site_size, config.seed, augment)
    if mixing:
        teacher = _network(base_dir, card)
        base_ds = _batches(*base, base_size, config.seed + 1, augment)
        stream = tf.data.Dataset.zip(site_ds, base_ds)
    else:
        teacher = None
        stream = site_ds.map(lambda x, y: ((x, y), (x[:0], y[:0])))

    # Convolution biases feed BatchNorm, which removed them while the base model trained, so they never
    # learned anything; under frozen BatchNorm each would shift a whole channel at once, and the site's
    # gradient moves them first. They stay as they are: kernels (and the head) adapt.
    variables = [v for v in student.trainable_variables if not v.path.endswith("_conv/bias")]
    anchors = [tf.constant(v.numpy()) for v in variables]
    total = steps * config.epochs
    warmup = steps  # one epoch: Adam's first steps move every weight by about the full rate
    rate = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warmup), warmup_target=config.learning_rate, warmup_steps=warmup
    )
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(rate, momentum=0.9)
    else:
        optimizer = keras.optimizers.Adam(rate)

    @tf.function
    def step(site_x, site_y, base_x, base_y):
        targets = _smoothed(site_y, config.label_smoothing)
        images = site_x
        if teacher is not None:
            remembered = tf.cast(teacher(base_x, training=False), tf.float32)
            base_targets = (1 - config.distillation) * _smoothed(base_y, config.label_smoothing)
            targets = tf.concat([targets, base_targets + config.distillation * remembered], axis=0)
            images = tf.concat([site_x, base_x], axis=0)
        with tf.GradientTape() as tape:
            probs = tf.cast(student(images, training=True), tf.float32)
            cross_entropy = _cross_entropy(targets, probs)
            drift = tf.add_n([tf.reduce_sum(tf.square(v - a)) for v, a in zip(variables, anchors, strict=True)])
            loss = cross_entropy + 0.5 * config.l2sp * drift
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return cross_entropy, drift

    history: dict[str, list[float]] = {"loss": [], "drift": []}
    iterator = iter(stream)
    with tqdm(total=total, desc="adapting", unit="step", disable=not progress) as bar:
        for epoch in range(config.epochs):
            losses, drift = [], 0.0
            for _ in range(steps):
                (site_x, site_y), (base_x, base_y) = next(iterator)
                loss, drift_now = step(site_x, site_y, base_x, base_y)
                losses.append(float(loss))
                drift = float(drift_now)
                bar.update(1)
                bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{np.mean(losses):.3f}")
            history["loss"].append(float(np.mean(losses)))
            history["drift"].append(drift)
    return student, history


def _summary(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """The figures the card and the admin page show for one model on one set of cells."""
    result = compute_metrics(labels, probs)
    p_abnormal, abnormal = probs[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[labels]
    sensitivity, specificity = cal.sensitivity_specificity(p_abnormal, abnormal, threshold)
    return {
        "n": result["n"],
        "accuracy_7class": result["multiclass"]["accuracy"],
        "macro_f1": result["multiclass"]["macro_f1"],
        "binary_accuracy": result["binary"]["accuracy"],
        "binary_sensitivity": result["binary"]["sensitivity"],
        "binary_specificity": result["binary"]["specificity"],
        "binary_roc_auc": result["binary"]["roc_auc"],
        "cutoff": threshold,
        "cutoff_sensitivity": None if np.isnan(sensitivity) else sensitivity,
        "cutoff_specificity": None if np.isnan(specificity) else specificity,
        "nll": cal.negative_log_likelihood(probs, labels),
    }


def _card_summary(card: dict) -> dict | None:
    """The base model's own test-split figures from its card (written by `papcad evaluate` with the same
    calibrated, test-time-augmented predictions), so the forgetting check need not score them again."""
    metrics, cutoff = card.get("metrics") or {}, card.get("abnormal_threshold") or {}
    keys = ("n", "accuracy_7class", "macro_f1", "binary_accuracy", "binary_sensitivity", "binary_specificity")
    if metrics.get("split") != "test" or any(k not in metrics for k in (*keys, "binary_roc_auc")):
        return None
    return {
        **{k: metrics[k] for k in (*keys, "binary_roc_auc")},
        "cutoff": cutoff.get("value"),
        "cutoff_sensitivity": cutoff.get("test_sensitivity"),
        "cutoff_specificity": cutoff.get("test_specificity"),
        "nll": ((card.get("calibration") or {}).get("test") or {}).get("nll_after"),
        "source": "the base model card",
    }


def _calibrated(classifier: Classifier, pixels: np.ndarray) -> np.ndarray:
    return classifier.predict_pixels(pixels) if len(pixels) else np.zeros((0, len(CLASS_NAMES)))


def _recalibrate(classifier: Classifier, x_val: np.ndarray, y_val: np.ndarray, base_threshold: float) -> tuple:
    """Temperature and cut-off fitted on the site's validation cells (the base cut-off if they cannot say)."""
    raw = classifier.predictor(x_val)
    temperature = cal.fit_temperature(raw, y_val)
    scaled = cal.apply_temperature(raw, temperature)
    p_val, abnormal = scaled[:, ABNORMAL_MASK].sum(axis=1), ABNORMAL_MASK[y_val]
    calibration = {
        "method": "temperature scaling fitted on the site's validation accessions (NLL)",
        "temperature": temperature,
        "validation": {
            "n": int(len(y_val)),
            "ece_before": cal.expected_calibration_error(raw, y_val),
            "ece_after": cal.expected_calibration_error(scaled, y_val),
            "nll_before": cal.negative_log_likelihood(raw, y_val),
            "nll_after": cal.negative_log_likelihood(scaled, y_val),
        },
    }
    if abnormal.all() or not abnormal.any():
        threshold, chosen_on = base_threshold, "base model (the site validation cells are all of one kind)"
    else:
        threshold, chosen_on = cal.choose_abnormal_threshold(p_val, abnormal, TARGET_SENSITIVITY), "site validation"
    sensitivity, specificity = cal.sensitivity_specificity(p_val, abnormal, threshold)
    cutoff = {
        "value": threshold,
        "chosen_on": chosen_on,
        "target_sensitivity": TARGET_SENSITIVITY,
        "validation_sensitivity": None if np.isnan(sensitivity) else sensitivity,
        "validation_specificity": None if np.isnan(specificity) else specificity,
    }
    return calibration, cutoff


def _describe(cells: Sequence[SiteCell], labels: np.ndarray, groups: np.ndarray, split: SiteSplit) -> dict:
    counts = Counter(c.label for c in cells)

    def side(indices: np.ndarray) -> dict:
        return {"cells": int(len(indices)), "accessions": int(len(set(groups[indices])))}

    return {
        "reviewed_cells": len(cells),
        "accessions": int(len(set(groups))),
        "per_class": {name: counts.get(name, 0) for name in CLASS_NAMES},
        "abnormal": int(ABNORMAL_MASK[labels].sum()),
        "split": {
            "method": f"StratifiedGroupKFold by accession: fold 0 of {SITE_TEST_FOLDS} held out as test, "
            f"fold 0 of {SITE_VAL_FOLDS} of the rest for validation (temperature and cut-off)",
            "train": side(split.train),
            "validation": side(split.val),
            "test": side(split.test),
        },
    }


def _refuse_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"{out_dir} already exists and is not empty; choose a new directory for the adapted model")


def adapt(
    cells: Sequence[SiteCell],
    base_dir: Path,
    out_dir: Path,
    base_folder: Path | None = None,
    config: AdaptConfig = AdaptConfig(),
    version: str | None = None,
    since: str | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune the base model on the site's reviewed cells and write the adapted model directory.

    Everything is written to a hidden sibling directory that is renamed to out_dir only when complete,
    so a refusal or a failure leaves nothing behind. Returns the new card.
    """
    started = time.monotonic()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    _refuse_out(out_dir)
    check_enough(cells)
    base_card = read_card(base_dir)
    base_model = Classifier.load(base_dir, with_ood=False)
    spec = base_model.spec
    x_site, y_site, groups = site_arrays(cells, spec)
    split = split_site(y_site, groups, config.seed)
    base = base_data(base_folder, base_card) if base_folder is not None else None
    base_arrays = load_arrays(base.dataset.subset(base.mix), spec, progress) if base is not None else None

    model, history = fine_tune(
        base_dir, base_card, (x_site[split.train], y_site[split.train]), base_arrays, config, progress
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        card = _write_adapted(work, model, history, base_card, base_dir, version or out_dir.name)
        del model
        adapted = Classifier.load(work, with_ood=False)
        calibration, cutoff = _recalibrate(adapted, x_site[split.val], y_site[split.val], base_model.abnormal_threshold)
        card["calibration"], card["abnormal_threshold"] = calibration, cutoff
        write_card(work, card)
        adapted = Classifier.load(work, with_ood=False)

        x_test, y_test = x_site[split.test], y_site[split.test]
        site_after_probs = _calibrated(adapted, x_test)
        site = {
            "split": "held-out site accessions",
            "before": _summary(y_test, _calibrated(base_model, x_test), base_model.abnormal_threshold),
            "after": _summary(y_test, site_after_probs, cutoff["value"]),
        }
        write_report(work, y_test, site_after_probs, prefix="site_test")
        herlev = None
        if base is not None and base.test is not None:
            x_base_test, y_base_test = load_arrays(base.dataset.subset(base.test), spec, progress)
            herlev_after_probs = _calibrated(adapted, x_base_test)
            before = _card_summary(base_card)
            if before is None or before["n"] != len(y_base_test):
                before = _summary(y_base_test, _calibrated(base_model, x_base_test), base_model.abnormal_threshold)
            after = _summary(y_base_test, herlev_after_probs, cutoff["value"])
            herlev = {
                "split": f"the base model's own test split of {base.dataset.root.name}",
                "before": before,
                "after": after,
                "accuracy_7class_change_points": round(100 * (after["accuracy_7class"] - before["accuracy_7class"]), 2),
                "binary_accuracy_change_points": round(100 * (after["binary_accuracy"] - before["binary_accuracy"]), 2),
            }
            write_report(work, y_base_test, herlev_after_probs, prefix="base_test")
        card["adaptation"] = {
            "base_version": base_card["version"],
            "base_weights_sha256": base_card["weights_sha256"],
            "base_directory": base_dir.name,
            "site_data": {**_describe(cells, y_site, groups, split), "since": since},
            "base_data": None
            if base is None
            else {
                "root_name": base.dataset.root.name,
                "images_mixed": int(len(base.mix)),
                "note": base.note,
            },
            "config": asdict(config),
            "history": history,
            "minutes": round((time.monotonic() - started) / 60, 1),
            "site_metrics": site,
            "base_test_metrics": herlev,
        }
        card["metrics"] = {
            **site["after"],
            "split": "held-out site accessions",
            "tta": adapted.predictor.tta,
            "probabilities": "calibrated",
            "details": "site_test_metrics.json",
        }
        write_card(work, card)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return card


def _write_adapted(
    work: Path, model: keras.Model, history: dict, base_card: dict, base_dir: Path, version: str
) -> dict:
    save_weights(model, work / WEIGHTS_FILE)
    (work / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    card = {k: v for k, v in base_card.items() if k not in ("ood", "robustness", "metrics", "calibration")}
    card.update(
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        weights_file=WEIGHTS_FILE,
        weights_dtype="float16",
        weights_sha256=sha256_file(work / WEIGHTS_FILE),
    )
    card["notes"] = [
        f"Adapted from {base_card['version']} to one laboratory's reviewed cells (see 'adaptation').",
        "The base model's out-of-distribution model does not fit the adapted network and was not copied; "
        "refit it with `papcad fit-ood` if wanted.",
    ]
    write_card(work, card)
    return card
