"""`papcad`: one command-line entry point for the model (train, evaluate, predict) and the server."""

import json
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

from app.errors import PapcadError
from app.ml.site_cells import (
    ADAPT_EPOCHS,
    ADAPT_LEARNING_RATE,
    ADAPT_MAX_STEPS,
    MIN_ACCESSIONS,
    MIN_REVIEWED_CELLS,
)  # light: no TensorFlow

if TYPE_CHECKING:  # the commands import what they need when they run: `papcad --help` stays fast
    from sqlalchemy.orm import Session

    from app.config import Settings
    from app.db.models import ModelVersion
    from app.ml.preprocessing import FitMode

cli = typer.Typer(help="PapCAD: computer-assisted diagnosis for Pap-smear cell images.", no_args_is_help=True)

DataOption = Annotated[Path, typer.Option("--data", help="Folder with one sub-folder of images per class.")]


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@cli.command()
def train(
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Model directory to write, e.g. model_store/<version>.")],
    recipe: Annotated[
        str, typer.Option(help="'default' (from scratch) or 'published' (ImageNet, frozen).")
    ] = "default",
    version: Annotated[str | None, typer.Option(help="Version name; default: the out folder's name.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override the recipe's epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override the input size.")] = None,
    fit_mode: Annotated[str | None, typer.Option("--fit", help="'resize' or 'pad'.")] = None,
    backbone_weights: Annotated[
        str | None, typer.Option(help="'none', 'imagenet' (download), or a path to the Keras ImageNet no-top .h5 file.")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Override the recipe's AdamW weight decay.")] = None,
    normalization: Annotated[
        str | None, typer.Option(help="'caffe' (ResNet50's own) or 'unit' ([-1, 1]; from-scratch only).")
    ] = None,
    augmentation: Annotated[
        str | None,
        typer.Option(
            help="'cell' (flips, turns, mild light), 'robust' (stain, colour, framing, optics), "
            "'robust_windows' (robust, and fixed-size windows of each cell), 'published'."
        ),
    ] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Override the recipe's peak learning rate.")] = None,
    init_from: Annotated[
        Path | None, typer.Option(help="Start from this model directory's weights (same input size and split).")
    ] = None,
    cv: Annotated[
        int,
        typer.Option(
            help="Run grouped k-fold cross-validation with this k instead, on the development cells (the test "
            "split stays out; each fold's network is also scored on it, alone and as an ensemble): every stage "
            "retrained per fold (with --init-from, the starting model's recipe first); a rerun keeps the folds, "
            "stages and epochs already done in --out."
        ),
    ] = 0,
) -> None:
    """Train a model on the grouped split, then evaluate it on its held-out test set."""
    from app.ml.data import discover
    from app.ml.model import BackboneWeights
    from app.ml.recipes import RECIPES

    if recipe not in RECIPES:
        fail(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if fit_mode not in (None, "resize", "pad"):
        fail("--fit must be 'resize' or 'pad'")
    if normalization not in (None, "caffe", "unit"):
        fail("--normalization must be 'caffe' or 'unit'")
    if augmentation not in (None, "cell", "robust", "robust_windows", "published"):
        fail("--augmentation must be 'cell', 'robust', 'robust_windows' or 'published'")
    if init_from is not None and not (init_from / "model_card.json").is_file():
        fail(f"--init-from {init_from} is not a model directory (no model_card.json)")
    chosen = RECIPES[recipe]
    overrides: dict[str, Any] = {
        "epochs": epochs,
        "normalization": normalization,
        "weight_decay": weight_decay,
        "augmentation": augmentation,
        "learning_rate": learning_rate,
        "init_from": str(init_from) if init_from else None,
    }
    if image_size or fit_mode:
        overrides["input"] = type(chosen.input)(
            size=image_size or chosen.input.size,
            fit=cast("FitMode", fit_mode or chosen.input.fit),
            canvas=chosen.input.canvas,
        )
    if backbone_weights:
        if backbone_weights in ("none", "imagenet"):
            overrides["backbone"] = BackboneWeights(source=backbone_weights)
        else:
            overrides["backbone"] = BackboneWeights(source="file", path=Path(backbone_weights))
    chosen = chosen.with_overrides(**overrides)
    if chosen.normalization != "caffe" and chosen.backbone.source != "none":
        fail("ImageNet backbone weights need --normalization caffe")
    try:
        dataset = discover(data)
        if cv:
            from app.ml.cross_validation import cross_validate

            result = cross_validate(dataset, chosen, cv, out)
            typer.echo(json.dumps(result["summary"], indent=2))
        else:
            from app.ml.train import train as run_training

            card = run_training(dataset, chosen, out, version or out.name)
            typer.echo(json.dumps(card["metrics"], indent=2))
    except PapcadError as exc:
        fail(str(exc))


@cli.command()
def evaluate(
    model: Annotated[Path, typer.Option(help="Model directory (with model_card.json).")],
    data: DataOption,
    cutoff_under_shifts: Annotated[
        bool | None,
        typer.Option(
            "--cutoff-under-shifts/--cutoff-unshifted",
            help="Choose the abnormal cut-off on the validation cells pooled with the same cells under every shift "
            "of the robustness suite, or on them as they are. Default: the basis the card records.",
        ),
    ] = None,
) -> None:
    """Re-score a model on its held-out test split; rewrites metrics, plots and the card's numbers."""
    from app.ml.data import discover
    from app.ml.evaluate import evaluate_model_dir

    try:
        card = evaluate_model_dir(model, discover(data), cutoff_under_shifts)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(json.dumps(card["metrics"], indent=2))


@cli.command()
def robustness(
    model: Annotated[Path, typer.Option(help="Model directory (with model_card.json).")],
    data: DataOption,
    split: Annotated[str, typer.Option(help="'test' or 'validation' (of the card's grouped split).")] = "test",
    out: Annotated[Path | None, typer.Option(help="JSON file to write; default: <model>/robustness.json.")] = None,
) -> None:
    """Score the grouped split under named image shifts (stain, colour, blur, noise, JPEG, scale, framing).

    Writes the JSON and robustness.png; for the test split, also the card's "robustness" section.
    """
    from app.ml.data import discover
    from app.ml.robustness import SPLITS, markdown_table, robustness_model_dir

    if split not in SPLITS:
        fail(f"--split must be one of: {', '.join(SPLITS)}")
    try:
        result = robustness_model_dir(model, discover(data), split, out)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(markdown_table(result["shifts"]))


@cli.command("record-cv")
def record_cv(
    model: Annotated[Path, typer.Option(help="Model directory (with model_card.json).")],
    cv: Annotated[Path, typer.Option(help="Output folder of a finished papcad train --cv of that model's recipe.")],
) -> None:
    """Write a finished cross-validation of the model's recipe and data into its card ("cross_validation")."""
    from app.ml.cross_validation import record_in_card

    try:
        section = record_in_card(model, cv)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(json.dumps(section["held_out_folds"], indent=2))


@cli.command("fit-ood")
def fit_ood(
    model: Annotated[Path, typer.Option(help="Model directory (with model_card.json).")],
    data: DataOption,
) -> None:
    """Fit the "not a typical cell" score on the training split, set its cut-off on validation, and
    measure it against non-cell images; writes ood.npz and the card's "ood" section."""
    from app.ml.data import discover
    from app.ml.ood_fit import fit_ood_model_dir

    try:
        section = fit_ood_model_dir(model, discover(data))
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(json.dumps(section["evaluation"], indent=2))


@cli.command("export")
def export(
    model: Annotated[Path, typer.Option(help="Model directory (with model_card.json).")],
    data: DataOption,
) -> None:
    """Write the model's int8 network for LiteRT (serving without TensorFlow), check it against the Keras
    network on the card's test split, and record both in the card's "serving" section; `auto` precision
    serves int8 only if it loses at most 0.5 points of 7-class accuracy and of sensitivity at the cut-off.
    Where it loses more, the network with float16 weights is written and checked too, and `auto` serves that
    when it passes."""
    from app.ml.data import discover
    from app.ml.export import export_model_dir

    try:
        section = export_model_dir(model, discover(data))
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(json.dumps(section, indent=2))


@cli.command(
    help="Fine-tune a model on this laboratory's reviewed cells (final label = the latest review) and write a "
    "new model directory with its card: site metrics before/after on held-out accessions and, with --base-data, "
    "the base data's test metrics before/after. With --base-data the new model routes each cell: the site's own "
    "network for cells like the site's, the unchanged general model for the others. "
    "Reads DATABASE_URL and PAPCAD_DATA_DIR as `papcad serve` does. "
    f"Needs at least {MIN_REVIEWED_CELLS} reviewed cells from at least {MIN_ACCESSIONS} accessions; with fewer it "
    "refuses and writes nothing. "
    "Prints the new directory; register it with `papcad model register`."
)
def adapt(
    base: Annotated[Path, typer.Option(help="Model directory to start from, e.g. the shipped model.")],
    out: Annotated[Path, typer.Option(help="New model directory to write (must not exist, or be empty).")],
    base_data: Annotated[
        Path | None,
        typer.Option(
            help="The base model's training folder (e.g. Herlev): the routing gate learns to tell the site's cells "
            "from its images, and its test split is the forgetting check."
        ),
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(
            min=1,
            max=100,
            help=f"Passes over the site's training cells (the best on the site's validation cells is kept). At "
            f"most {ADAPT_MAX_STEPS} steps in "
            "all: on a large site each pass covers a random part of it, so the time stays bounded.",
        ),
    ] = ADAPT_EPOCHS,
    learning_rate: Annotated[
        float, typer.Option(min=1e-7, max=1e-2, help="Peak Adam learning rate (one epoch warm-up, cosine decay).")
    ] = ADAPT_LEARNING_RATE,
    since: Annotated[
        str | None, typer.Option(help="Only cells whose final review is on or after DATE (YYYY-MM-DD).")
    ] = None,
    version: Annotated[str | None, typer.Option(help="Version name; default: the out folder's name.")] = None,
) -> None:
    from datetime import UTC, datetime

    from app.ml.adapt import adapt as run_adaptation
    from app.ml.finetune import AdaptConfig
    from app.ml.site_cells import check_enough
    from app.services.actors import SYSTEM
    from app.services.images import ImageStore
    from app.services.site_data import load_site_cells

    start = None
    if since is not None:
        try:
            start = datetime.fromisoformat(since).replace(tzinfo=UTC)
        except ValueError:
            fail("--since must be a date, YYYY-MM-DD")
    try:
        with _admin_session() as session:
            cells = load_site_cells(session, ImageStore(), SYSTEM, start)
        check_enough(cells)
        typer.echo(f"{len(cells)} reviewed cells from {len({c.group for c in cells})} accessions", err=True)
        card = run_adaptation(
            cells, base, out, base_data, AdaptConfig(epochs=epochs, learning_rate=learning_rate), version, since
        )
    except PapcadError as exc:
        fail(str(exc))
    summary = card["adaptation"]
    typer.echo(
        json.dumps({"site": summary["site_metrics"], "base_test": summary["base_test_metrics"]}, indent=2), err=True
    )
    typer.echo(str(out))


@cli.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    model: Annotated[Path | None, typer.Option(help="Model directory; default: the configured model.")] = None,
) -> None:
    """Classify image files; prints one JSON line per file. Exit code 1 if any file failed."""
    from tqdm import tqdm

    from app.config import get_settings
    from app.ml.classifier import Classifier

    try:
        classifier = Classifier.load(model or get_settings().model_dir)
    except PapcadError as exc:
        fail(str(exc))
    failed = False
    for path in tqdm(images, desc="classifying", unit="img", file=sys.stderr, disable=len(images) < 10):
        record: dict[str, Any] = {"file": str(path)}
        try:
            if not path.is_file():
                raise PapcadError("no such file")
            prediction = classifier.predict([path.read_bytes()])[0]
            record.update(
                predicted_class=prediction.predicted_class,
                abnormal_probability=round(prediction.abnormal_probability, 6),
                probabilities={k: round(v, 6) for k, v in prediction.probabilities.items()},
                model_version=prediction.model_version,
                in_distribution=prediction.in_distribution,
                ood_score=None if prediction.ood_score is None else round(prediction.ood_score, 4),
                input_flags=prediction.input_flags,
            )
        except PapcadError as exc:
            failed = True
            record["error"] = str(exc)
            typer.secho(f"error: {path}: {exc}", fg=typer.colors.RED, err=True)
        typer.echo(json.dumps(record))
    if failed:
        raise typer.Exit(code=1)


def _wait_for_database(settings: "Settings") -> None:
    """Retry an unreachable database for PAPCAD_DB_STARTUP_TIMEOUT_SECONDS, then exit with one line."""
    from app.db.startup import DatabaseUnavailableError, wait_for_database

    try:
        wait_for_database(settings.effective_database_url, settings.db_startup_timeout_seconds)
    except DatabaseUnavailableError as exc:
        fail(str(exc))


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the web server (migrates the database and loads the model at start-up)."""
    import uvicorn

    from app.config import get_settings

    _wait_for_database(get_settings())
    from app.main import create_app

    uvicorn.run(create_app(), host=host, port=port, proxy_headers=True)


@cli.command()
def worker(
    name: Annotated[str | None, typer.Option(help="Worker name in logs and leases; default host:pid.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Items claimed and classified per round.")] = None,
    lease_seconds: Annotated[int | None, typer.Option(help="Seconds before another worker may take over.")] = None,
) -> None:
    """Classify queued batch items until stopped (run any number, on any number of machines)."""
    import logging

    from app.config import get_settings
    from app.db.migrate import upgrade_to_head
    from app.db.session import make_engine, make_session_factory
    from app.services.images import ImageStore
    from app.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    overrides = {"worker_batch_size": batch_size, "worker_lease_seconds": lease_seconds}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    _wait_for_database(settings)
    upgrade_to_head(settings.effective_database_url, settings.migration_database_url)
    from app.services.registry import start_models

    url = settings.effective_database_url
    engine = make_engine(url, settings.pool_size, settings.max_overflow, settings.pool_timeout)
    sessions = make_session_factory(engine)
    try:  # the registry's active model, followed while running (promotion needs no restart)
        models = start_models(sessions, settings)
    except PapcadError as exc:
        fail(str(exc))
    Worker(sessions, models, ImageStore(), settings, name=name).run_forever()


@cli.command()
def migrate() -> None:
    """Bring the configured database to the newest schema."""
    from app.config import get_settings
    from app.db.migrate import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _wait_for_database(settings)
    try:
        upgrade_to_head(settings.effective_database_url, settings.migration_database_url)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo("database is at the newest schema")


user_cli = typer.Typer(help="Manage users (people who sign in).", no_args_is_help=True)
apikey_cli = typer.Typer(help="Manage API keys for LIS clients.", no_args_is_help=True)
cli.add_typer(user_cli, name="user")
cli.add_typer(apikey_cli, name="apikey")


def _admin_session() -> AbstractContextManager["Session"]:
    """A session on the migrated database; CLI actions are recorded as done by the system."""
    from app.config import get_settings
    from app.db.migrate import upgrade_to_head
    from app.db.session import make_engine, make_session_factory, session_scope

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.effective_database_url, settings.migration_database_url)
    return session_scope(make_session_factory(make_engine(settings.effective_database_url)))


@user_cli.command("create")
def user_create(
    username: Annotated[str, typer.Option(help="Login name.")],
    role: Annotated[str, typer.Option(help="admin, pathologist or cytotechnologist.")],
) -> None:
    """Create a user. The password is read from standard input (or prompted for twice)."""
    from app.services import accounts
    from app.services.actors import SYSTEM

    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\n")
    try:
        with _admin_session() as session:
            user = accounts.create_user(session, SYSTEM, username, password, role)
            typer.echo(f"created user {user.username} ({user.role})")
    except PapcadError as exc:
        fail(str(exc))


@user_cli.command("deactivate")
def user_deactivate(username: Annotated[str, typer.Option(help="Login name.")]) -> None:
    """Stop a user from signing in (their open sessions end at the next request)."""
    from app.services import accounts
    from app.services.actors import SYSTEM

    try:
        with _admin_session() as session:
            accounts.set_user_active(session, SYSTEM, username, False)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(f"deactivated user {username}")


@apikey_cli.command("create")
def apikey_create(name: Annotated[str, typer.Option(help="Name of the client, e.g. the LIS.")]) -> None:
    """Create an API key and print it once; only its hash is stored."""
    from app.services import accounts
    from app.services.actors import SYSTEM

    try:
        with _admin_session() as session:
            _, key = accounts.create_api_client(session, SYSTEM, name)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(key)
    typer.secho("Store this key now: it cannot be shown again.", err=True)


@apikey_cli.command("revoke")
def apikey_revoke(name: Annotated[str, typer.Option(help="Name of the client.")]) -> None:
    """Revoke a client's key: it stops working at once."""
    from app.services import accounts
    from app.services.actors import SYSTEM

    try:
        with _admin_session() as session:
            accounts.revoke_api_client(session, SYSTEM, name)
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(f"revoked API key {name}")


model_cli = typer.Typer(
    help="The model registry: which model versions the server knows and which one serves.", no_args_is_help=True
)
cli.add_typer(model_cli, name="model")


def _print_versions(rows: list["ModelVersion"]) -> None:
    for row in rows:
        metrics = (row.card or {}).get("metrics") or {}
        accuracy = metrics.get("binary_accuracy")
        shown = f"binary {accuracy:.1%} on {metrics.get('split', 'test')}" if accuracy is not None else ""
        typer.echo(
            f"{row.status:9} {row.version:40} {row.weights_sha256[:12]}  {row.changed_by:24} "
            f"{row.changed_at:%Y-%m-%d %H:%M}  {shown}"
        )


@model_cli.command("list")
def model_list() -> None:
    """Registered versions: status, version, weights, who changed it last and when, headline metric."""
    from app.services import registry

    with _admin_session() as session:
        _print_versions(registry.list_versions(session))


@model_cli.command("register")
def model_register(
    directory: Annotated[Path, typer.Argument(help="Model directory (its weights are checked against its card).")],
    promote: Annotated[bool, typer.Option(help="Make it the active model at once.")] = False,
) -> None:
    """Register a model directory as a candidate (scored silently in shadow mode until promoted)."""
    from app.services import registry
    from app.services.actors import SYSTEM

    try:
        with _admin_session() as session:
            row = registry.register(session, SYSTEM, directory)
            if promote:
                registry.promote(session, SYSTEM, row.version)
            typer.echo(f"{row.version}: {row.status}")
    except PapcadError as exc:
        fail(str(exc))


@model_cli.command("promote")
def model_promote(version: Annotated[str, typer.Argument(help="A registered version.")]) -> None:
    """Make a registered version the active model; running servers and workers switch within seconds."""
    from app.services import registry
    from app.services.actors import SYSTEM

    try:
        with _admin_session() as session:
            row = registry.promote(session, SYSTEM, version)
            typer.echo(f"{row.version} is now the active model")
    except PapcadError as exc:
        fail(str(exc))


@model_cli.command("rollback")
def model_rollback(
    to: Annotated[str | None, typer.Option(help="Version to go back to; default: the one active before.")] = None,
) -> None:
    """Go back to the previously active model in one step (the current one retires)."""
    from app.services import registry
    from app.services.actors import SYSTEM

    try:
        with _admin_session() as session:
            row = registry.rollback(session, SYSTEM, to)
            typer.echo(f"{row.version} is now the active model")
    except PapcadError as exc:
        fail(str(exc))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
