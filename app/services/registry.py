"""The model registry: which model versions the server knows, which one serves, who changed it.

Statuses: candidate (registered; scored silently in shadow mode), active (makes the calls reviewers
see; exactly one), retired. Promotion and rollback are audited and need no restart: every serving
process holds a `LiveModels`, which looks at the registry table every few seconds (one small query)
and loads the newly active model; it keeps at most the active model and one candidate in memory.

At start-up (`ensure_startup`): an empty registry gets PAPCAD_MODEL_DIR as its active version. A
PAPCAD_MODEL_DIR set explicitly to a model whose weights the registry has never seen is registered and
made active (so `PAPCAD_MODEL_DIR=<adapted model> papcad serve` serves it). A known model is left as
the registry says: a restart does not undo a promotion or a rollback.

What a prediction is read with follows the model that made it, not the model the process started with: its
call, needs-review reasons and cut-off (`LiveModels.policy`: each registered version's own cut-off), and its
Grad-CAM heatmap (`LiveModels.model_for`: the held model with its weights, or a retired version loaded on
demand from its registered directory, one at a time).
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import ModelVersion, utcnow
from app.domain import ModelStatus
from app.errors import ConflictError, ModelIntegrityError, NotFoundError, PapcadError, PermissionDeniedError
from app.ml.artifact import read_card, verified_weights_path
from app.ml.classifier import Classifier
from app.services import audit
from app.services.actors import Actor
from app.services.calls import CallPolicy

log = logging.getLogger("papcad.registry")

CANDIDATE, ACTIVE, RETIRED = ModelStatus.CANDIDATE, ModelStatus.ACTIVE, ModelStatus.RETIRED
# The card's sections shown on the admin page (the whole card stays in the model directory).
CARD_KEYS = (
    "version",
    "created_at",
    "metrics",
    "abnormal_threshold",
    "calibration",
    "adaptation",
    "data",
    "routing",
    "cross_validation",
)


def _check_admin(actor: Actor) -> None:
    if actor.kind == "user" and not actor.is_admin:
        raise PermissionDeniedError("only administrators may change the model registry")
    if actor.kind == "apikey":
        raise PermissionDeniedError("API clients may not change the model registry")


def _verified_card(directory: Path) -> dict[str, Any]:
    """The card of a loadable-looking model directory (card readable, weights match its SHA-256)."""
    card = read_card(directory)
    for key in ("version", "weights_sha256", "class_names", "input"):
        if key not in card:
            raise ModelIntegrityError(f"the model card in {directory} lacks {key!r}")
    verified_weights_path(directory, card)
    return card


def card_cutoff(card: dict[str, Any]) -> float:
    """A model card's P(abnormal) cut-off, as `Classifier` reads it (0.5 when the card has none)."""
    return float((card.get("abnormal_threshold") or {}).get("value", 0.5))


def _snapshot(card: dict[str, Any]) -> dict[str, Any]:
    snapshot = {k: card[k] for k in CARD_KEYS if k in card}
    if "adaptation" in snapshot:  # the per-epoch history is not for the admin page
        snapshot["adaptation"] = {k: v for k, v in snapshot["adaptation"].items() if k != "history"}
    return snapshot


def list_versions(session: Session) -> list[ModelVersion]:
    order: dict[str, int] = {ACTIVE: 0, CANDIDATE: 1, RETIRED: 2}
    rows = list(session.scalars(select(ModelVersion).order_by(ModelVersion.registered_at.desc(), ModelVersion.id)))
    return sorted(rows, key=lambda r: order.get(r.status, 3))


def active_version(session: Session) -> ModelVersion | None:
    return session.scalar(select(ModelVersion).where(ModelVersion.status == ACTIVE))


def _by_version(session: Session, version: str) -> ModelVersion:
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise NotFoundError(f"model version {version!r} is not registered")
    return row


def _register(session: Session, actor: Actor, directory: Path, status: str) -> ModelVersion:
    directory = Path(directory).resolve()
    card = _verified_card(directory)
    existing = session.scalar(select(ModelVersion).where(ModelVersion.version == card["version"]))
    if existing is not None:
        if existing.weights_sha256 != card["weights_sha256"]:
            raise ConflictError(
                f"version {card['version']!r} is registered with other weights; give the new model another version"
            )
        return existing
    twin = session.scalar(select(ModelVersion).where(ModelVersion.weights_sha256 == card["weights_sha256"]))
    if twin is not None:
        raise ConflictError(f"these weights are already registered as version {twin.version!r}")
    now = utcnow()
    row = ModelVersion(
        version=card["version"],
        directory=str(directory),
        weights_sha256=card["weights_sha256"],
        status=status,
        card=_snapshot(card),
        registered_at=now,
        activated_at=now if status == ACTIVE else None,
        changed_by=actor.label,
        changed_at=now,
    )
    session.add(row)
    session.flush()
    audit.record(
        session, actor, "model.register", "model_version", row.version,
        directory=row.directory, weights_sha256=row.weights_sha256, status=status,
    )  # fmt: skip
    return row


def register(session: Session, actor: Actor, directory: Path) -> ModelVersion:
    """Register a model directory as a candidate (its weights checked against its card); idempotent."""
    _check_admin(actor)
    row = _register(session, actor, directory, CANDIDATE)
    session.commit()
    return row


def _activate(session: Session, actor: Actor, row: ModelVersion, action: str, **detail: Any) -> ModelVersion:
    """Make `row` the one active version (the previous one retires), in the caller's transaction."""
    previous = active_version(session)
    if previous is not None and previous.id == row.id:
        raise ConflictError(f"{row.version} is already the active model")
    now = utcnow()
    if previous is not None:
        # Guarded: of two simultaneous promotions, only one finds the old active row still active.
        # An UPDATE statement's result is a CursorResult (the one that counts rows); Session.execute is typed wider.
        done = cast(
            "CursorResult[Any]",
            session.execute(
                update(ModelVersion)
                .where(ModelVersion.id == previous.id, ModelVersion.status == ACTIVE)
                .values(status=RETIRED, changed_by=actor.label, changed_at=now)
                .execution_options(synchronize_session=False)
            ),
        )
        if done.rowcount != 1:
            raise ConflictError("the active model changed meanwhile; reload and retry")
    row.status, row.activated_at, row.changed_by, row.changed_at = ACTIVE, now, actor.label, now
    session.flush()
    audit.record(
        session, actor, action, "model_version", row.version,
        previous=previous.version if previous else None, weights_sha256=row.weights_sha256, **detail,
    )  # fmt: skip
    return row


def promote(session: Session, actor: Actor, version: str) -> ModelVersion:
    """Make a registered version the active model; the active one retires. Serving processes switch
    within `LiveModels.poll_seconds`."""
    _check_admin(actor)
    row = _by_version(session, version)
    _verified_card(Path(row.directory))  # refuse a version whose files have gone or changed
    _activate(session, actor, row, "model.promote")
    session.commit()
    return row


def rollback(session: Session, actor: Actor, to: str | None = None) -> ModelVersion:
    """Back to the version that was active before the current one (or to `to`); the current one retires."""
    _check_admin(actor)
    current = active_version(session)
    target: ModelVersion | None
    if to is not None:
        target = _by_version(session, to)
    else:
        query = (
            select(ModelVersion)
            .where(ModelVersion.activated_at.is_not(None), ModelVersion.status != ACTIVE)
            .order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc())
            .limit(1)
        )
        target = session.scalar(query)
        if target is None:
            raise ConflictError("no earlier active version to roll back to")
    _verified_card(Path(target.directory))
    _activate(session, actor, target, "model.rollback", rolled_back=current.version if current else None)
    session.commit()
    return target


def ensure_startup(session: Session, actor: Actor, model_dir: Path, explicit: bool) -> ModelVersion:
    """The active version after applying the start-up rule (module docstring); commits."""
    active = active_version(session)
    if active is None:
        known = _register(session, actor, model_dir, CANDIDATE)
        active = _activate(session, actor, known, "model.promote", reason="no active model at start-up")
    elif explicit:
        card = _verified_card(Path(model_dir))
        seen = session.scalar(select(ModelVersion).where(ModelVersion.weights_sha256 == card["weights_sha256"]))
        if seen is None:
            new = _register(session, actor, model_dir, CANDIDATE)
            active = _activate(session, actor, new, "model.promote", reason="PAPCAD_MODEL_DIR at start-up")
        elif seen.status != ACTIVE:
            log.warning(
                "PAPCAD_MODEL_DIR names %s, which the registry holds as %s; serving the active %s "
                "(promote it with `papcad model promote`)",
                seen.version, seen.status, active.version,
            )  # fmt: skip
    session.commit()
    return active


def weights_sha256_for(model: Any, result: Any) -> str:
    """The SHA-256 of the weights that made `result` (a Classifier prediction), whatever model object made it."""
    lookup = getattr(model, "weights_sha256_of", None)  # a routed model's calls come from two networks
    sha: str = lookup(result.model_version) if lookup is not None else model.weights_sha256
    return sha


def after_stored(model: Any, prediction_id: int, image: Any) -> None:
    """A prediction was stored: let a candidate model score the same cell in shadow (never blocks)."""
    if isinstance(model, LiveModels):
        model.shadow_score(prediction_id, image)


class LiveModels:
    """The active model (and at most one candidate) of this process, following the registry table.

    Used wherever a Classifier is: `predict(images)` runs the active model of the moment. The registry is
    read at most every `poll_seconds`, on the caller's thread, by one caller at a time; the others go on
    with the model they have. A failed read or load keeps the current model and is logged.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        active: Classifier,
        poll_seconds: float = 5.0,
        loader: Callable[[Path], Classifier] = Classifier.load,
        shadow_queue: int = 256,
    ):
        from app.services.shadow import ShadowScorer

        self.sessions = sessions
        self.poll_seconds = poll_seconds
        self.loader = loader
        self._active = active
        self._candidate: Classifier | None = None
        self._retired: Classifier | None = None  # loaded on demand for a heatmap of one of its predictions
        self._shas: dict[str, str] = {part.version: part.weights_sha256 for part in active.parts}
        self._cutoffs: dict[str, float] = {part.version: part.abnormal_threshold for part in active.parts}
        self._checked = time.monotonic()
        self._refreshing = threading.Lock()
        self._loading = threading.Lock()
        with sessions() as session:  # so the predictions of earlier versions read right from the first request
            self._read_cutoffs(session)
        self.shadow = ShadowScorer(sessions, self.candidate, maxsize=shadow_queue)

    # --- what serving code asks --------------------------------------------------------------------------------

    def active(self) -> Classifier:
        if time.monotonic() - self._checked >= self.poll_seconds:
            self.refresh()
        return self._active

    def held(self) -> Classifier:
        """The active model as last followed, without looking at the registry (for the event loop: no I/O)."""
        return self._active

    def candidate(self) -> Classifier | None:
        self.active()
        return self._candidate

    def predict(self, images: Sequence[Any]) -> list[Any]:
        return self.active().predict(images)

    def weights_sha256_of(self, version: str) -> str:
        return self._shas[version]

    def policy(self, uncertainty_band: float, fixed_cutoff: float | None = None) -> CallPolicy:
        """The call policy of the moment: the active model's cut-off, and each registered version's own for
        the predictions it made; a lab's fixed cut-off instead holds for every version. No I/O (it is read on
        the event loop too): it follows the registry as this process last read it (`refresh`)."""
        if fixed_cutoff is not None:
            return CallPolicy(fixed_cutoff, uncertainty_band)
        active = self._active
        cutoffs = {**self._cutoffs, **{part.version: part.abnormal_threshold for part in active.parts}}
        return CallPolicy(active.abnormal_threshold, uncertainty_band, cutoffs)

    def model_for(self, weights_sha256: str) -> Classifier:
        """The model with these weights, to explain one of its predictions: the active model, the candidate,
        or a retired version loaded from its registered directory (weights checked; at most one such model is
        held). ConflictError when no registered version has these weights or its files are gone or changed."""
        for held in (self.active(), self._candidate, self._retired):
            for part in held.parts if held is not None else []:  # a routed model's general model made some calls
                if part.weights_sha256 == weights_sha256:
                    return part
        with self._loading:
            if self._retired is not None and self._retired.weights_sha256 == weights_sha256:
                return self._retired
            with self.sessions() as session:
                row = session.scalar(select(ModelVersion).where(ModelVersion.weights_sha256 == weights_sha256))
                found = None if row is None else (row.version, Path(row.directory))
            if found is None:
                raise ConflictError("the model that made this prediction is not in this server's model registry")
            version, directory = found
            try:
                model = self.loader(directory)
            except (PapcadError, OSError) as exc:
                log.warning("model %s cannot be loaded from %s: %s", version, directory, exc)
                raise ConflictError(
                    f"model {version}, which made this prediction, can no longer be loaded on this server "
                    "(its registered files are missing or changed)"
                ) from exc
            if model.weights_sha256 != weights_sha256:
                raise ConflictError(f"model {version}'s registered directory no longer holds the weights it ran with")
            self._retired = model
            log.info("loaded retired model %s from %s to explain its predictions", version, directory)
            return model

    def shadow_score(self, prediction_id: int, image: Any) -> None:
        if self._candidate is not None:
            self.shadow.submit(prediction_id, image)

    def __getattr__(self, name: str) -> Any:
        """Everything else (version, card, spec, abnormal_threshold, ...) is the active model's."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.active(), name)

    def stop(self) -> None:
        self.shadow.stop()

    # --- following the registry --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Load the registry's active model and newest candidate if they are not the ones held."""
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            self._checked = time.monotonic()
            with self.sessions() as session:
                rows = list(session.scalars(select(ModelVersion).where(ModelVersion.status.in_((ACTIVE, CANDIDATE)))))
                targets = {
                    row.status: (row.version, row.weights_sha256, row.directory)
                    for row in sorted(rows, key=lambda r: r.registered_at)  # the newest candidate wins
                }
                self._read_cutoffs(session)
            self._active = self._follow(targets.get(ACTIVE), self._active) or self._active
            self._candidate = self._follow(targets.get(CANDIDATE), self._candidate)
        except Exception:  # noqa: BLE001 - keep serving with the model held
            log.exception("could not follow the model registry; keeping %s", self._active.version)
        finally:
            self._refreshing.release()

    def _read_cutoffs(self, session: Session) -> None:
        """Add the cut-off of every registered version not yet known (a version's card never changes)."""
        unseen = session.scalars(select(ModelVersion).where(ModelVersion.version.not_in(set(self._cutoffs))))
        self._cutoffs = {**self._cutoffs, **{row.version: card_cutoff(row.card or {}) for row in unseen}}

    def _follow(self, target: tuple[str, str, str] | None, held: Classifier | None) -> Classifier | None:
        if target is None:
            return None
        version, sha, directory = target
        if held is not None and held.weights_sha256 == sha:
            return held
        for loaded in (self._active, self._candidate, self._retired):  # a promoted candidate is already in memory
            if loaded is not None and loaded.weights_sha256 == sha:
                return loaded
        model = self.loader(Path(directory))
        if model.weights_sha256 != sha:
            raise ModelIntegrityError(f"{directory} no longer holds the registered weights of {version}")
        self._shas.update({part.version: part.weights_sha256 for part in model.parts})
        self._cutoffs = {**self._cutoffs, **{part.version: part.abnormal_threshold for part in model.parts}}
        log.info("loaded model %s from %s", version, directory)
        return model


def start_models(sessions: sessionmaker[Session], settings: Any, classifier: Classifier | None = None) -> LiveModels:
    """This process's LiveModels after the start-up rule; `classifier` (already loaded) counts as an explicit
    PAPCAD_MODEL_DIR and is used as it is when it is the active model."""
    from app.services.actors import SYSTEM

    explicit = classifier is not None or "model_dir" in settings.model_fields_set
    model_dir = classifier.model_dir if classifier is not None else settings.model_dir
    for attempt in range(3):  # servers starting together: one registers, the others read its row
        try:
            with sessions() as session:
                row = ensure_startup(session, SYSTEM, model_dir, explicit)
                directory, sha = Path(row.directory), row.weights_sha256
            break
        except IntegrityError:
            if attempt == 2:
                raise
    if classifier is None or classifier.weights_sha256 != sha:
        classifier = Classifier.load(directory)
        if classifier.weights_sha256 != sha:
            raise ModelIntegrityError(f"{directory} no longer holds the registered weights of the active model")
    return LiveModels(sessions, classifier, settings.registry_poll_seconds)
