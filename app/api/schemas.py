"""JSON shapes of the REST API."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.db.models import Prediction, Review
from app.ml.classes import BETHESDA_HINT, CLASS_LABELS
from app.services.predictions import CallPolicy, final_label

NOTICE = (
    "Computer-generated suggestion from a machine-learning model. "
    "It must be reviewed by a qualified cytotechnologist or pathologist; it is not a diagnosis."
)


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["confirm", "override"]
    label: str | None = Field(default=None, description="Required for override: one of the 7 class names.")
    comment: str | None = Field(default=None, max_length=2000)


class ReviewOut(BaseModel):
    id: int
    action: str
    label: str
    comment: str | None
    reviewer: str
    reviewer_role: str
    created_at: datetime

    @classmethod
    def of(cls, review: Review) -> "ReviewOut":
        return cls(
            id=review.id,
            action=review.action,
            label=review.label,
            comment=review.comment,
            reviewer=review.reviewer.username,
            reviewer_role=review.reviewer.role,
            created_at=review.created_at,
        )


class PredictionOut(BaseModel):
    id: int
    accession_id: str | None
    predicted_class: str
    predicted_label: str
    probabilities: dict[str, float]
    abnormal_probability: float = Field(description="Sum of the 4 abnormal classes' calibrated probabilities.")
    abnormal_threshold: float = Field(description="The lab's P(abnormal) cut-off in force when read.")
    abnormal_call: Literal["normal", "abnormal"]
    needs_review: bool = Field(description="P(abnormal) lies within the configured uncertainty band of the cut-off.")
    bethesda_hint: str
    model_version: str
    weights_sha256: str
    image_sha256: str
    original_filename: str | None
    source: str
    submitted_by: str
    created_at: datetime
    reviews: list[ReviewOut]
    final_label: str | None
    notice: str = NOTICE

    @classmethod
    def of(cls, p: Prediction, policy: CallPolicy) -> "PredictionOut":
        return cls(
            id=p.id,
            accession_id=p.accession_id,
            predicted_class=p.predicted_class,
            predicted_label=CLASS_LABELS[p.predicted_class],
            probabilities=p.probabilities,
            abnormal_probability=p.abnormal_probability,
            abnormal_threshold=policy.abnormal_threshold,
            abnormal_call="abnormal" if policy.is_abnormal(p.abnormal_probability) else "normal",
            needs_review=policy.needs_review(p.abnormal_probability),
            bethesda_hint=BETHESDA_HINT[p.predicted_class],
            model_version=p.model_version,
            weights_sha256=p.weights_sha256,
            image_sha256=p.image.sha256,
            original_filename=p.original_filename,
            source=p.source,
            submitted_by=f"user:{p.user.username}" if p.user else f"apikey:{p.api_client.name}" if p.api_client else "",
            created_at=p.created_at,
            reviews=[ReviewOut.of(r) for r in p.reviews],
            final_label=final_label(p),
        )


class PredictionPage(BaseModel):
    items: list[PredictionOut]
    total: int
    limit: int
    offset: int


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class BatchCounts(BaseModel):
    total: int
    queued: int
    processing: int
    classified: int
    failed: int
    reviewed: int


class BatchOut(BaseModel):
    id: int
    name: str | None
    accession_id: str | None
    status: Literal["processing", "done"]
    progress: float = Field(description="Share of items classified or failed, 0-1.")
    counts: BatchCounts
    created_at: datetime


class BatchItemOut(BaseModel):
    id: int
    position: int
    file_name: str
    status: str
    error: str | None
    qc_sample: bool
    uncertainty: float | None = Field(description="1 - |2 P(abnormal) - 1|: 1 = coin flip, 0 = sure.")
    prediction: PredictionOut | None


class BatchItemPage(BaseModel):
    items: list[BatchItemOut]
    total: int
    limit: int
    offset: int
