"""Training recipes: the published method, and the default model our offline machines can train."""

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from app.ml.model import BackboneWeights, Normalization
from app.ml.preprocessing import InputSpec
from app.ml.runtime import TTA


@dataclass(frozen=True)
class Recipe:
    name: str
    input: InputSpec
    backbone: BackboneWeights
    freeze_backbone: bool
    epochs: int
    optimizer: Literal["adam", "adamw"]
    learning_rate: float
    schedule: Literal["constant", "cosine"]
    augmentation: Literal["published", "cell", "robust", "robust_windows"]
    dropout: float = 0.5
    normalization: Normalization = "caffe"
    batch_size: int = 32
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    mixed_precision: bool = False
    tta: TTA = "none"
    seed: int = 1234
    # Start from a trained model's weights (same input and split) instead of backbone.source.
    init_from: str | None = None
    # val_folds=0: no separate validation split; the held-out 20 % is watched during
    # training, as in the published 80/20 method. Otherwise 1/val_folds of the training part.
    val_folds: int = 8
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input"] = self.input.to_dict()
        data["backbone"] = self.backbone.describe()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        """The recipe a model card records (`to_dict`), e.g. to retrain a starting model in cross-validation."""
        backbone = data.get("backbone") or {}
        if backbone.get("source", "none") not in ("none", "imagenet"):
            raise ValueError("this card's backbone came from a local file whose path it does not record")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.update(input=InputSpec.from_dict(data["input"]), backbone=BackboneWeights(source=backbone["source"]))
        return cls(**values)

    @property
    def cuts_windows(self) -> bool:
        """Whether training also shows fixed-size windows of each cell (`app.ml.windows`), not only its crop."""
        return self.augmentation == "robust_windows"

    def with_overrides(self, **changes: Any) -> "Recipe":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


PUBLISHED = Recipe(
    name="published",
    input=InputSpec(size=224, fit="resize"),
    backbone=BackboneWeights(source="imagenet"),
    freeze_backbone=True,
    epochs=50,
    optimizer="adam",
    learning_rate=1e-3,
    schedule="constant",
    augmentation="published",
    val_folds=0,
    notes=["ImageNet ResNet50 frozen; only the 14,343-parameter head trains; 80/20 grouped split."],
)

DEFAULT = Recipe(
    name="default",
    input=InputSpec(size=128, fit="resize"),
    backbone=BackboneWeights(source="none"),
    freeze_backbone=False,
    epochs=100,
    optimizer="adamw",
    learning_rate=1e-3,
    weight_decay=1e-4,
    schedule="cosine",
    warmup_epochs=3,
    augmentation="cell",
    label_smoothing=0.1,
    mixed_precision=True,
    normalization="unit",
    tta="dihedral8",
    notes=["Whole ResNet50 trained from random initialisation (no internet for ImageNet weights)."],
)

ROBUST = replace(
    DEFAULT,
    name="robust",
    epochs=40,
    learning_rate=1e-4,
    warmup_epochs=2,
    augmentation="robust",
    notes=[
        "Continues from a trained default model (--init-from) under stain, colour, framing and optics "
        "augmentation (app.ml.augment), so the invariances do not cost what they cost from scratch.",
    ],
)

ROBUST_WINDOWS = replace(
    ROBUST,
    name="robust_windows",
    epochs=30,
    augmentation="robust_windows",
    notes=[
        "Continues from a trained robust model (--init-from) under the robust augmentation, with half of the "
        "shifted cells fixed-size windows (64-256 px) centred on the cell, cut from the original images "
        "(app.ml.windows), as labs that frame every cell the same way send them.",
    ],
)

RECIPES: dict[str, Recipe] = {r.name: r for r in (DEFAULT, PUBLISHED, ROBUST, ROBUST_WINDOWS)}
