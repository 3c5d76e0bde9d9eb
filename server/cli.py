"""The ``popcontrol`` command line: the composition root. Heavy imports stay inside commands."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from server.config import Settings

app = typer.Typer(
    help="popcontrol: closed-loop neural population control.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database administration.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Migrate the database (POPCONTROL_DATABASE_URL, default ./var/popcontrol.db) to REVISION."""
    from server.config import get_settings
    from server.db.session import upgrade

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"database at {revision}: {url.split('@')[-1]}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Migrate the database down to REVISION (`base` removes every table)."""
    from server.config import get_settings
    from server.db.session import downgrade

    downgrade(get_settings().resolved_database_url, revision)
    typer.echo(f"database at {revision}")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="operator, rig, worker or viewer")],
    rig: Annotated[str | None, typer.Option(help="the rig a rig token belongs to")] = None,
    name: Annotated[str, typer.Option(help="who or what uses the token")] = "",
) -> None:
    """Create an API token. It is printed once, as the last word of the output."""
    from server.auth.tokens import create_token
    from server.config import get_settings
    from server.db.session import check_schema, engine_for, make_sessionmaker, transaction
    from server.errors import PopcontrolError

    engine = engine_for(get_settings())
    try:
        check_schema(engine)
        with transaction(make_sessionmaker(engine)) as db:
            token = create_token(db, role, rig, name)
    except PopcontrolError as exc:
        _fail(exc.detail)
    typer.echo(f"created {role} token (store it now, it is not shown again): {token}")


def _with_server_keys(settings: Settings) -> Settings:
    """Settings with the server's CURVE key pair, made once under DATA_DIR/keys when unset."""
    import zmq.auth

    keys_dir = settings.data_dir / "keys"
    secret_file = keys_dir / "server.key_secret"
    if not secret_file.is_file():
        keys_dir.mkdir(parents=True, exist_ok=True)
        zmq.auth.create_certificates(keys_dir, "server")
        secret_file.chmod(0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None, f"{secret_file} holds no secret key"
    typer.echo(
        f"rig ingest: CurveZMQ server key from {secret_file}; rigs connect with the server "
        f"public key {public.decode()}",
        err=True,
    )
    return settings.model_copy(
        update={"curve_public_key": public.decode(), "curve_secret_key": secret.decode()}
    )


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="address to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
    no_ingest: Annotated[
        bool, typer.Option("--no-ingest", help="do not run the ZeroMQ ingest")
    ] = False,
) -> None:
    """Run the REST API, the dashboard and (unless --no-ingest) the rig ingest endpoint."""
    import uvicorn

    from server.app import create_app
    from server.config import get_settings
    from server.db.session import check_schema, engine_for
    from server.errors import DatabaseNotReady

    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    engine = engine_for(settings)
    try:
        check_schema(engine)
    except DatabaseNotReady as exc:
        _fail(exc.detail)
    finally:
        engine.dispose()
    run_ingest = not no_ingest and settings.ingest_enabled
    no_keys = not (settings.curve_public_key or settings.curve_secret_key)
    if run_ingest and no_keys and not settings.ingest_insecure:
        settings = _with_server_keys(settings)
    application = create_app(settings, ingest=run_ingest)
    uvicorn.run(
        application, host=host or settings.host, port=port or settings.port, log_level="info"
    )


@app.command("worker")
def worker(
    device: Annotated[
        str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N")
    ] = "auto",
    kinds: Annotated[
        str | None, typer.Option(help="comma-separated job kinds to run (default: all)")
    ] = None,
    lease_s: Annotated[
        float | None, typer.Option("--lease-s", help="job lease in seconds (default: settings)")
    ] = None,
    poll_s: Annotated[float, typer.Option("--poll-s", help="idle poll interval in seconds")] = 1.0,
    max_jobs: Annotated[int | None, typer.Option(help="stop after this many jobs")] = None,
    exit_when_idle: Annotated[
        bool, typer.Option("--exit-when-idle", help="stop when no job is claimable")
    ] = False,
) -> None:
    """Claim and run jobs (fit, synthesize, evaluate) from the database queue."""
    from server.config import get_settings
    from server.errors import PopcontrolError
    from server.worker import worker_command

    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        worker_command(
            settings,
            device=device,
            kinds=[k.strip() for k in kinds.split(",") if k.strip()] if kinds else None,
            lease_s=lease_s,
            poll_s=poll_s,
            max_jobs=max_jobs,
            exit_when_idle=exit_when_idle,
        )
    except PopcontrolError as exc:
        _fail(exc.detail)
    except ValueError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("worker stopped", err=True)


@app.command("ingest")
def ingest(
    bind: Annotated[str | None, typer.Option(help="override POPCONTROL_INGEST_BIND")] = None,
) -> None:
    """Run only the rig ingest (ZeroMQ ROUTER, CurveZMQ) until interrupted."""
    from server.errors import DatabaseNotReady
    from server.ingest import IngestConfigError, ingest_command

    try:
        ingest_command(bind)
    except (IngestConfigError, DatabaseNotReady) as exc:
        _fail(str(getattr(exc, "detail", exc)))


@app.command("demo")
def demo(
    days: Annotated[int, typer.Option(help="simulated recording days")] = 3,
    fast: Annotated[bool, typer.Option("--fast", help="a small experiment (minutes)")] = False,
    out: Annotated[Path, typer.Option("--out", help="folder for report.html, summary.json")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(help="seed of the simulated experiment")] = 0,
) -> None:
    """Run the closed loop for N simulated days end to end; print a table, write a report."""
    from server.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    try:
        run_demo(days, fast, out, seed)
    except ValueError as exc:
        _fail(str(exc))


from rig.cli import rig_command, rig_keygen_command  # noqa: E402  (typer + stdlib only)

app.command("rig")(rig_command)
app.command("rig-keygen")(rig_keygen_command)


def _register_present() -> None:
    from rig.present.cli import present_command  # typer only; PsychoPy loads when it runs

    app.command("present")(present_command)


_register_present()


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="popcontrol")


if __name__ == "__main__":  # pragma: no cover
    main()
