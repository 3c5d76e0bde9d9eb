"""Rig data path benchmark: alignment, spool -> ingest throughput, window-end -> commit latency.

A table, then ONE JSON line. Ingest: 288-site records pre-spooled, delivered over CurveZMQ on
loopback into SQLite and PostgreSQL (a fresh schema at POPCONTROL_BENCH_POSTGRES_URL, default
postgresql+psycopg://postgres@127.0.0.1:5432/test). Latency: records put in the spool at
40/s (the moment a presentation's window end is passed) until the daemon sees the ack, which the
server sends after the commit.

    .venv/bin/python -m bench.rig [--n 5000] [--latency-n 400]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from sqlalchemy import create_engine, text

from rig.delivery import Delivery, DeliveryConfig
from rig.spool import Spool
from server.config import Settings
from server.db.session import make_engine, make_sessionmaker, upgrade
from server.ingest import IngestServer
from tests.rig.ingest_fixtures import build_world, make_message

PG_URL = os.environ.get(
    "POPCONTROL_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _database(kind: str, tmp: Path) -> tuple[str, Any]:
    if kind == "sqlite":
        url = f"sqlite:///{tmp / 'bench.db'}"
        upgrade(url)
        return url, None
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    upgrade(url)

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return url, drop


def run_ingest(kind: str, n: int, latency_n: int, rate_hz: float = 40.0) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-rig-{kind}-"))
    url, drop = _database(kind, tmp)
    server_keys, rig_keys = zmq.curve_keypair(), zmq.curve_keypair()
    world = build_world(url, channels_per_array=(96, 96, 96), rig_public_key=rig_keys[0].decode())
    engine = make_engine(url)
    settings = Settings(
        data_dir=tmp,
        database_url=url,
        ingest_bind="tcp://127.0.0.1:0",
        curve_public_key=server_keys[0].decode(),
        curve_secret_key=server_keys[1].decode(),
        _env_file=None,
    )
    server = IngestServer(settings, make_sessionmaker(engine))
    server.start()
    ctx: zmq.Context[Any] = zmq.Context()
    spool = Spool(tmp / "spool.db")
    assert server.endpoint is not None
    delivery = Delivery(
        ctx,
        spool,
        DeliveryConfig(
            server=server.endpoint,
            server_public_key=server_keys[0].decode(),
            rig_public_key=rig_keys[0].decode(),
            rig_secret_key=rig_keys[1].decode(),
        ),
    )
    try:
        spool.put_many(
            (m.presentation_id, m.encode()) for m in (make_message(world, i) for i in range(n))
        )
        while not delivery.connected:
            delivery.pump()
            time.sleep(0.001)
        t0 = time.perf_counter()
        while delivery.stats.stored < n:
            delivery.pump()
            delivery.socket.poll(5)
        throughput = n / (time.perf_counter() - t0)
        delivery.stats.latencies_s.clear()
        period = 1.0 / rate_hz
        next_at = time.perf_counter()
        for i in range(n, n + latency_n):
            msg = make_message(world, i)
            while time.perf_counter() < next_at:
                delivery.pump()
                delivery.socket.poll(1)
            spool.put(msg.presentation_id, msg.encode())  # the window end has just passed
            next_at += period
        while delivery.stats.stored < n + latency_n:
            delivery.pump()
            delivery.socket.poll(1)
        lat_ms = np.array(delivery.stats.latencies_s) * 1000
        return {
            "ingest_per_s": throughput,
            "latency_p50_ms": float(np.percentile(lat_ms, 50)),
            "latency_p99_ms": float(np.percentile(lat_ms, 99)),
        }
    finally:
        delivery.close()
        spool.close()
        server.stop()
        ctx.term()
        engine.dispose()
        if drop is not None:
            drop()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--latency-n", type=int, default=400)
    args = p.parse_args()
    from bench.rig_align import measure_alignment

    align = measure_alignment()
    sqlite = run_ingest("sqlite", args.n, args.latency_n)
    pg = run_ingest("postgres", args.n, args.latency_n)
    rows = [
        ("spike events aligned+counted / s (1 core)", align["spike_events_per_s"], ">= 5e6"),
        ("ingest / s, 288 sites, SQLite", sqlite["ingest_per_s"], ">= 2000"),
        ("ingest / s, 288 sites, PostgreSQL", pg["ingest_per_s"], ">= 2000"),
        ("latency p50 ms @40/s, SQLite", sqlite["latency_p50_ms"], ""),
        ("latency p99 ms @40/s, SQLite", sqlite["latency_p99_ms"], "<= 100"),
        ("latency p50 ms @40/s, PostgreSQL", pg["latency_p50_ms"], ""),
        ("latency p99 ms @40/s, PostgreSQL", pg["latency_p99_ms"], "<= 100"),
    ]
    print(f"{'measure':45s} {'value':>14s}  target")
    for name, value, target in rows:
        print(f"{name:45s} {value:14,.1f}  {target}")
    print(
        json.dumps(
            {
                "spike_events_per_s": align["spike_events_per_s"],
                "ingest_per_s_sqlite": sqlite["ingest_per_s"],
                "ingest_per_s_postgres": pg["ingest_per_s"],
                "latency_p50_ms": max(sqlite["latency_p50_ms"], pg["latency_p50_ms"]),
                "latency_p99_ms": max(sqlite["latency_p99_ms"], pg["latency_p99_ms"]),
                "latency_p99_ms_sqlite": sqlite["latency_p99_ms"],
                "latency_p99_ms_postgres": pg["latency_p99_ms"],
            }
        )
    )


if __name__ == "__main__":
    main()
