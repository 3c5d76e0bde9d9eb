"""docker-compose.yml: valid for the compose tool, real commands, real settings."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import typer
import yaml

from server.cli import app
from server.config import Settings
from tests.conftest import require_component

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"


def _services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _resolve(argv: list[str]) -> Any:
    """Walk the popcontrol command tree like the shell would, failing on unknown commands/options."""
    assert argv[0] == "popcontrol", f"service command must start with popcontrol: {argv}"
    command: Any = typer.main.get_command(app)
    ctx = command.context_class(command)
    rest = argv[1:]
    while hasattr(command, "get_command"):
        assert rest, f"{argv}: a subcommand is missing"
        sub = command.get_command(ctx, rest[0])
        assert sub is not None, f"{argv}: {rest[0]!r} is not a popcontrol subcommand"
        command, rest = sub, rest[1:]
    known = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=")[0] in known, f"{argv}: {arg} is not an option of {command.name}"
    return command


def test_every_service_command_is_a_popcontrol_subcommand() -> None:
    checked = 0
    for service in _services().values():
        command = service.get("command")
        if command is None:
            continue
        argv = command if isinstance(command, list) else shlex.split(command)
        if argv[0] != "popcontrol":
            continue
        _resolve(argv)
        checked += 1
    assert checked >= 4, "expected server, migrate, worker and the sim services to run popcontrol"


def test_every_popcontrol_variable_is_a_setting() -> None:
    fields = {f"POPCONTROL_{name.upper()}" for name in Settings.model_fields}
    interpolated_only = {"POPCONTROL_RIG_TOKEN"}  # substituted into commands, not a setting
    used = set(re.findall(r"POPCONTROL_[A-Z0-9_]+", COMPOSE.read_text())) - interpolated_only
    assert used, "the compose file sets no POPCONTROL_ variables"
    assert used - fields == set(), f"not settings fields: {sorted(used - fields)}"
    for service in _services().values():
        env = service.get("environment") or {}
        keys = set(env) if isinstance(env, dict) else {e.split("=")[0] for e in env}
        assert {k for k in keys if k.startswith("POPCONTROL_")} <= fields


def test_compose_tool_accepts_the_file() -> None:
    tool = shutil.which("docker-compose")
    require_component("docker-compose", tool is not None, "apt-get install -y docker-compose")
    assert tool is not None
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "--profile", "sim", "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    if result.returncode != 0 and "--profile" in result.stderr:
        result = subprocess.run(
            [tool, "-f", str(COMPOSE), "config", "-q"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert result.returncode == 0, result.stderr
