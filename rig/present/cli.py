"""``popcontrol present``: the command function (registered in server/cli.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

# Only typer here: the popcontrol CLI imports this module at start.
CORNERS = ("bottom-left", "bottom-right", "top-left", "top-right")


def present_command(
    server: Annotated[str, typer.Option(help="server base URL, e.g. http://lab-server:8000")],
    token: Annotated[str, typer.Option(envvar="POPCONTROL_RIG_TOKEN", help="the rig's API token")],
    rig: Annotated[str, typer.Option(help="this rig's name on the server")],
    daemon: Annotated[
        str, typer.Option(help="the rig daemon's flip endpoint")
    ] = "tcp://127.0.0.1:5610",
    fullscreen: Annotated[bool, typer.Option("--fullscreen", help="full-screen window")] = False,
    screen: Annotated[int, typer.Option(help="which screen (0 = primary)")] = 0,
    monitor: Annotated[
        str | None, typer.Option(help="PsychoPy Monitor Center name (size, distance, resolution)")
    ] = None,
    refresh_hz: Annotated[
        float | None,
        typer.Option(help="nominal refresh rate; default the monitor's (60 without vsync)"),
    ] = None,
    dout: Annotated[
        str,
        typer.Option(help="event-word output: sim | serial:/dev/PATH | parallel[:0x378] | labjack"),
    ] = "sim",
    eye: Annotated[
        str, typer.Option(help="eye tracker: sim[:break_rate=0.1,seed=1] | mouse | eyelink[:IP]")
    ] = "sim",
    reward: Annotated[
        str, typer.Option(help="reward TTL: sim | serial:/dev/PATH | parallel:0x378:PIN")
    ] = "sim",
    reward_ms: Annotated[
        float, typer.Option(help="reward pulse after each completed trial")
    ] = 80.0,
    photodiode: Annotated[str, typer.Option(help=f"photodiode corner: {', '.join(CORNERS)}")] = (
        "bottom-left"
    ),
    photodiode_px: Annotated[int, typer.Option(help="photodiode patch size in pixels")] = 60,
    background: Annotated[
        float | None, typer.Option(help="background luminance 0..1 (default: images' mean)")
    ] = None,
    cache_dir: Annotated[Path, typer.Option(help="stimulus image cache")] = Path(
        "var/stimulus-cache"
    ),
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="exit when no block is due instead of waiting")
    ] = False,
    headless: Annotated[
        bool,
        typer.Option("--headless", help="no window: virtual clock and simulated gaze (rehearsal)"),
    ] = False,
    seed: Annotated[int, typer.Option(help="--headless: seed of the simulated gaze")] = 0,
) -> None:
    """Show the rig's scheduled blocks (RSVP with fixation control) and report every flip."""
    from rig.present.devices import DeviceError, parse_eye_spec, sim_eye_from_options
    from rig.present.engine import EngineConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    engine = EngineConfig(reward_ms=reward_ms)
    try:
        if headless:
            kind, options = parse_eye_spec(eye)
            if kind != "sim":
                raise DeviceError("--headless needs the simulated eye tracker (--eye sim[:...])")
            from rig.present.headless import HeadlessConfig, VirtualClock, run_headless

            sim = sim_eye_from_options(options)
            results = run_headless(
                server,
                token,
                rig,
                daemon,
                HeadlessConfig(
                    refresh_hz=refresh_hz or 60.0,
                    break_rate=sim.break_rate,
                    engine=engine,
                    cache_dir=cache_dir,
                ),
                seed=seed,
                clock=VirtualClock(),
                until_idle=until_idle,
            )
        else:
            from rig.present.run import PresentConfig, run_present

            results = run_present(
                PresentConfig(
                    server_url=server,
                    token=token,
                    rig=rig,
                    daemon_endpoint=daemon,
                    fullscreen=fullscreen,
                    screen=screen,
                    monitor=monitor,
                    refresh_hz=refresh_hz,
                    dout=dout,
                    eye=eye,
                    reward=reward,
                    photodiode_corner=photodiode,
                    photodiode_size_px=photodiode_px,
                    background=background,
                    cache_dir=cache_dir,
                    until_idle=until_idle,
                    engine=engine,
                )
            ).results
    except (DeviceError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    for r in results:
        typer.echo(
            f"block {r.block_id} (session {r.session_id}): {r.state}, {r.trials} trials, "
            f"{r.flips} flips, {r.fixation_breaks} fixation breaks, {r.dropped_frames} dropped frames"
        )
