"""``popcontrol demo``: the closed loop for N simulated recording days, end to end.

Everything runs on this machine on the embedded defaults, over the real paths: the server
(REST API + ZeroMQ ingest with CurveZMQ) on loopback, the rig daemon reading the virtual monkey,
the headless presenter asking the REST API for blocks and sending flips to the daemon, and a
local worker running the fit, synthesize and evaluate jobs that the loop policy queues when a
session completes.

Day 1 shows normalizer and natural images; every later day shows what the loop scheduled
(normalizers, the synthetic set made overnight, natural references), and is evaluated.
Outputs: a per-day table on stdout, ``OUT/summary.json`` and ``OUT/report.html``.

This module is part of the composition root (with ``server.cli``): it may import every part.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from server.config import Settings
from server.report import DaySummary, ExampleImage, format_table, write_report, write_summary

log = logging.getLogger("popcontrol.demo")

RIG = "sim-rig"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the simulated experiment. ``fast`` shrinks everything to finish in minutes."""

    days: int = 3
    seed: int = 0
    n_arrays: int = 3
    channels_per_array: int = 32
    n_natural: int = 400
    n_normalizers: int = 16
    natural_repetitions: int = 8
    normalizer_repetitions: int = 6
    image_px: int = 128
    input_size: int = 128  # backbone input size for fitting and synthesis
    # No ImageNet weights can be downloaded, so the demo fits on the fixed V1-like filter bank
    # (meaningful without a weights file); "alexnet" here means a randomly initialised AlexNet.
    backbone: str = "v1"
    layer: str = "complex"
    readout: str = "ridge"  # at a few hundred images ridge beats the factorized readout here
    ensemble: int = 1
    max_targets: int = 12
    min_ncev: float = 0.1
    synth_steps: int = 60
    synth_start: str = "image"  # "image": the target's best natural image; or "noise"
    synth_candidates: int = 2
    # two stretch images per target, each shown as often as the references: the ratio compares
    # maxima of noisy means on both sides (measured maxima are biased up by the noise)
    images_per_target: int = 2
    synthetic_repetitions: int = 20
    reference_count: int = 40
    reference_repetitions: int = 20
    break_rate: float = 0.03
    torch_threads: int = 1  # the server, rig and presenter threads share this process's cores
    # overnight the rig and presenter are stopped, so the jobs may use every core (None)
    worker_threads: int | None = None

    @classmethod
    def for_mode(cls, days: int, fast: bool, seed: int = 0) -> DemoConfig:
        if not fast:
            return cls(days=days, seed=seed)
        return cls(
            days=days,
            seed=seed,
            n_arrays=2,
            channels_per_array=24,
            n_natural=300,
            natural_repetitions=8,
            normalizer_repetitions=5,
            max_targets=8,
            synth_steps=30,  # from the best natural image, 30 steps reach what 60 do (bench)
            reference_count=24,
        )

    @property
    def n_sites(self) -> int:
        return self.n_arrays * self.channels_per_array


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- processes


@contextmanager
def running_server(settings: Settings, port: int) -> Iterator[str]:
    """The real app (REST + ingest) served by uvicorn on loopback in a background thread."""
    import uvicorn

    from server.app import create_app

    app = create_app(settings, ingest=True)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="popcontrol-demo-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo server did not start; see the log above")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class RigProcess:
    """The rig daemon reading the virtual monkey, in a background thread; one per recording day.

    The daemon is built and closed inside its thread; the demo only reads the status snapshots
    the daemon hands out and moves the simulated stream on (``advance_to``).
    """

    def __init__(
        self,
        cfg: DemoConfig,
        day: int,
        spool_path: Path,
        ingest_endpoint: str,
        server_public_key: str,
        rig_keys: tuple[str, str],
        image_loader: Callable[[str], np.ndarray],
        flip_port: int,
    ) -> None:
        from rig.align import AlignConfig
        from rig.daemon import DaemonConfig
        from rig.delivery import DeliveryConfig
        from rig.sim.monkey import MonkeyConfig
        from rig.sim.population import PopulationConfig
        from rig.sources.sim import SimSource, SimSourceConfig

        self.source = SimSource(
            SimSourceConfig(
                monkey=MonkeyConfig(
                    population=PopulationConfig(
                        n_sites=cfg.n_sites, n_arrays=cfg.n_arrays, seed=cfg.seed
                    ),
                    day=day - 1,
                    seed=cfg.seed * 7919 + day,
                ),
                rig=RIG,
            ),
            image_loader,
        )
        self.config = DaemonConfig(
            rig=RIG,
            spool_path=spool_path,
            delivery=DeliveryConfig(
                server=ingest_endpoint.replace("*", "127.0.0.1"),
                server_public_key=server_public_key,
                rig_public_key=rig_keys[0],
                rig_secret_key=rig_keys[1],
                resend_after_s=2.0,
            ),
            align=AlignConfig(n_sites=cfg.n_sites, rig=RIG),
            flip_bind=f"tcp://127.0.0.1:{flip_port}",
            status_interval_s=0.1,
        )
        self.n_sites = cfg.n_sites
        self.flip_endpoint = f"tcp://127.0.0.1:{flip_port}"
        self.status: dict[str, Any] = {}
        self._daemon: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="popcontrol-demo-rig", daemon=True)

    def _run(self) -> None:
        from rig.daemon import RigDaemon, SessionLayout

        layout = SessionLayout(n_sites=self.n_sites)
        try:
            self._daemon = RigDaemon(self.config, self.source, lambda _session_id: layout)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            self._daemon.run(status=self._on_status)
        finally:
            self._daemon.close()

    def _on_status(self, status: dict[str, Any]) -> None:
        self.status = status

    def start(self) -> RigProcess:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"the rig daemon did not start: {self._error}")
        return self

    def flush(self, until_host_s: float, timeout_s: float = 300.0) -> dict[str, Any]:
        """Let the stream pass the last window, then wait until the server acked every record."""
        self.source.advance_to(until_host_s)
        target = self.source.sample_of(until_host_s)
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = dict(self.status)
            if (
                status.get("stream_position", 0) >= target
                and status.get("pending_flips", 1) == 0
                and status.get("spool_depth", 1) == 0
                and status.get("in_flight", 1) == 0
            ):
                return status
            if not self._thread.is_alive():
                raise RuntimeError("the rig daemon stopped unexpectedly; see the log above")
            time.sleep(0.05)
        raise RuntimeError(f"the rig daemon did not deliver everything in {timeout_s} s: {status}")

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------- the experiment


class Demo:
    def __init__(self, cfg: DemoConfig, out_dir: Path) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.var = out_dir / "var"
        self.days: list[DaySummary] = []
        self.examples: list[ExampleImage] = []
        self.timings: dict[str, float] = {}

    # -- set-up ---------------------------------------------------------------------------

    def _settings(self, ingest_port: int) -> Settings:
        import zmq

        public, secret = zmq.curve_keypair()
        return Settings(
            data_dir=self.var,
            database_url=f"sqlite:///{(self.var / 'popcontrol.db').resolve()}",
            ingest_bind=f"tcp://127.0.0.1:{ingest_port}",
            curve_public_key=public.decode(),
            curve_secret_key=secret.decode(),
            worker_lease_s=600.0,
            _env_file=None,
        )

    def _tokens(self, settings: Settings) -> dict[str, str]:
        from server.auth.tokens import create_token
        from server.db.models import Rig
        from server.db.session import engine_for, make_sessionmaker, transaction

        engine = engine_for(settings)
        with transaction(make_sessionmaker(engine)) as db:
            db.add(Rig(name=RIG, description="virtual monkey"))
            db.flush()
            tokens = {
                "operator": create_token(db, "operator", name="demo"),
                "rig": create_token(db, "rig", RIG, name="demo rig"),
            }
        engine.dispose()
        return tokens

    def _setup_experiment(self, api: httpx.Client, rig_public_key: str) -> int:
        cfg = self.cfg
        from server.naturalset import natural_images

        subject = api.post("/subjects", json={"name": "virtual-monkey"}).json()
        for a in range(cfg.n_arrays):
            r = api.post(
                "/arrays",
                json={
                    "subject_id": subject["id"],
                    "name": f"V4-{chr(ord('a') + a)}",
                    "n_channels": cfg.channels_per_array,
                },
            )
            r.raise_for_status()
        api.patch(f"/rigs/{RIG}", json={"curve_public_key": rig_public_key}).raise_for_status()
        images = natural_images(cfg.n_normalizers + cfg.n_natural, cfg.image_px, seed=cfg.seed)
        ids: list[str] = []
        for i, pixels in enumerate(tqdm(images, desc="uploading natural images", unit="img")):
            kind = "normalizer" if i < cfg.n_normalizers else "natural"
            r = api.post(
                "/stimuli",
                files={"file": (f"img{i:04d}.png", _png(pixels), "image/png")},
                data={"kind": kind},
            )
            r.raise_for_status()
            ids.append(r.json()["id"])
        norm = api.post(
            "/stimulus-sets",
            json={
                "name": "normalizers",
                "kind": "normalizer",
                "stimulus_ids": ids[: cfg.n_normalizers],
            },
        ).json()
        natural = api.post(
            "/stimulus-sets",
            json={"name": "natural", "kind": "natural", "stimulus_ids": ids[cfg.n_normalizers :]},
        ).json()
        loop_params = {
            "fit": {
                "backbone": cfg.backbone,
                "layer": cfg.layer,
                "input_size": cfg.input_size,
                "readout": cfg.readout,
                "n_members": cfg.ensemble,
                "cv_folds": 4,
                "seed": cfg.seed,
            },
            "synthesize": {
                "max_targets": cfg.max_targets,
                "min_ncev": cfg.min_ncev,
                "steps": cfg.synth_steps,
                "n_candidates": cfg.synth_candidates,
                "images_per_target": cfg.images_per_target,
                "size_px": cfg.image_px,
                "seed": cfg.seed,
                # Start each target from its best natural image: the same control as from noise
                # in half the steps (and the model is most trustworthy near natural images).
                "synthesis": {"start": cfg.synth_start, "start_noise": 0.1},
            },
            "synthetic_repetitions": cfg.synthetic_repetitions,
            "reference_count": cfg.reference_count,
            "reference_repetitions": cfg.reference_repetitions,
        }
        api.patch(
            f"/subjects/{subject['id']}", json={"closed_loop": True, "loop_params": loop_params}
        ).raise_for_status()
        session = api.post(
            "/sessions",
            json={
                "subject_id": subject["id"],
                "rig": RIG,
                "scheduled_date": date.today().isoformat(),
                "blocks": [
                    {"stimulus_set_id": norm["id"], "repetitions": cfg.normalizer_repetitions},
                    {"stimulus_set_id": natural["id"], "repetitions": cfg.natural_repetitions},
                ],
                "notes": "demo day 1: normalizers and natural images",
            },
        )
        session.raise_for_status()
        return int(session.json()["id"])

    # -- one day --------------------------------------------------------------------------

    def _record_day(
        self,
        day: int,
        session_id: int,
        api: httpx.Client,
        base_url: str,
        tokens: dict[str, str],
        settings: Settings,
        rig_keys: tuple[str, str],
        clock: Any,
    ) -> None:
        from rig.present.engine import EngineConfig
        from rig.present.headless import HeadlessConfig, HeadlessPresenter

        rig_api = httpx.Client(
            base_url=f"{base_url}/api/v1",
            headers={"Authorization": f"Bearer {tokens['rig']}"},
            timeout=30,
        )
        cache: dict[str, np.ndarray] = {}

        def load_image(stimulus_id: str) -> np.ndarray:
            if stimulus_id not in cache:
                r = rig_api.get(f"/stimuli/{stimulus_id}/image")
                r.raise_for_status()
                gray = Image.open(io.BytesIO(r.content)).convert("L")
                cache[stimulus_id] = np.asarray(gray, dtype=np.float32) / 255.0
            return cache[stimulus_id]

        api.post(f"/sessions/{session_id}/start").raise_for_status()
        assert settings.curve_public_key is not None
        rig = RigProcess(
            self.cfg,
            day,
            self.var / "rig-spool.sqlite",
            settings.ingest_bind,
            settings.curve_public_key,
            rig_keys,
            load_image,
            _free_port(),
        ).start()
        try:
            session = api.get(f"/sessions/{session_id}").json()
            total = sum(
                b["repetitions"]
                * len(api.get(f"/stimulus-sets/{b['stimulus_set_id']}").json()["stimulus_ids"])
                for b in session["blocks"]
            )
            with (
                tqdm(total=total, desc=f"day {day}: presenting", unit="img") as bar,
                HeadlessPresenter(
                    base_url,
                    tokens["rig"],
                    RIG,
                    rig.flip_endpoint,
                    HeadlessConfig(
                        break_rate=self.cfg.break_rate,
                        cache_dir=self.var / "presenter-cache",
                        # on the virtual clock the presenter outruns the daemon; let acks lag
                        # more before it pauses (a real rig keeps the 2 s default)
                        engine=EngineConfig(stall_after_s=10.0),
                    ),
                    seed=self.cfg.seed * 1000 + day,
                    clock=clock,
                ) as presenter,
            ):
                while (result := presenter.run_block()) is not None:
                    bar.update(min(total - bar.n, sum(result.shown_counts.values())))
                presenter.channel.wait_drained(timeout_s=60)
            rig.flush(clock.now() + 1.0)
        finally:
            rig.stop()
            rig_api.close()
        api.post(f"/sessions/{session_id}/complete").raise_for_status()

    def _run_worker(self, settings: Settings, day: int) -> None:
        import torch

        from server.db.session import engine_for, make_sessionmaker
        from server.stimuli.blobs import BlobStore
        from server.worker import WorkerConfig, resolve_device, run_one

        engine = engine_for(settings)
        factory = make_sessionmaker(engine)
        blobs = BlobStore(settings.resolved_blob_dir)
        config = WorkerConfig(device=resolve_device("auto"), lease_s=600.0)
        torch.set_num_threads(self.cfg.worker_threads or os.cpu_count() or 1)
        try:
            with tqdm(desc=f"day {day}: overnight jobs", unit="job") as bar:
                while True:
                    job = run_one(factory, blobs, settings, config)
                    if job is None:
                        break
                    bar.set_postfix_str(f"{job.kind} #{job.id}")
                    bar.update(1)
        finally:
            torch.set_num_threads(self.cfg.torch_threads)
            engine.dispose()

    # -- results --------------------------------------------------------------------------

    def _day_summary(self, day: int, session_id: int, api: httpx.Client) -> DaySummary:
        from sqlalchemy import func, select

        from server.db.models import Evaluation, NeuronModel, Presentation, Stimulus
        from server.db.session import engine_for, make_sessionmaker

        engine = engine_for(self._db_settings)
        with make_sessionmaker(engine)() as db:
            valid = db.scalar(
                select(func.count())
                .select_from(Presentation)
                .where(Presentation.session_id == session_id, Presentation.valid.is_(True))
            )
            model = db.scalar(
                select(NeuronModel)
                .where(NeuronModel.session_ids.is_not(None))
                .order_by(NeuronModel.id.desc())
            )
            evaluation = db.scalar(
                select(Evaluation)
                .where(Evaluation.session_id == session_id)
                .order_by(Evaluation.id.desc())
            )
            summary = DaySummary(
                day=day, sites=self.cfg.n_sites, valid_presentations=int(valid or 0)
            )
            if model is not None:
                summary.median_noise_corrected_ev = model.metrics.get("median_ncev")
            if evaluation is not None:
                s = evaluation.summary
                summary.stretch_success_fraction = s.get("stretch_success_fraction")
                ci = s.get("stretch_success_ci")
                summary.stretch_success_ci = (ci[0], ci[1]) if ci else None
                summary.median_stretch_ratio = s.get("median_stretch_ratio")
                summary.onehot_improved_fraction = s.get("onehot_improved_fraction")
                summary.overprediction = s.get("overprediction")
                summary.n_targets = int(s.get("n_stretch_targets") or 0)
                for site in evaluation.per_site:
                    if site.get("stretch_ratio") is not None:
                        summary.stretch_ratios.append(float(site["stretch_ratio"]))
                    if site.get("onehot_synthetic_score") is not None:
                        summary.onehot_scores.append(
                            (
                                float(site["onehot_synthetic_score"]),
                                float(site["onehot_natural_score"]),
                            )
                        )
                    best = site.get("best_stretch_stimulus")
                    if best and len(self.examples) < 48:
                        stim = db.get(Stimulus, best)
                        if stim is not None:
                            prov = stim.provenance or {}
                            self.examples.append(
                                ExampleImage(
                                    png=(
                                        self._blob_root / best[:2] / f"{best[2:]}.png"
                                    ).read_bytes(),
                                    target_site=int(site["site_id"]),
                                    kind="stretch",
                                    day=day,
                                    predicted=prov.get("predicted_target"),
                                    measured=site.get("max_synthetic"),
                                    predicted_units=str(prov.get("predicted_units") or ""),
                                )
                            )
                pairs = evaluation.summary.get("predicted_vs_measured") or []
                summary.predicted_vs_measured = [(float(p), float(m)) for p, m in pairs]
        engine.dispose()
        return summary

    # -- all days -------------------------------------------------------------------------

    def run(self) -> list[DaySummary]:
        import torch
        import zmq

        from rig.present.headless import VirtualClock
        from server.db.session import upgrade

        started = time.monotonic()
        torch.set_num_threads(self.cfg.torch_threads)
        if self.var.exists():
            shutil.rmtree(self.var)
        self.var.mkdir(parents=True)
        ingest_port, http_port = _free_port(), _free_port()
        settings = self._settings(ingest_port)
        self._db_settings = settings
        self._blob_root = settings.resolved_blob_dir
        upgrade(settings.resolved_database_url)
        tokens = self._tokens(settings)
        public, secret = zmq.curve_keypair()
        rig_keys = (public.decode(), secret.decode())
        clock = VirtualClock(start_s=1_000_000.0)
        with running_server(settings, http_port) as base_url:
            api = httpx.Client(
                base_url=f"{base_url}/api/v1",
                headers={"Authorization": f"Bearer {tokens['operator']}"},
                timeout=60,
            )
            session_id: int | None = self._setup_experiment(api, rig_keys[0])
            for day in range(1, self.cfg.days + 1):
                if session_id is None:
                    raise RuntimeError(f"the loop scheduled no session for day {day}")
                t0 = time.monotonic()
                self._record_day(day, session_id, api, base_url, tokens, settings, rig_keys, clock)
                t1 = time.monotonic()
                self._run_worker(settings, day)
                t2 = time.monotonic()
                self.timings[f"day{day}_record_s"] = round(t1 - t0, 1)
                self.timings[f"day{day}_jobs_s"] = round(t2 - t1, 1)
                self.days.append(self._day_summary(day, session_id, api))
                session_id = self._next_session(api, session_id)
                clock.advance(3600.0)
            api.close()
        self.timings["total_s"] = round(time.monotonic() - started, 1)
        return self.days

    def _next_session(self, api: httpx.Client, after: int) -> int | None:
        page = api.get("/sessions", params={"rig": RIG, "state": "scheduled", "limit": 10}).json()
        candidates = sorted(s["id"] for s in page["items"] if s["id"] > after)
        return candidates[0] if candidates else None

    def write_outputs(self) -> None:
        meta = {
            **{k: v for k, v in asdict(self.cfg).items()},
            **self.timings,
        }
        write_summary(
            self.out_dir / "summary.json",
            self.days,
            {"config": asdict(self.cfg), "timings": self.timings},
        )
        write_report(self.out_dir / "report.html", self.days, self.examples, meta)


def run_demo(days: int, fast: bool, out_dir: Path, seed: int = 0) -> list[DaySummary]:
    """Run the demo and write its outputs; returns the per-day summaries."""
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    out_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(DemoConfig.for_mode(days, fast, seed), out_dir)
    demo.run()
    demo.write_outputs()
    print()
    print(format_table(demo.days))
    print()
    print(f"report: {out_dir / 'report.html'}")
    print(f"summary: {out_dir / 'summary.json'}")
    print(json.dumps({"timings": demo.timings}))
    return demo.days
