"""``popcontrol rig`` and ``popcontrol rig-keygen``. Heavy imports stay inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def rig_keygen_command(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for the key files")] = Path(
        "var/keys"
    ),
    name: Annotated[str, typer.Option(help="file name stem: NAME.key and NAME.key_secret")] = "rig",
    server: Annotated[
        bool, typer.Option("--server", help="print the pair as the server's settings instead")
    ] = False,
) -> None:
    """Make a CurveZMQ key pair (NAME.key public, NAME.key_secret private, mode 0600)."""
    import os

    import zmq.auth

    out_dir.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = (out_dir / f"{name}.key", out_dir / f"{name}.key_secret")
    for path in (public_file, secret_file):
        if path.exists():
            typer.echo(f"error: {path} exists; remove it or choose another --name", err=True)
            raise typer.Exit(code=2)
    zmq.auth.create_certificates(out_dir, name)
    os.chmod(secret_file, 0o600)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    typer.echo(f"wrote {public_file} and {secret_file}")
    if server:
        typer.echo("server settings (keep the secret one secret):")
        typer.echo(f"POPCONTROL_CURVE_PUBLIC_KEY='{public.decode()}'")
        typer.echo(f"POPCONTROL_CURVE_SECRET_KEY='{secret.decode()}'")
    else:
        typer.echo(
            "register the public key on the server, e.g.\n"
            '  curl -X PATCH -H "Authorization: Bearer $OPERATOR_TOKEN" '
            "-H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"curve_public_key": "{public.decode()}"}}\' '
            "http://SERVER:8000/api/v1/rigs/RIG_NAME"
        )
        typer.echo(f"public key: {public.decode()}")


def load_key_pair(secret_file: Path) -> tuple[str, str]:
    """(public, secret) Z85 from a NAME.key_secret file written by rig-keygen."""
    import zmq.auth

    if not secret_file.is_file():
        raise FileNotFoundError(
            f"no key file at {secret_file}; make one with `popcontrol rig-keygen --out "
            f"{secret_file.parent} --name {secret_file.name.removesuffix('.key_secret')}`"
        )
    public, secret = zmq.auth.load_certificate(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key; pass the .key_secret file")
    return public.decode("ascii"), secret.decode("ascii")
