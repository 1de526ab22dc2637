"""The labelled image folder: discovery, grouped splits and loading into arrays.

Layout: `<root>/<class name>/<image files>`, one folder per Herlev class. Herlev holds the
same cell twice in a few crops sharing the file name's first number, so every split is by
group (`group_prefix`), never by image.
"""

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from app.errors import DatasetError, InvalidImageError
from app.ml.classes import CLASS_NAMES
from app.ml.preprocessing import InputSpec, prepare_image

IMAGE_SUFFIXES = {".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff"}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    group: str


@dataclass(frozen=True)
class Dataset:
    root: Path
    samples: tuple[Sample, ...]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples])

    @property
    def groups(self) -> np.ndarray:
        return np.array([s.group for s in self.samples])

    def subset(self, indices: np.ndarray) -> "Dataset":
        return Dataset(self.root, tuple(self.samples[i] for i in indices))

    def fingerprint(self) -> str:
        """SHA-256 over (relative path, class, SHA-256 of file) of every sample, sorted."""
        digest = hashlib.sha256()
        for sample in sorted(self.samples, key=lambda s: str(s.path)):
            file_hash = hashlib.sha256(sample.path.read_bytes()).hexdigest()
            rel = sample.path.relative_to(self.root).as_posix()
            digest.update(f"{rel}\t{CLASS_NAMES[sample.label]}\t{file_hash}\n".encode())
        return digest.hexdigest()


def group_of(path: Path) -> str:
    """Herlev names are `<group>-<number>-<nnn>.BMP`: crops of one cell share the first number."""
    return path.stem.split("-")[0]


def _manifest_groups(root: Path) -> dict[str, str]:
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        return {}
    with open(manifest, newline="") as handle:
        return {row["path"]: row["group_prefix"] for row in csv.DictReader(handle)}


def discover(root: Path) -> Dataset:
    """Find the labelled images under root, or raise DatasetError saying what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    folders = {p.name for p in root.iterdir() if p.is_dir()}
    missing = [name for name in CLASS_NAMES if name not in folders]
    if len(missing) == len(CLASS_NAMES):
        raise DatasetError(
            f"{root} has none of the class folders; expected one folder per class: " + ", ".join(CLASS_NAMES)
        )
    if missing:
        raise DatasetError(f"{root} lacks the class folder(s): {', '.join(missing)}")
    groups = _manifest_groups(root)
    samples = []
    for label, name in enumerate(CLASS_NAMES):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"class folder {root / name} holds no images")
        for path in files:
            rel = path.relative_to(root).as_posix()
            samples.append(Sample(path, label, groups.get(rel, group_of(path))))
    return Dataset(root, tuple(samples))


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def grouped_folds(dataset: Dataset, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k grouped, class-stratified folds: (train indices, held-out indices) for each."""
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    indices = np.arange(len(dataset.samples))
    try:
        return list(splitter.split(indices, dataset.labels, dataset.groups))
    except ValueError as exc:  # scikit-learn: fewer groups, or members per class, than folds
        raise DatasetError(
            f"{len(indices)} images in {len(set(dataset.groups))} groups are too few for a grouped {k}-fold "
            f"split ({exc}); add images from more groups to every class"
        ) from exc


def fixed_split(dataset: Dataset, seed: int, test_folds: int = 5, val_folds: int = 8) -> Split:
    """Train/val/test by group: 1/test_folds held out as test, 1/val_folds of the rest as val."""
    rest, test = grouped_folds(dataset, test_folds, seed)[0]
    rest_set = dataset.subset(rest)
    train_local, val_local = grouped_folds(rest_set, val_folds, seed)[0]
    return Split(train=rest[train_local], val=rest[val_local], test=test)


def load_arrays(dataset: Dataset, spec: InputSpec, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All images as a uint8 (n, size, size, 3) array through `prepare_image`, and their labels."""
    images = []
    for sample in tqdm(dataset.samples, desc="loading images", unit="img", disable=not progress):
        try:
            images.append(prepare_image(sample.path.read_bytes(), spec))
        except InvalidImageError as exc:
            raise DatasetError(f"{sample.path}: {exc}") from exc
    return np.stack(images), dataset.labels
