"""Builds a lab's worth of real rows for the dashboard tests and ``bench/dashboard.py``.

Everything goes through the real tables (and the catalog/stimuli services where they exist), with
real PNGs in a real blob store; spike counts are Poisson draws packed like the rig packs them.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from server.catalog.schemas import ArrayCreate, SubjectCreate
from server.catalog.service import create_array, create_subject, site_ids_for_subject
from server.db.base import utcnow
from server.db.models import (
    Block,
    BlockState,
    Evaluation,
    Job,
    JobState,
    NeuronModel,
    Presentation,
    RecordingSession,
    Rig,
    SessionState,
    StimulusKind,
)
from server.stimuli.blobs import BlobStore
from server.stimuli.images import canonicalize
from server.stimuli.schemas import StimulusSetCreate
from server.stimuli.service import create_set, store_stimulus

INVALID_REASONS = ("fixation_break", "stream_gap")
RASTER_META = {
    "start_ms": -100.0,
    "bin_ms": 10.0,
    "bins": 40,
    "dtype": "<u2",
}  # as the ingest stores it


@dataclass(frozen=True)
class Lab:
    subject_id: int
    rig_name: str
    rig_id: int
    site_ids: list[int]
    natural_ids: list[str]
    synthetic_ids: list[str]
    natural_set_id: int
    synthetic_set_id: int
    model_id: int
    session_id: int  # the completed session holding the presentations
    block_ids: list[int]
    evaluation_session_ids: list[int]
    job_ids: dict[str, int]  # state -> a job in that state


def png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _stimuli(
    db: Session,
    blobs: BlobStore,
    n: int,
    seed0: int,
    kind: str,
    provenance: list[dict[str, Any]] | None,
) -> list[str]:
    ids = []
    for i in range(n):
        image = canonicalize(png(seed0 + i), max_px=4096, max_bytes=1 << 20)
        stim, _ = store_stimulus(
            db,
            blobs,
            image,
            kind=kind,
            name=f"{kind}-{i}",
            provenance=provenance[i] if provenance else None,
        )
        ids.append(stim.id)
    return ids


def presentation_rows(
    rng: np.random.Generator,
    *,
    session_id: int,
    block_id: int,
    rig_id: int,
    stimulus_ids: list[str],
    n: int,
    n_sites: int,
    first_trial: int = 0,
    images_per_trial: int = 8,
    invalid_fraction: float = 0.1,
    raster_fraction: float = 0.0,
    rate: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """``n`` presentation rows as the ingest stores them (uint16 LE spike vectors)."""
    base = rate if rate is not None else rng.uniform(1.0, 8.0, n_sites)  # (sites,)
    stim = rng.integers(0, len(stimulus_ids), n)
    gain = rng.uniform(0.5, 2.0, len(stimulus_ids))
    counts = rng.poisson(base[None, :] * gain[stim][:, None]).astype("<u2")  # (n, sites)
    invalid = rng.random(n) < invalid_fraction
    with_raster = rng.random(n) < raster_fraction
    now = utcnow()
    rows = []
    for i in range(n):
        reason = INVALID_REASONS[i % 2] if invalid[i] else None
        raster = None
        if with_raster[i]:
            psth = rng.poisson(0.2, (n_sites, RASTER_META["bins"])).astype("<u2")
            psth[:, 17:27] += rng.poisson(1.0, (n_sites, 10)).astype("<u2")
            raster = psth.tobytes()
        trial = first_trial + i // images_per_trial
        rows.append(
            {
                "id": str(uuid.uuid4()),
                "session_id": session_id,
                "block_id": block_id,
                "stimulus_id": stimulus_ids[int(stim[i])],
                "rig_id": rig_id,
                "trial_index": trial,
                "position": i % images_per_trial,
                "onset_sample": 30_000 * i,
                "onset_source": "photodiode",
                "fixation_ok": reason != "fixation_break",
                "dropped_frames": int(i % 97 == 0),
                "valid": reason is None,
                "invalid_reason": reason,
                "window_start_ms": 70.0,
                "window_end_ms": 170.0,
                "spike_counts": counts[i].tobytes(),
                "raster": raster,
                "raster_meta": dict(RASTER_META) if raster is not None else None,
                "received_at": now + timedelta(microseconds=i),
            }
        )
    return rows


def insert_presentations(db: Session, rows: list[dict[str, Any]], chunk: int = 2000) -> None:
    for start in range(0, len(rows), chunk):
        db.execute(insert(Presentation), rows[start : start + chunk])


def _metrics(rng: np.random.Generator, site_ids: list[int], n_masks: int) -> dict[str, Any]:
    sites = []
    for i, site in enumerate(site_ids):
        ceiling = float(rng.uniform(0.2, 0.95))
        cv_r = float(rng.uniform(0.1, 0.8)) * ceiling
        entry: dict[str, Any] = {
            "site_id": site,
            "cv_r": cv_r,
            "ceiling": ceiling,
            "ncev": cv_r**2 / ceiling,
            "reliable": ceiling > 0.5,
            "unstable": i % 17 == 5,
            "stability_r": round(float(rng.uniform(0.2, 0.9)), 3),
        }
        if i < n_masks:
            y, x = np.mgrid[0:8, 0:8]
            entry["rf_mask"] = (
                np.exp(-((x - 2 - i % 4) ** 2 + (y - 3) ** 2) / 4.0).round(3).tolist()
            )
        sites.append(entry)
    pred = rng.normal(5, 2, 200)
    return {
        "sites": sites,
        "scatter": {
            "pred": pred.round(3).tolist(),
            "meas": (pred + rng.normal(0, 1, 200)).round(3).tolist(),
        },
        "median_ncev": float(np.median([s["ncev"] for s in sites])),
        "units": "z (per session, normalizer images)",
    }


def seed_lab(
    db: Session,
    blobs: BlobStore,
    *,
    n_arrays: int = 1,
    sites_per_array: int = 16,
    n_natural: int = 12,
    n_synthetic: int = 6,
    n_presentations: int = 200,
    n_days: int = 3,
    raster_fraction: float = 0.1,
    seed: int = 0,
    rig_name: str = "rig-a",
) -> Lab:
    """A subject with arrays, a rig, natural + synthetic stimuli, a model, a completed session
    with presentations, evaluations on ``n_days`` days and one job per state. Flushes only."""
    rng = np.random.default_rng(seed)
    subject = create_subject(db, SubjectCreate(name=f"monkey-{seed}"))
    for a in range(n_arrays):
        create_array(
            db,
            ArrayCreate(
                subject_id=subject.id, name=f"V4-{'abc'[a % 3]}{a}", n_channels=sites_per_array
            ),
        )
    site_ids = site_ids_for_subject(db, subject.id)
    rig = db.scalar(select(Rig).where(Rig.name == rig_name))
    if rig is None:
        rig = Rig(name=rig_name, description="seeded rig")
        db.add(rig)
        db.flush()
    natural = _stimuli(db, blobs, n_natural, 1000 * seed + 1, StimulusKind.natural.value, None)
    model = NeuronModel(
        subject_id=subject.id,
        backbone_id="alexnet",
        weights_sha256="0" * 64,
        layer="conv3",
        readout_kind="factorized",
        session_ids=[],
        site_ids=site_ids,
        metrics=_metrics(rng, site_ids, n_masks=min(8, len(site_ids))),
        params={},
        artifact_path="models/seeded.safetensors",
    )
    db.add(model)
    db.flush()
    targets = [site_ids[i % len(site_ids)] for i in range(n_synthetic)]
    provenance = [
        {
            "model_id": model.id,
            "objective": "stretch" if i % 2 == 0 else "one_hot",
            "target_site": targets[i],
            "predicted": {str(targets[i]): round(float(rng.uniform(5, 15)), 3)},
            "seed": i,
        }
        for i in range(n_synthetic)
    ]
    synthetic = _stimuli(
        db, blobs, n_synthetic, 1000 * seed + 500, StimulusKind.synthetic.value, provenance
    )
    natural_set = create_set(db, StimulusSetCreate(name=f"natural-{seed}", stimulus_ids=natural))
    synthetic_set = create_set(
        db, StimulusSetCreate(name=f"synthetic-{seed}", kind="synthetic", stimulus_ids=synthetic)
    )
    day0 = date.today() - timedelta(days=n_days)
    session = RecordingSession(
        subject_id=subject.id,
        rig_id=rig.id,
        scheduled_date=day0 + timedelta(days=n_days - 1),
        state=SessionState.completed.value,
        protocol={"on_ms": 100.0, "off_ms": 100.0, "images_per_trial": 8},
        started_at=utcnow(),
        ended_at=utcnow(),
    )
    session.blocks = [
        Block(
            index=0,
            stimulus_set_id=natural_set.id,
            repetitions=20,
            state=BlockState.completed.value,
        ),
        Block(
            index=1,
            stimulus_set_id=synthetic_set.id,
            repetitions=20,
            state=BlockState.completed.value,
        ),
    ]
    db.add(session)
    db.flush()
    n_syn = n_presentations // 4
    rate = rng.uniform(1.0, 8.0, len(site_ids))
    rows = presentation_rows(
        rng,
        session_id=session.id,
        block_id=session.blocks[0].id,
        rig_id=rig.id,
        stimulus_ids=natural,
        n=n_presentations - n_syn,
        n_sites=len(site_ids),
        raster_fraction=raster_fraction,
        rate=rate,
    ) + presentation_rows(
        rng,
        session_id=session.id,
        block_id=session.blocks[1].id,
        rig_id=rig.id,
        stimulus_ids=synthetic,
        n=n_syn,
        n_sites=len(site_ids),
        first_trial=10_000,
        raster_fraction=raster_fraction,
        rate=rate,
    )
    insert_presentations(db, rows)
    model.session_ids = [session.id]
    evaluation_sessions = []
    for d in range(n_days):
        if d == n_days - 1:
            ev_session = session
        else:
            ev_session = RecordingSession(
                subject_id=subject.id,
                rig_id=rig.id,
                scheduled_date=day0 + timedelta(days=d),
                state=SessionState.completed.value,
                protocol={},
            )
            db.add(ev_session)
            db.flush()
        evaluation_sessions.append(ev_session.id)
        ratios = rng.uniform(0.6, 1.2 + 0.3 * d, len(set(targets)))
        db.add(
            Evaluation(
                session_id=ev_session.id,
                model_id=model.id,
                summary={
                    "median_stretch_ratio": float(np.median(ratios)),
                    "stretch_success_fraction": float(np.mean(ratios > 1)),
                    "onehot_improved_fraction": 0.2 + 0.2 * d,
                    "overprediction": 3.0 / (d + 1),
                },
                per_site=[
                    {"site_id": s, "stretch_ratio": float(r), "onehot_improved": bool(r > 1.1)}
                    for s, r in zip(sorted(set(targets)), ratios, strict=True)
                ],
            )
        )
    job_ids = {}
    for state in JobState:
        job = Job(
            kind="fit",
            params={"subject_id": subject.id},
            state=state.value,
            progress={"queued": 0.0, "running": 0.4, "succeeded": 1.0}.get(state.value, 0.7),
            progress_message=f"{state.value} job",
            attempts=1 if state != JobState.queued else 0,
            error="out of memory" if state == JobState.failed else None,
            subject_id=subject.id,
            session_id=session.id,
        )
        db.add(job)
        db.flush()
        job_ids[state.value] = job.id
    db.flush()
    return Lab(
        subject_id=subject.id,
        rig_name=rig.name,
        rig_id=rig.id,
        site_ids=site_ids,
        natural_ids=natural,
        synthetic_ids=synthetic,
        natural_set_id=natural_set.id,
        synthetic_set_id=synthetic_set.id,
        model_id=model.id,
        session_id=session.id,
        block_ids=[b.id for b in session.blocks],
        evaluation_session_ids=evaluation_sessions,
        job_ids=job_ids,
    )
