"""The worker: claims jobs from the database queue, runs them, commits their results.

``popcontrol worker [--device auto|cuda|cpu] [--kinds fit,synthesize,...]`` runs ``run_worker``.
While a job runs, a heartbeat thread renews its lease and records its progress; when the lease
cannot be renewed (the job was cancelled, or presumed dead and claimed by another worker) the job
stops at its next progress report. A handler computes outside any transaction and returns a
*committer*; ``server.jobs.queue.complete`` runs the committer and marks the job succeeded in one
transaction. Handlers (fit, synthesize, evaluate) live in ``server.loop``; the demo can call
``run_one`` (or the handlers' own functions) in-process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from server.config import Settings
from server.jobs.queue import (
    JOB_KINDS,
    ClaimedJob,
    Committer,
    JobError,
    LeaseLost,
    claim_next,
    complete,
    fail,
    release,
    renew_lease,
)
from server.stimuli.blobs import BlobStore

log = logging.getLogger("popcontrol.worker")


class JobContext:
    """What a handler gets: the claimed job, the database, the blob store, the device, and
    ``progress(fraction, message)``, which raises LeaseLost once the job is no longer ours."""

    def __init__(
        self,
        job: ClaimedJob,
        factory: sessionmaker[Session],
        blobs: BlobStore,
        settings: Settings,
        device: str,
    ) -> None:
        self.job = job
        self.factory = factory
        self.blobs = blobs
        self.settings = settings
        self.device = device
        self.lost = threading.Event()
        self._lock = threading.Lock()
        self._progress = 0.0
        self._message = "started"

    @property
    def params(self) -> dict[str, Any]:
        return self.job.params

    def progress(self, fraction: float, message: str = "") -> None:
        """Record progress in [0, 1] (written with the next heartbeat); stop if the job is lost."""
        with self._lock:
            self._progress = min(1.0, max(0.0, float(fraction)))
            if message:
                self._message = message
        self.check()

    def snapshot(self) -> tuple[float, str]:
        with self._lock:
            return self._progress, self._message

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(
                f"job {self.job.id} was cancelled or claimed by another worker; stopping it"
            )

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` while staying cancellable (used by slow test parameters)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.check()
            self.lost.wait(min(left, 0.1))
        self.check()


Handler = Callable[[JobContext], Committer]


@dataclass(frozen=True)
class WorkerConfig:
    kinds: tuple[str, ...] = JOB_KINDS
    device: str = "cpu"  # resolved: "cpu" or "cuda[:n]"
    lease_s: float = 60.0
    poll_s: float = 1.0
    heartbeat_s: float | None = None  # default: lease_s / 3, at most 5 s
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    )

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(JOB_KINDS)
        if unknown or not self.kinds:
            raise ValueError(
                f"unknown job kinds {sorted(unknown)}; choose from {', '.join(JOB_KINDS)}"
            )
        if self.lease_s <= 0 or self.poll_s <= 0:
            raise ValueError("lease_s and poll_s must be > 0")

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else min(self.lease_s / 3, 5.0)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is available, else ``cpu``."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], not {device!r}")
    if device == "cpu":
        return device
    import torch

    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return device


def default_handlers() -> dict[str, Handler]:
    """The job kinds this code knows how to run."""
    from server.jobs.export import export_handler
    from server.loop.evaluate import evaluate_handler
    from server.loop.fitjob import fit_handler
    from server.loop.synthjob import synthesize_handler

    return {
        "fit": fit_handler,
        "synthesize": synthesize_handler,
        "evaluate": evaluate_handler,
        "export": export_handler,
    }


class _Heartbeat(threading.Thread):
    def __init__(self, ctx: JobContext, config: WorkerConfig) -> None:
        super().__init__(name=f"heartbeat-job-{ctx.job.id}", daemon=True)
        self.ctx = ctx
        self.config = config
        self.stopped = threading.Event()

    def run(self) -> None:
        logged = ""
        while not self.stopped.wait(self.config.heartbeat_interval_s):
            progress, message = self.ctx.snapshot()
            if message != logged:
                log.info("job=%s progress=%.0f%% %s", self.ctx.job.id, 100 * progress, message)
                logged = message
            try:
                owned = renew_lease(
                    self.ctx.factory,
                    self.ctx.job.id,
                    self.ctx.job.owner,
                    self.config.lease_s,
                    progress=progress,
                    message=message,
                )
            except DBAPIError:  # transient database trouble: try again next beat
                log.warning("job=%s lease renewal failed; retrying", self.ctx.job.id, exc_info=True)
                continue
            if not owned:
                log.warning("job=%s lease lost (cancelled or reclaimed)", self.ctx.job.id)
                self.ctx.lost.set()
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


def run_one(
    factory: sessionmaker[Session],
    blobs: BlobStore,
    settings: Settings,
    config: WorkerConfig,
    handlers: Mapping[str, Handler] | None = None,
) -> ClaimedJob | None:
    """Claim and run one job; return it, or None when nothing was claimable."""
    table = dict(handlers) if handlers is not None else default_handlers()
    kinds = [k for k in config.kinds if k in table]
    if not kinds:
        return None
    job = claim_next(factory, config.worker_id, kinds, config.lease_s)
    if job is None:
        return None
    log.info(
        "job=%s kind=%s attempt=%s/%s claimed by %s",
        job.id,
        job.kind,
        job.attempts,
        job.max_attempts,
        config.worker_id,
    )
    ctx = JobContext(job, factory, blobs, settings, config.device)
    heartbeat = _Heartbeat(ctx, config)
    heartbeat.start()
    started = time.monotonic()
    try:
        committer = table[job.kind](ctx)
        ctx.check()
        heartbeat.stop()
        complete(factory, job, committer)
        log.info("job=%s kind=%s succeeded in %.1f s", job.id, job.kind, time.monotonic() - started)
    except LeaseLost as exc:
        log.warning("job=%s kind=%s abandoned: %s", job.id, job.kind, exc)
    except JobError as exc:
        fail(factory, job, str(exc), permanent=True)
        log.error("job=%s kind=%s failed: %s", job.id, job.kind, exc)
    except (KeyboardInterrupt, SystemExit):
        release(factory, job)
        log.warning("job=%s kind=%s released: worker stopping", job.id, job.kind)
        raise
    except Exception as exc:
        detail = f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=8)}"
        state = fail(factory, job, detail, permanent=False)
        log.exception(
            "job=%s kind=%s attempt %s failed -> %s", job.id, job.kind, job.attempts, state
        )
    finally:
        heartbeat.stop()
    return job


def run_worker(
    factory: sessionmaker[Session],
    blobs: BlobStore,
    settings: Settings,
    config: WorkerConfig,
    *,
    handlers: Mapping[str, Handler] | None = None,
    stop: threading.Event | None = None,
    max_jobs: int | None = None,
    exit_when_idle: bool = False,
) -> int:
    """Claim and run jobs until ``stop`` is set (or ``max_jobs`` ran, or the queue is empty with
    ``exit_when_idle``). Returns how many jobs ran."""
    stop = stop or threading.Event()
    table = dict(handlers) if handlers is not None else default_handlers()
    ran = 0
    while not stop.is_set() and (max_jobs is None or ran < max_jobs):
        try:
            job = run_one(factory, blobs, settings, config, table)
        except DBAPIError:
            log.warning("claiming a job failed; retrying in %.1f s", config.poll_s, exc_info=True)
            job = None
        if job is not None:
            ran += 1
            continue
        if exit_when_idle:
            break
        stop.wait(config.poll_s)
    return ran


def _raise_keyboard_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def worker_command(
    settings: Settings,
    *,
    device: str = "auto",
    kinds: Sequence[str] | None = None,
    lease_s: float | None = None,
    poll_s: float = 1.0,
    max_jobs: int | None = None,
    exit_when_idle: bool = False,
) -> int:
    """The body of ``popcontrol worker``: check the schema, then run jobs until interrupted."""
    from server.db.session import check_schema, engine_for, make_sessionmaker

    engine = engine_for(settings)
    check_schema(engine)
    config = WorkerConfig(
        kinds=tuple(kinds) if kinds else JOB_KINDS,
        device=resolve_device(device),
        lease_s=lease_s if lease_s is not None else settings.worker_lease_s,
        poll_s=poll_s,
    )
    handlers = {k: h for k, h in default_handlers().items() if k in config.kinds}
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (systemd, docker stop) stops like Ctrl-C: the running job goes back to the queue
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    log.info(
        "worker %s on %s: kinds=%s lease=%.0fs db=%s",
        config.worker_id,
        config.device,
        ",".join(sorted(handlers)),
        config.lease_s,
        settings.resolved_database_url.split("@")[-1],
    )
    try:
        return run_worker(
            make_sessionmaker(engine),
            BlobStore(settings.resolved_blob_dir),
            settings,
            config,
            handlers=handlers,
            max_jobs=max_jobs,
            exit_when_idle=exit_when_idle,
        )
    finally:
        engine.dispose()
