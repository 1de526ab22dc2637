"""`papcad`: one command-line entry point for the model (train, evaluate, predict) and the server."""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.errors import PapcadError

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
    cv: Annotated[int, typer.Option(help="Run grouped k-fold cross-validation with this k instead.")] = 0,
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
    chosen = RECIPES[recipe]
    overrides = {"epochs": epochs, "normalization": normalization, "weight_decay": weight_decay}
    if image_size or fit_mode:
        overrides["input"] = type(chosen.input)(
            size=image_size or chosen.input.size, fit=fit_mode or chosen.input.fit, canvas=chosen.input.canvas
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
            from app.ml.train import cross_validate

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
) -> None:
    """Re-score a model on its held-out test split; rewrites metrics, plots and the card's numbers."""
    from app.ml.data import discover
    from app.ml.evaluate import evaluate_model_dir

    try:
        card = evaluate_model_dir(model, discover(data))
    except PapcadError as exc:
        fail(str(exc))
    typer.echo(json.dumps(card["metrics"], indent=2))


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
        record: dict = {"file": str(path)}
        try:
            if not path.is_file():
                raise PapcadError("no such file")
            prediction = classifier.predict([path.read_bytes()])[0]
            record.update(
                predicted_class=prediction.predicted_class,
                abnormal_probability=round(prediction.abnormal_probability, 6),
                probabilities={k: round(v, 6) for k, v in prediction.probabilities.items()},
                model_version=prediction.model_version,
            )
        except PapcadError as exc:
            failed = True
            record["error"] = str(exc)
            typer.secho(f"error: {path}: {exc}", fg=typer.colors.RED, err=True)
        typer.echo(json.dumps(record))
    if failed:
        raise typer.Exit(code=1)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the web server (migrates the database and loads the model at start-up)."""
    import uvicorn

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
    from app.ml.classifier import Classifier
    from app.services.images import ImageStore
    from app.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    overrides = {"worker_batch_size": batch_size, "worker_lease_seconds": lease_seconds}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    upgrade_to_head(settings.effective_database_url)
    try:
        classifier = Classifier.load(settings.model_dir)
    except PapcadError as exc:
        fail(str(exc))
    sessions = make_session_factory(make_engine(settings.effective_database_url))
    Worker(sessions, classifier, ImageStore(settings.image_dir), settings, name=name).run_forever()


@cli.command()
def migrate() -> None:
    """Bring the configured database to the newest schema."""
    from app.config import get_settings
    from app.db.migrate import upgrade_to_head

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.effective_database_url)
    typer.echo("database is at the newest schema")


user_cli = typer.Typer(help="Manage users (people who sign in).", no_args_is_help=True)
apikey_cli = typer.Typer(help="Manage API keys for LIS clients.", no_args_is_help=True)
cli.add_typer(user_cli, name="user")
cli.add_typer(apikey_cli, name="apikey")


def _admin_session():
    """A session on the migrated database; CLI actions are recorded as done by the system."""
    from app.config import get_settings
    from app.db.migrate import upgrade_to_head
    from app.db.session import make_engine, make_session_factory, session_scope

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.effective_database_url)
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


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
