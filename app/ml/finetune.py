"""Fine-tuning a base network on a site's cells (the recipe of `app.ml.adapt`).

BatchNorm statistics are re-estimated on the site's cells, then frozen with the convolution biases; each ResNet
stage has its own learning-rate scale; an L2-SP penalty pulls the weights towards the base; the epoch kept is
the best on the caller's validation yardstick (`validation_judge`). Optionally (`base_share`) every batch also
mixes in base training images whose targets are the base network's own probabilities: learning without
forgetting, for a network that must serve both kinds of cell. The adapted model routes instead
(`app.ml.routing`), so by default the site network learns the site alone.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from app.errors import InputError
from app.ml.artifact import verified_weights_path
from app.ml.classes import CLASS_NAMES
from app.ml.classifier import keras_network
from app.ml.inference import Predictor
from app.ml.site_cells import ADAPT_EPOCHS, ADAPT_LEARNING_RATE, ADAPT_MAX_STEPS
from app.ml.train import augmentation


@dataclass(frozen=True)
class AdaptConfig:
    """The fine-tuning recipe; the defaults are the one measured on the simulated site (model_store/README.md)."""

    epochs: int = ADAPT_EPOCHS
    optimizer: str = "adam"  # or "sgd" (momentum 0.9)
    learning_rate: float = ADAPT_LEARNING_RATE
    batch_size: int = 32
    base_share: float = 0.0  # of every batch, when base data is given (0.75: 8 site cells + 24 base images)
    distillation: float = 1.0  # weight of the base model's probabilities in the base images' targets
    l2sp: float = 0.01  # alpha/2 * ||w - w_base||^2, summed over every trainable weight
    label_smoothing: float = 0.1
    # Learning-rate scale per ResNet stage (conv1 = the stem, ..., conv5, head); 0 freezes the stage. The early
    # stages feed every later one through frozen BatchNorm (the stem's divides by about 0.26): they move least.
    stage_rates: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 1.0, 1.0)
    augmentation: str = "cell"
    # Above 0, BatchNorm statistics are first re-estimated on batches with this share of site cells (the rest base
    # images), then frozen: the site's stain and scale move every layer's inputs and new statistics re-centre them
    # at once. 0 keeps the base statistics (for a network that must also serve the base's cells).
    statistics_site_share: float = 1.0
    # At most this many steps in all (0: no limit): a site of more than about 1,000 training cells (some 1,600
    # reviewed cells) sees a random part of itself per epoch, so its time stays bounded.
    max_steps: int = ADAPT_MAX_STEPS
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InputError("epochs must be at least 1")
        if not 0 <= self.base_share < 1:
            raise InputError("base_share must be in [0, 1)")
        if not 0 <= self.statistics_site_share <= 1:
            raise InputError("statistics_site_share must be in [0, 1]")


def validation_judge(pixels: np.ndarray, labels: np.ndarray) -> Callable[[int, keras.Model], float]:
    """Early stopping's yardstick: 7-class accuracy on the combined validation cells (the site's validation
    accessions and, with the base data, the base model's validation split), one plain forward pass each, so an
    epoch that forgets the base classes scores lower even when the site gains."""

    def judge(epoch: int, model: keras.Model) -> float:
        return float(np.mean(Predictor(model, "none")(pixels).argmax(axis=1) == labels))

    return judge


def _all_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    yield layer
    for inner in getattr(layer, "layers", []):
        yield from _all_layers(inner)


STATISTICS_BATCHES = 60  # momentum 0.9: the base statistics keep a weight of 0.9**60, about 0.002
STATISTICS_MOMENTUM = 0.9


def _reestimate_statistics(model: keras.Model, site: np.ndarray, base: np.ndarray | None, config: AdaptConfig) -> None:
    """BatchNorm moving statistics from forward passes over batches of site cells and base images (unaugmented),
    `statistics_site_share` of each batch from the site. Only the statistics change: no weight is trained."""
    rng = np.random.default_rng(config.seed)
    share = config.statistics_site_share if base is not None and len(base) > 0 else 1.0
    n_site = min(config.batch_size, max(1, round(config.batch_size * share)))
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = STATISTICS_MOMENTUM
    forward = tf.function(lambda images: model(images, training=True))  # a graph: about 3x faster than eager
    for _ in range(STATISTICS_BATCHES):
        batch = site[rng.choice(len(site), n_site)]
        if n_site < config.batch_size and base is not None:
            batch = np.concatenate([batch, base[rng.choice(len(base), config.batch_size - n_site)]])
        forward(tf.constant(batch, tf.float32))


def _smoothed(labels: tf.Tensor, smoothing: float) -> tf.Tensor:
    onehot = tf.one_hot(labels, len(CLASS_NAMES))
    return onehot * (1.0 - smoothing) + smoothing / len(CLASS_NAMES)


def _cross_entropy(targets: tf.Tensor, probs: tf.Tensor) -> tf.Tensor:
    return -tf.reduce_mean(tf.reduce_sum(targets * tf.math.log(tf.clip_by_value(probs, 1e-7, 1.0)), axis=1))


def _batches(x: np.ndarray, y: np.ndarray, size: int, seed: int, augment: keras.Sequential) -> tf.data.Dataset:
    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(size, drop_remainder=True)
        .map(lambda images, labels: (augment(tf.cast(images, tf.float32), training=True), labels))
        .prefetch(2)
    )


STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5", "head")


def _stage(variable: keras.Variable) -> str:
    """conv1 (the stem) ... conv5, or head: the ResNet stage a variable belongs to."""
    path: str = variable.path
    return path.split("/")[-2].split("_")[0]


def _groups(model: keras.Model, config: AdaptConfig) -> list[tuple[float, list[keras.Variable]]]:
    """Trainable variables by learning-rate scale (stages with scale 0 are frozen).

    Convolution biases feed BatchNorm, which removed them while the base model trained, so they never learned
    anything; under frozen BatchNorm each would shift a whole channel at once, and the site's gradient moves
    them first. They stay as they are: kernels (and the head) adapt.
    """
    scales = dict(zip(STAGES, config.stage_rates, strict=True))
    groups: dict[float, list[keras.Variable]] = {}
    for variable in model.trainable_variables:
        scale = scales[_stage(variable)]
        if scale > 0 and not variable.path.endswith("_conv/bias"):
            groups.setdefault(scale, []).append(variable)
    return sorted(groups.items(), reverse=True)


def fine_tune(
    base_dir: Path,
    card: dict[str, Any],
    site: tuple[np.ndarray, np.ndarray],
    base: tuple[np.ndarray, np.ndarray] | None,
    config: AdaptConfig,
    progress: bool = True,
    judge: Callable[[int, keras.Model], float] | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """The base network, fine-tuned on the site cells (and base images); returns it with its per-epoch history.

    judge(epoch, model): a score on validation data after each epoch (higher is better); the weights of the
    best-scoring epoch are the ones returned (early stopping on the validation the caller chooses).
    """
    keras.utils.set_random_seed(config.seed)
    weights = verified_weights_path(base_dir, card)
    student = keras_network(card, weights)
    mixed = base if base is not None and len(base[0]) > 0 and config.base_share > 0 else None
    if config.statistics_site_share > 0:
        _reestimate_statistics(student, site[0], base[0] if base is not None else None, config)
    for layer in _all_layers(student):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False  # keeps its statistics and runs in inference mode
    base_size = max(1, round(config.batch_size * config.base_share)) if mixed is not None else 0
    site_size = max(1, min(config.batch_size - base_size, len(site[0])))
    steps = max(1, len(site[0]) // site_size)
    if config.max_steps:
        steps = min(steps, max(1, config.max_steps // config.epochs))
    augment = augmentation(config.augmentation)
    site_ds = _batches(*site, site_size, config.seed, augment)
    if mixed is not None:
        teacher = keras_network(card, weights)
        teacher.set_weights(student.get_weights())  # the statistics the student trains under; the same weights
        base_ds = _batches(*mixed, base_size, config.seed + 1, augment)
        stream = tf.data.Dataset.zip(site_ds, base_ds)
    else:
        teacher = None
        stream = site_ds.map(lambda x, y: ((x, y), (x[:0], y[:0])))

    groups = _groups(student, config)
    variables = [v for _, group in groups for v in group]
    anchors = [tf.constant(v.numpy()) for v in variables]
    total = steps * config.epochs
    warmup = steps  # one epoch: Adam's first steps move every weight by about the full rate
    optimizers = []
    for scale, _ in groups:
        rate = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, total - warmup), warmup_target=config.learning_rate * scale, warmup_steps=warmup
        )
        optimizers.append(
            keras.optimizers.SGD(rate, momentum=0.9) if config.optimizer == "sgd" else keras.optimizers.Adam(rate)
        )

    def train_step(
        site_x: tf.Tensor, site_y: tf.Tensor, base_x: tf.Tensor, base_y: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
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
        gradients = tape.gradient(loss, variables)
        start = 0
        for optimizer, (_, group) in zip(optimizers, groups, strict=True):
            optimizer.apply_gradients(zip(gradients[start : start + len(group)], group, strict=True))
            start += len(group)
        return cross_entropy, drift

    step = tf.function(train_step)  # a graph; wrapped, not decorated: TensorFlow ships no types

    history: dict[str, list[float]] = {"loss": [], "drift": [], "validation_score": []}
    best: tuple[float, int, list[np.ndarray]] | None = None
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
            if judge is not None:
                score = float(judge(epoch + 1, student))
                history["validation_score"].append(score)
                if best is None or score > best[0]:
                    best = (score, epoch + 1, [v.numpy() for v in variables])
    history["steps_per_epoch"] = [float(steps)]
    if best is not None:
        for variable, value in zip(variables, best[2], strict=True):
            variable.assign(value)
        history["chosen_epoch"] = [float(best[1])]
    return student, history
