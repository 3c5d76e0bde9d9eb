"""``popcontrol rig`` and ``popcontrol rig-keygen``. Heavy imports stay inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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


def rest_layout_provider(http_url: str, token: str) -> Any:
    """Session id -> SessionLayout from the REST API (session, then its subject's arrays)."""
    import httpx

    from rig.daemon import SessionLayout, UnknownSession

    headers = {"Authorization": f"Bearer {token}"}

    def layout(session_id: int) -> SessionLayout:
        with httpx.Client(base_url=http_url, headers=headers, timeout=10.0) as client:
            r = client.get(f"/api/v1/sessions/{session_id}")
            if r.status_code == 404:
                raise UnknownSession(f"the server has no session {session_id}")
            r.raise_for_status()
            session = r.json()
            arrays = client.get("/api/v1/arrays", params={"subject_id": session["subject_id"]})
            arrays.raise_for_status()
        n_sites = sum(len(a["sites"]) for a in sorted(arrays.json(), key=lambda a: a["id"]))
        if n_sites == 0:
            raise UnknownSession(f"session {session_id}'s subject has no array sites")
        proto = session.get("protocol") or {}
        return SessionLayout(
            n_sites=n_sites,
            window_start_ms=float(proto.get("response_window_start_ms", 70.0)),
            window_end_ms=float(proto.get("response_window_end_ms", 170.0)),
        )

    return layout


def rig_command(
    rig: Annotated[str, typer.Option(help="this rig's name, as registered on the server")],
    source: Annotated[str, typer.Option(help="sim, openephys or replay")] = "sim",
    server: Annotated[str, typer.Option(help="the server's ingest")] = "tcp://127.0.0.1:5601",
    http: Annotated[str, typer.Option(help="the server's REST API")] = "http://127.0.0.1:8000",
    token: Annotated[str, typer.Option(envvar="POPCONTROL_RIG_TOKEN", help="rig API token")] = "",
    key: Annotated[Path, typer.Option(help="this rig's NAME.key_secret")] = Path(
        "var/keys/rig.key_secret"
    ),
    server_key: Annotated[
        str, typer.Option(envvar="POPCONTROL_CURVE_PUBLIC_KEY", help="server public key (Z85)")
    ] = "",
    insecure: Annotated[bool, typer.Option(help="no CurveZMQ (loopback development)")] = False,
    flip_bind: Annotated[str, typer.Option(help="ROUTER for the presenter")] = (
        "tcp://127.0.0.1:5610"
    ),
    spool: Annotated[Path, typer.Option(help="durable outbox")] = Path("var/rig/spool.db"),
    record: Annotated[Path | None, typer.Option(help="also write the native stream here")] = None,
    replay_file: Annotated[Path | None, typer.Option(help="recording for --source replay")] = None,
    openephys: Annotated[str, typer.Option(help="Open Ephys ZMQ plugin PUB")] = (
        "tcp://127.0.0.1:5556"
    ),
    sim_seed: Annotated[int, typer.Option(help="virtual monkey seed")] = 0,
    sim_day: Annotated[int, typer.Option(help="virtual monkey recording day (drift)")] = 0,
    real_time: Annotated[bool, typer.Option(help="sim paced to the wall clock")] = False,
) -> None:
    """Run the rig daemon: presenter flips + acquisition -> aligned records -> server."""
    import logging
    import signal

    from rig.align import AlignConfig
    from rig.daemon import DaemonConfig, RigDaemon, StatusPrinter, StreamSource
    from rig.delivery import DeliveryConfig

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not token:
        typer.echo("error: --token (or POPCONTROL_RIG_TOKEN) is needed for the REST API", err=True)
        raise typer.Exit(code=2)
    keys: dict[str, Any] = {}
    if not insecure:
        if not server_key:
            typer.echo("error: --server-key is needed (or --insecure)", err=True)
            raise typer.Exit(code=2)
        public, secret = load_key_pair(key)
        keys = {"server_public_key": server_key, "rig_public_key": public, "rig_secret_key": secret}
    src: StreamSource
    if source == "sim":
        import httpx
        import numpy as np
        from PIL import Image

        from rig.sim.monkey import MonkeyConfig
        from rig.sources.sim import SimSource, SimSourceConfig

        def load_image(stimulus_id: str) -> np.ndarray:
            import io

            r = httpx.get(
                f"{http}/api/v1/stimuli/{stimulus_id}/image",
                headers={"Authorization": f"Bearer {token}"},
                timeout=30.0,
            )
            r.raise_for_status()
            img = Image.open(io.BytesIO(r.content)).convert("L")
            return np.asarray(img, dtype=np.float32) / 255.0  # (H, W) in [0, 1]

        src = SimSource(
            SimSourceConfig(
                monkey=MonkeyConfig(seed=sim_seed, day=sim_day), real_time=real_time, rig=rig
            ),
            load_image,
        )
    elif source == "openephys":
        from rig.sources.openephys import OpenEphysConfig, OpenEphysSource

        src = OpenEphysSource(OpenEphysConfig(endpoint=openephys, rig=rig))
    elif source == "replay":
        from rig.sources.replay import ReplaySource

        if replay_file is None:
            typer.echo("error: --source replay needs --replay-file", err=True)
            raise typer.Exit(code=2)
        src = ReplaySource(replay_file)
    else:
        typer.echo(f"error: unknown --source {source!r}; use sim, openephys or replay", err=True)
        raise typer.Exit(code=2)
    recorder = None
    if record is not None:
        from rig.sources.replay import Recorder

        recorder = Recorder(record)
    config = DaemonConfig(
        rig=rig,
        spool_path=spool,
        flip_bind=flip_bind,
        delivery=DeliveryConfig(server=server, **keys),
        align=AlignConfig(n_sites=1, sample_rate_hz=src.sample_rate_hz, rig=rig),
    )
    daemon = RigDaemon(config, src, rest_layout_provider(http, token), recorder=recorder)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    try:
        daemon.run(status=StatusPrinter())
    finally:
        daemon.close()
