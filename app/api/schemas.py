"""JSON shapes of the REST API."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.db.models import Prediction, Review
from app.domain import BatchStatus, CaseStatus, ItemStatus, PredictionSource
from app.ml.classes import BETHESDA_HINT, CLASS_LABELS
from app.services.calls import CallPolicy
from app.services.predictions import final_label

NOTICE = (
    "Computer-generated suggestion from a machine-learning model. "
    "It must be reviewed by a qualified cytotechnologist or pathologist; it is not a diagnosis."
)


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: Literal["confirm", "override"]
    label: str | None = Field(default=None, description="Required for override: one of the 7 class names.")
    comment: str | None = Field(default=None, max_length=2000)
    reason: str | None = Field(
        default=None, max_length=2000, description="Required when the cell is already reviewed: why it is amended."
    )


class ReviewOut(BaseModel):
    id: int
    action: str
    label: str
    comment: str | None
    reviewer: str
    reviewer_role: str
    amends_review_id: int | None = Field(description="The review this one amends; null for a first review.")
    amend_reason: str | None
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
            amends_review_id=review.amends_review_id,
            amend_reason=review.amend_reason,
            created_at=review.created_at,
        )


class PredictionOut(BaseModel):
    id: int
    accession_id: str | None
    predicted_class: str
    predicted_label: str
    probabilities: dict[str, float]
    abnormal_probability: float = Field(description="Sum of the 4 abnormal classes' calibrated probabilities.")
    abnormal_threshold: float = Field(
        description="The P(abnormal) cut-off this call is read at: that of the model version that made it (or the "
        "lab's own cut-off when one is set)."
    )
    abnormal_call: Literal["normal", "abnormal"]
    needs_review: bool = Field(description="A person must look: true when review_reasons is not empty.")
    review_reasons: list[str] = Field(
        description="Short reasons: near the cut-off, top class and cut-off call disagree, not a typical cell, "
        "input checks (size, flat image, exposure, bit depth, palette, transparency, aspect ratio)."
    )
    in_distribution: bool | None = Field(
        description="False: not a typical cell (OOD score over 1). Null when the model has no OOD model."
    )
    ood_score: float | None = Field(
        description="Feature-space distance to the training cells (the largest over several network stages) over "
        "the cut-off that keeps 95 % of validation cells: <= 1 typical, > 1 not a typical cell."
    )
    input_flags: list[str] = Field(description="What the input checks found odd in the uploaded file.")
    bethesda_hint: str
    model_version: str
    weights_sha256: str
    image_sha256: str
    original_filename: str | None
    source: PredictionSource
    submitted_by: str
    created_at: datetime
    reviews: list[ReviewOut]
    final_label: str | None
    notice: str = NOTICE

    @classmethod
    def of(cls, p: Prediction, policy: CallPolicy) -> "PredictionOut":
        reasons = policy.review_reasons(p)
        return cls(
            id=p.id,
            accession_id=p.accession_id,
            predicted_class=p.predicted_class,
            predicted_label=CLASS_LABELS[p.predicted_class],
            probabilities=p.probabilities,
            abnormal_probability=p.abnormal_probability,
            abnormal_threshold=policy.cutoff_of(p),
            abnormal_call="abnormal" if policy.calls_abnormal(p) else "normal",
            needs_review=bool(reasons),
            review_reasons=reasons,
            in_distribution=p.in_distribution,
            ood_score=p.ood_score,
            input_flags=p.input_flags or [],
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
    status: BatchStatus
    progress: float = Field(description="Share of items classified or failed, 0-1.")
    counts: BatchCounts
    created_at: datetime


class BatchItemOut(BaseModel):
    id: int
    position: int
    file_name: str
    status: ItemStatus
    error: str | None
    qc_sample: bool
    uncertainty: float | None = Field(
        description="How unsure the normal/abnormal call is: 1 at the cut-off of the model that made it (the "
        "prediction's abnormal_threshold), falling linearly to 0 at P(abnormal) 0 or 1 on the cut-off's side; "
        "null until the cell is classified."
    )
    needs_review: bool | None = Field(description="As the prediction's; null until the cell is classified.")
    review_reasons: list[str] = Field(description="As the prediction's; empty until the cell is classified.")
    in_distribution: bool | None = Field(description="As the prediction's: false = not a typical cell.")
    ood_score: float | None = Field(description="As the prediction's: > 1 = not a typical cell.")
    prediction: PredictionOut | None


class BatchItemPage(BaseModel):
    items: list[BatchItemOut]
    total: int
    limit: int
    offset: int


class CaseReportOut(BaseModel):
    sequence: int = Field(description="1: the sign-out; 2, 3, ...: amendments, each kept beside the ones before.")
    kind: Literal["sign_out", "amendment"]
    interpretation: str
    interpretation_label: str
    suggested: str = Field(description="The rule's suggestion when this report was written.")
    comment: str | None
    reason: str | None = Field(description="Why it was amended (amendments only).")
    pathologist: str
    created_at: datetime


class CaseCellOut(BaseModel):
    prediction_id: int
    batch_id: int | None
    batch_item_id: int | None
    file_name: str | None
    predicted_class: str
    abnormal_probability: float
    abnormal_call: Literal["normal", "abnormal"]
    review_reasons: list[str]
    qc_sample: bool
    final_label: str | None
    overridden: bool
    must_review: bool = Field(description="Unreviewed, and called abnormal, flagged needs review or QC-sampled.")


class CaseOut(BaseModel):
    accession_id: str
    status: CaseStatus
    amended: bool
    cells: int
    reviewed: int
    unreviewed: int
    must_review: int = Field(description="Cells a person must review before sign-out.")
    pending: int = Field(description="Batch cells still being classified.")
    failed: int = Field(description="Batch files that could not be classified.")
    batch_ids: list[int]
    counts_by_call: dict[str, int] = Field(description="Cells per model top class.")
    counts_by_cutoff: dict[str, int] = Field(description="Cells per call at the lab's P(abnormal) cut-off.")
    counts_by_final_label: dict[str, int] = Field(description="Cells per final (latest reviewed) label, or unreviewed.")
    qc_sample: dict[str, int] = Field(description="sampled, reviewed, confirmed_normal, found_abnormal.")
    suggested_interpretation: Literal["NILM", "LSIL", "HSIL", "UNSATISFACTORY"]
    suggested_label: str
    suggestion_reasons: list[str]
    referred_by: str | None
    referred_at: datetime | None
    referral_note: str | None
    interpretation: str | None = Field(description="The signed-out (or latest amended) interpretation.")
    reports: list[CaseReportOut]
    most_suspicious: list[CaseCellOut] = Field(description="All cells, highest P(abnormal) first.")
    notice: str = NOTICE


class ReferIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(default=None, max_length=2000)


class SignOutIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    interpretation: str = Field(description="NILM, ASC-US, ASC-H, LSIL, HSIL, SCC, AGC or UNSATISFACTORY.")
    comment: str | None = Field(default=None, max_length=2000)


class AmendIn(SignOutIn):
    reason: str = Field(min_length=1, max_length=2000, description="Why the signed-out report is amended.")
