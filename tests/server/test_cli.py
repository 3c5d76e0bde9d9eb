"""The command line as an operator uses it: real subprocesses, real databases, a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from server.db.session import upgrade


def popcontrol(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env(tmp_path: Path, database_url: str | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POPCONTROL_") or k == "POPCONTROL_CI"
    }
    env["POPCONTROL_DATA_DIR"] = str(tmp_path / "data")
    if database_url:
        env["POPCONTROL_DATABASE_URL"] = database_url
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_db_upgrade_and_token_create(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = popcontrol("db", "upgrade", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "popcontrol.db").is_file()
    r = popcontrol("token", "create", "--role", "operator", env=env)
    assert r.returncode == 0, r.stderr
    token = r.stdout.split()[-1]
    assert token.startswith("pc_") and len(token) > 30
    r = popcontrol("token", "create", "--role", "rig", env=env)
    assert r.returncode == 2 and "--rig" in r.stderr
    r = popcontrol("token", "create", "--role", "admin", env=env)
    assert r.returncode == 2 and "operator" in r.stderr


def test_serve_refuses_unmigrated_and_newer_databases(tmp_path: Path) -> None:
    env = _env(tmp_path)
    r = popcontrol("serve", "--no-ingest", env=env)
    assert r.returncode == 2
    assert "popcontrol db upgrade" in r.stderr
    url = f"sqlite:///{tmp_path / 'data' / 'popcontrol.db'}"
    upgrade(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    r = popcontrol("serve", "--no-ingest", env=env)
    assert r.returncode == 2 and "newer than this code" in r.stderr


def test_serve_answers_health_and_docs(tmp_path: Path, database_url: str) -> None:
    env = _env(tmp_path, database_url)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--no-ingest"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
        assert health is not None and health.status_code == 200, "server did not answer in 30 s"
        assert health.json()["database"]["ok"] is True
        docs = httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()
        assert "/api/v1/rigs/{name}/next-block" in spec["paths"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_makes_and_keeps_the_ingest_key_pair(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env["POPCONTROL_INGEST_BIND"] = f"tcp://127.0.0.1:{_free_port()}"
    assert popcontrol("db", "upgrade", env=env).returncode == 0
    port = _free_port()
    keys = []
    for _ in range(2):
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            body = None
            while time.monotonic() < deadline and body is None:
                try:
                    body = httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).json()
                except httpx.TransportError:
                    assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                    time.sleep(0.1)
            assert body is not None, "server did not answer in 30 s"
            assert body["ingest"]["running"] is True and body["ingest"]["curve"] is True
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=10)
        keys.append(next(line for line in out.splitlines() if "public key" in line).split()[-1])
    assert (tmp_path / "data" / "keys" / "server.key_secret").is_file()
    assert keys[0] == keys[1] and len(keys[0]) == 40
