"""A small recorded world for loop tests, built through the real services on a real database:
a subject with one array, a rig, natural and normalizer images in the blob store, and sessions
whose presentations carry Poisson counts from a planted image-computable neuron population."""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from server.catalog.schemas import ArrayCreate, RigCreate, SubjectCreate
from server.catalog.service import create_array, create_rig, create_subject, site_ids_for_subject
from server.db.models import Presentation, StimulusKind
from server.db.session import transaction
from server.sessions.schemas import BlockCreate, SessionCreate
from server.sessions.service import get_session, schedule_session, transition
from server.stimuli.blobs import BlobStore
from server.stimuli.images import canonicalize
from server.stimuli.schemas import StimulusSetCreate
from server.stimuli.service import create_set, store_stimulus


def smooth_image(rng: np.random.Generator, size_px: int) -> bytes:
    """A blurry random grayscale image (PNG): low-frequency blobs, like a crude photograph."""
    coarse = rng.random((6, 6))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        (size_px, size_px), Image.Resampling.BICUBIC
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class PlantedPopulation:
    """rate_j(image) = base_j * exp(gain * w_j · x), x = the 6×6 downsampled image (z-scored)."""

    def __init__(self, n_sites: int, seed: int, gain: float = 0.6) -> None:
        rng = np.random.default_rng(seed)
        self.weights = rng.normal(size=(n_sites, 36)) / 6.0  # (sites, 36)
        self.base = rng.uniform(4.0, 8.0, size=n_sites)  # spikes per window
        self.gain = gain

    def rates(self, png: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(png)) as img:
            small = np.asarray(img.convert("L").resize((6, 6), Image.Resampling.BOX), dtype=float)
        x = (small.reshape(-1) - 128.0) / 64.0
        return np.asarray(self.base * np.exp(self.gain * np.tanh(self.weights @ x)))


@dataclass(frozen=True)
class World:
    subject_id: int
    rig: str
    site_ids: list[int]
    natural_ids: list[str]
    normalizer_ids: list[str]
    natural_set_id: int
    normalizer_set_id: int


def build_world(
    factory: sessionmaker[Session],
    blobs: BlobStore,
    *,
    n_sites: int = 6,
    n_natural: int = 20,
    n_normalizer: int = 5,
    size_px: int = 48,
    seed: int = 0,
) -> World:
    rng = np.random.default_rng(seed)
    with transaction(factory) as db:
        subject = create_subject(db, SubjectCreate(name=f"monkey-{seed}"))
        create_array(db, ArrayCreate(subject_id=subject.id, name="V4", n_channels=n_sites))
        rig = create_rig(db, RigCreate(name=f"rig-{seed}"))

        def store(n: int, kind: str) -> list[str]:
            ids = []
            for i in range(n):
                image = canonicalize(smooth_image(rng, size_px))
                stim, _ = store_stimulus(db, blobs, image, kind=kind, name=f"{kind}-{i}")
                ids.append(stim.id)
            return ids

        natural = store(n_natural, StimulusKind.natural.value)
        normalizer = store(n_normalizer, StimulusKind.normalizer.value)
        nat_set = create_set(db, StimulusSetCreate(name=f"natural-{seed}", stimulus_ids=natural))
        norm_set = create_set(
            db,
            StimulusSetCreate(
                name=f"normalizers-{seed}", kind="normalizer", stimulus_ids=normalizer
            ),
        )
        return World(
            subject_id=subject.id,
            rig=rig.name,
            site_ids=site_ids_for_subject(db, subject.id),
            natural_ids=natural,
            normalizer_ids=normalizer,
            natural_set_id=nat_set.id,
            normalizer_set_id=norm_set.id,
        )


def schedule(
    factory: sessionmaker[Session],
    world: World,
    blocks: Sequence[tuple[int, int]],
    day: int = 0,
) -> int:
    with transaction(factory) as db:
        session = schedule_session(
            db,
            SessionCreate(
                subject_id=world.subject_id,
                rig=world.rig,
                scheduled_date=date(2026, 11, 1) + timedelta(days=day),
                blocks=[BlockCreate(stimulus_set_id=s, repetitions=r) for s, r in blocks],
            ),
        )
        return session.id


def record(
    factory: sessionmaker[Session],
    blobs: BlobStore,
    session_id: int,
    population: PlantedPopulation,
    *,
    seed: int = 0,
    gain_drift: float = 1.0,
    complete: bool = True,
) -> int:
    """Start the session, store one valid presentation per (image, repetition) of every block
    with Poisson counts, and complete it (without the loop hook). Returns presentations stored."""
    rng = np.random.default_rng(seed)
    n = 0
    with transaction(factory) as db:
        session = get_session(db, session_id)
        transition(db, session, "start")
        from server.db.models import StimulusSet

        for block in session.blocks:
            stimulus_set = db.get(StimulusSet, block.stimulus_set_id)
            assert stimulus_set is not None
            for rep in range(block.repetitions):
                for pos, member in enumerate(stimulus_set.members):
                    rates = population.rates(blobs.get(member.stimulus_id)) * gain_drift
                    counts = rng.poisson(rates).astype("<u2")
                    db.add(
                        Presentation(
                            id=str(uuid.uuid4()),
                            session_id=session.id,
                            block_id=block.id,
                            stimulus_id=member.stimulus_id,
                            trial_index=rep,
                            position=pos,
                            onset_sample=n * 6000,
                            onset_source="photodiode",
                            fixation_ok=True,
                            dropped_frames=0,
                            valid=True,
                            spike_counts=counts.tobytes(),
                        )
                    )
                    n += 1
        if complete:
            transition(db, session, "complete")
    return n
