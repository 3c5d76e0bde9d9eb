"""Closed-loop policy: what happens, per subject, when one of its sessions completes.

A subject in closed-loop mode (``subject.closed_loop``) runs, after every completed session:

1. an ``evaluate`` job, when the session showed synthetic images;
2. a ``fit`` job on all the subject's completed sessions (synthetic responses included);
3. a ``synthesize`` job depending on that fit; its commit schedules the next session
   (``after_synthesize``): a normalizer block, the new synthetic set, and a natural reference
   set (each target's best-driving natural images plus a seeded random sample), on the same
   rig, ``days_between`` days after the session that triggered the cycle.

The operator's controls: ``subject.loop_params`` holds the ``LoopConfig`` (edited through
``/api/v1/loop/subjects/{id}``); ``paused`` stops every automatic step (resuming catches up
with what was skipped: the latest unprocessed session, the latest unscheduled synthetic set);
queued jobs can be edited, cancelled or retried through ``/api/v1/jobs``; ``trigger`` starts
a cycle from any completed session and ``schedule`` schedules a session for any synthetic set.
Every step is a job or a session, so the loop's history is the subject's jobs (``loop_status``).

Hook: ``on_session_completed(db, session)`` is called by the sessions router after a
successful ``complete`` (listeners registered with ``add_completion_listener`` run too).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import (
    Job,
    JobState,
    RecordingSession,
    Rig,
    SessionState,
    Stimulus,
    StimulusKind,
    StimulusSet,
    StimulusSetMember,
    Subject,
)
from server.errors import Conflict, Invalid, NotFound, PopcontrolError
from server.jobs.queue import JobError, create_job

log = logging.getLogger("popcontrol.loop")

CompletionListener = Callable[[Session, RecordingSession], None]
_listeners: list[CompletionListener] = []


def add_completion_listener(listener: CompletionListener) -> None:
    """Run ``listener(db, session)`` in the request's transaction after a session completes."""
    if listener not in _listeners:
        _listeners.append(listener)


def remove_completion_listener(listener: CompletionListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


@dataclass(frozen=True)
class LoopConfig:
    """Per-subject loop settings, stored as ``subject.loop_params``."""

    paused: bool = False
    rig: str | None = None  # default: the rig of the session that triggered the cycle
    days_between: int = 1
    fit: dict[str, Any] = field(default_factory=dict)  # fit job parameters
    synthesize: dict[str, Any] = field(default_factory=dict)  # synthesize job parameters
    evaluate: dict[str, Any] = field(default_factory=dict)  # evaluate job parameters
    normalizer_set_id: int | None = None  # default: the trigger session's normalizer block
    reference_set_id: int | None = None  # a fixed natural reference set; default: chosen per cycle
    reference_count: int = 40
    reference_per_target: int = 2
    normalizer_repetitions: int | None = None  # default: as in the trigger session
    synthetic_repetitions: int = 20
    reference_repetitions: int = 20
    max_attempts: int = 3

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> LoopConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown and strict:
            raise Invalid(
                f"unknown loop settings {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            config = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise Invalid(f"bad loop settings: {exc}") from None
        checks = [
            (config.days_between >= 0, "days_between must be >= 0"),
            (config.reference_count >= 1, "reference_count must be >= 1"),
            (config.reference_per_target >= 0, "reference_per_target must be >= 0"),
            (config.synthetic_repetitions >= 1, "synthetic_repetitions must be >= 1"),
            (config.reference_repetitions >= 1, "reference_repetitions must be >= 1"),
            (config.max_attempts >= 1, "max_attempts must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise Invalid(message)
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def loop_config(subject: Subject) -> LoopConfig:
    """The subject's loop settings; unknown keys in the stored JSON are ignored."""
    try:
        return LoopConfig.from_dict(subject.loop_params or {}, strict=False)
    except Invalid as exc:
        log.warning("subject=%s loop settings invalid (%s); using defaults", subject.id, exc.detail)
        return LoopConfig()


def _subject(db: Session, subject_id: int) -> Subject:
    subject = db.get(Subject, subject_id)
    if subject is None:
        raise NotFound(f"subject {subject_id} does not exist")
    return subject


def _set_kinds(db: Session, set_id: int) -> set[str]:
    rows = db.scalars(
        select(Stimulus.kind)
        .join(StimulusSetMember, StimulusSetMember.stimulus_id == Stimulus.id)
        .where(StimulusSetMember.stimulus_set_id == set_id)
        .distinct()
    )
    return set(rows)


def session_shows_synthetic(db: Session, session: RecordingSession) -> bool:
    return any(
        StimulusKind.synthetic.value in _set_kinds(db, b.stimulus_set_id) for b in session.blocks
    )


# ---------------------------------------------------------------------------------------------
# the cycle


def start_cycle(db: Session, session: RecordingSession, *, reason: str = "") -> dict[str, int]:
    """Queue evaluate (if the session showed synthetic images), fit and synthesize for the
    subject of ``session``. Returns the job ids by kind."""
    if session.state != SessionState.completed.value:
        raise Conflict(
            f"session {session.id} is {session.state}; a loop cycle starts from a completed session"
        )
    subject = _subject(db, session.subject_id)
    config = loop_config(subject)
    base = {"loop": True, "trigger_session_id": session.id}
    jobs: dict[str, int] = {}
    if session_shows_synthetic(db, session):
        jobs["evaluate"] = create_job(
            db,
            "evaluate",
            {**config.evaluate, **base, "session_id": session.id},
            subject_id=subject.id,
            session_id=session.id,
            max_attempts=config.max_attempts,
        ).id
    fit = create_job(
        db,
        "fit",
        {**config.fit, **base},
        subject_id=subject.id,
        session_id=session.id,
        max_attempts=config.max_attempts,
    )
    jobs["fit"] = fit.id
    jobs["synthesize"] = create_job(
        db,
        "synthesize",
        {**config.synthesize, **base},
        subject_id=subject.id,
        session_id=session.id,
        depends_on_id=fit.id,
        max_attempts=config.max_attempts,
    ).id
    log.info(
        "subject=%s session=%s loop cycle%s: %s",
        subject.id,
        session.id,
        f" ({reason})" if reason else "",
        ", ".join(f"{k} job {v}" for k, v in jobs.items()),
    )
    return jobs


def on_session_completed(db: Session, session: RecordingSession) -> dict[str, int] | None:
    """The hook the sessions router calls after ``complete``. Never fails the request: a policy
    error is logged and its partial writes rolled back (a savepoint)."""
    for listener in list(_listeners):
        listener(db, session)
    subject = db.get(Subject, session.subject_id)
    if subject is None or not subject.closed_loop:
        return None
    if loop_config(subject).paused:
        log.info(
            "subject=%s session=%s completed; loop paused, nothing queued", subject.id, session.id
        )
        return None
    try:
        with db.begin_nested():
            return start_cycle(db, session)
    except PopcontrolError as exc:
        log.error(
            "subject=%s session=%s loop cycle not started: %s", subject.id, session.id, exc.detail
        )
        return None


def after_synthesize(
    db: Session,
    job_id: int,
    params: Mapping[str, Any],
    synthetic_set: StimulusSet,
    targets: Sequence[int],
) -> int | None:
    """Called in a loop synthesize job's commit: schedule the next session (unless paused).
    Returns the new session id, or None while paused."""
    trigger_id = params.get("trigger_session_id")
    if trigger_id is None:
        raise JobError("a loop synthesize job needs params.trigger_session_id")
    trigger = db.get(RecordingSession, int(trigger_id))
    if trigger is None:
        raise JobError(f"trigger session {trigger_id} does not exist")
    subject = _subject(db, trigger.subject_id)
    if not subject.closed_loop or loop_config(subject).paused:
        log.info(
            "subject=%s loop paused or off: set %s not scheduled", subject.id, synthetic_set.id
        )
        return None
    try:
        session = schedule_next_session(db, trigger, synthetic_set.id, targets, job_id=job_id)
    except PopcontrolError as exc:
        raise JobError(f"scheduling the next session failed: {exc.detail}") from None
    return session.id


def _normalizer_block(
    db: Session, trigger: RecordingSession, config: LoopConfig
) -> tuple[int, int]:
    """(set id, repetitions) of the normalizer block for the next session."""
    reps_default = None
    for block in trigger.blocks:
        kinds = _set_kinds(db, block.stimulus_set_id)
        stimulus_set = db.get(StimulusSet, block.stimulus_set_id)
        if kinds == {StimulusKind.normalizer.value} or (
            stimulus_set is not None and stimulus_set.kind == StimulusKind.normalizer.value
        ):
            if config.normalizer_set_id is None:
                return block.stimulus_set_id, config.normalizer_repetitions or block.repetitions
            reps_default = block.repetitions
    if config.normalizer_set_id is not None:
        if db.get(StimulusSet, config.normalizer_set_id) is None:
            raise Invalid(f"normalizer_set_id {config.normalizer_set_id} does not exist")
        return config.normalizer_set_id, config.normalizer_repetitions or reps_default or 10
    raise Invalid(
        f"session {trigger.id} has no normalizer block (a set of normalizer stimuli); set the "
        "loop's normalizer_set_id"
    )


@dataclass(frozen=True)
class NaturalMeans:
    """Mean measured count of every natural image a subject was shown, per site."""

    stimulus_ids: list[str]  # sorted
    site_ids: list[int]
    means: np.ndarray  # (stimuli, sites) over the subject's completed sessions


def natural_means(db: Session, subject_id: int) -> NaturalMeans | None:
    """Per site, the mean measured count of each natural image over the subject's completed
    sessions; None when no natural image has been shown yet."""
    from server.sessions.service import response_matrix

    session_ids = list(
        db.scalars(
            select(RecordingSession.id).where(
                RecordingSession.subject_id == subject_id,
                RecordingSession.state == SessionState.completed.value,
            )
        )
    )
    if not session_ids:
        return None
    matrix = response_matrix(db, session_ids)
    natural = set(
        db.scalars(
            select(Stimulus.id).where(
                Stimulus.id.in_(set(matrix.stimulus_ids)),
                Stimulus.kind == StimulusKind.natural.value,
            )
        )
    )
    order = sorted(natural)
    if not order:
        return None
    index_of = {s: i for i, s in enumerate(order)}
    rows = [i for i, s in enumerate(matrix.stimulus_ids) if s in natural]
    stim = np.array([index_of[matrix.stimulus_ids[i]] for i in rows], dtype=np.int64)
    sums = np.zeros((len(order), len(matrix.site_ids)))
    np.add.at(sums, stim, matrix.counts[rows].astype(np.float64))
    means = sums / np.maximum(np.bincount(stim, minlength=len(order)), 1)[:, None]
    return NaturalMeans(order, list(matrix.site_ids), means)


def choose_references(
    db: Session,
    subject_id: int,
    targets: Sequence[int],
    config: LoopConfig,
    seed: int,
) -> list[str]:
    """Natural reference images: each target's ``reference_per_target`` best-driving natural
    images (by mean measured count over the subject's completed sessions), then a seeded random
    sample of the other natural images shown, up to ``reference_count`` in all."""
    measured = natural_means(db, subject_id)
    if measured is None:
        return []
    order = measured.stimulus_ids
    column = {s: c for c, s in enumerate(measured.site_ids)}
    chosen: list[str] = []
    if config.reference_per_target > 0:
        for c in [column[t] for t in targets if t in column]:
            for i in np.argsort(-measured.means[:, c], kind="stable")[
                : config.reference_per_target
            ]:
                if order[int(i)] not in chosen:
                    chosen.append(order[int(i)])
    rest = [s for s in order if s not in chosen]
    random.Random(seed).shuffle(rest)
    chosen.extend(rest[: max(0, config.reference_count - len(chosen))])
    return chosen


def schedule_next_session(
    db: Session,
    trigger: RecordingSession,
    synthetic_set_id: int,
    targets: Sequence[int],
    *,
    job_id: int | None = None,
) -> RecordingSession:
    """Schedule normalizers + the synthetic set + natural references after ``trigger``."""
    from server.sessions.schemas import BlockCreate, Protocol, SessionCreate
    from server.sessions.service import schedule_session

    subject = _subject(db, trigger.subject_id)
    config = loop_config(subject)
    normalizer_set_id, normalizer_reps = _normalizer_block(db, trigger, config)
    if config.reference_set_id is not None:
        if db.get(StimulusSet, config.reference_set_id) is None:
            raise Invalid(f"reference_set_id {config.reference_set_id} does not exist")
        reference_set_id = config.reference_set_id
    else:
        references = choose_references(db, subject.id, targets, config, seed=synthetic_set_id)
        if not references:
            raise Invalid(
                f"subject {subject.id} has no natural images with recorded responses to use as "
                "references; set the loop's reference_set_id"
            )
        prefix = f"reference-subject{subject.id}-set{synthetic_set_id}"
        taken = set(db.scalars(select(StimulusSet.name).where(StimulusSet.name.startswith(prefix))))
        name = prefix if prefix not in taken else f"{prefix}-{len(taken) + 1}"
        reference = StimulusSet(
            name=name,
            kind=StimulusKind.natural.value,
            description=f"natural references for synthetic set {synthetic_set_id} "
            f"(targets {list(targets)})",
        )
        reference.members = [
            StimulusSetMember(position=i, stimulus_id=s) for i, s in enumerate(references)
        ]
        db.add(reference)
        db.flush()
        reference_set_id = reference.id
    rig_name = config.rig
    if rig_name is None:
        rig = db.get(Rig, trigger.rig_id)
        assert rig is not None, f"session {trigger.id} names a missing rig"
        rig_name = rig.name
    protocol = Protocol(
        **{k: v for k, v in (trigger.protocol or {}).items() if k in Protocol.model_fields}
    )
    data = SessionCreate(
        subject_id=subject.id,
        rig=rig_name,
        scheduled_date=trigger.scheduled_date + timedelta(days=config.days_between),
        protocol=protocol,
        blocks=[
            BlockCreate(stimulus_set_id=normalizer_set_id, repetitions=normalizer_reps),
            BlockCreate(stimulus_set_id=synthetic_set_id, repetitions=config.synthetic_repetitions),
            BlockCreate(stimulus_set_id=reference_set_id, repetitions=config.reference_repetitions),
        ],
        notes=f"closed loop: after session {trigger.id}"
        + (f", synthesize job {job_id}" if job_id is not None else "")
        + f", synthetic set {synthetic_set_id}",
    )
    session = schedule_session(db, data)
    log.info(
        "subject=%s scheduled session %s on %s (after session %s, synthetic set %s)",
        subject.id,
        session.id,
        session.scheduled_date,
        trigger.id,
        synthetic_set_id,
    )
    return session


# ---------------------------------------------------------------------------------------------
# operator controls


def _loop_jobs(db: Session, subject_id: int) -> list[Job]:
    jobs = db.scalars(select(Job).where(Job.subject_id == subject_id).order_by(Job.id))
    return [j for j in jobs if (j.params or {}).get("loop")]


def loop_status(db: Session, subject_id: int) -> dict[str, Any]:
    """Settings, and one entry per cycle (by trigger session): its jobs and the next session."""
    subject = _subject(db, subject_id)
    cycles: dict[int, dict[str, Any]] = {}
    for job in _loop_jobs(db, subject_id):
        trigger = int((job.params or {}).get("trigger_session_id", 0))
        cycle = cycles.setdefault(trigger, {"trigger_session_id": trigger, "jobs": {}})
        cycle["jobs"][job.kind] = {
            "id": job.id,
            "state": job.state,
            "progress": job.progress,
            "progress_message": job.progress_message,
            "error": job.error,
        }
        if job.kind == "synthesize" and job.result:
            cycle["stimulus_set_id"] = job.result.get("stimulus_set_id")
            cycle["next_session_id"] = job.result.get("next_session_id")
            cycle["targets"] = job.result.get("targets")
        if job.kind == "evaluate" and job.result:
            cycle["evaluation_id"] = job.result.get("evaluation_id")
    return {
        "subject_id": subject.id,
        "closed_loop": subject.closed_loop,
        "config": loop_config(subject).to_dict(),
        "cycles": [cycles[k] for k in sorted(cycles)],
    }


def update_loop(
    db: Session,
    subject_id: int,
    *,
    closed_loop: bool | None = None,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Switch the loop on/off and edit its settings (keys given replace; None removes). Leaving
    the paused state (or switching on) catches up with the steps that were skipped."""
    subject = _subject(db, subject_id)
    before = loop_config(subject)
    was_running = subject.closed_loop and not before.paused
    if config is not None:
        merged = dict(subject.loop_params or {})
        for key, value in config.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        LoopConfig.from_dict(merged, strict=True)
        subject.loop_params = merged
    if closed_loop is not None:
        subject.closed_loop = closed_loop
    db.flush()
    if subject.closed_loop and not loop_config(subject).paused and not was_running:
        catch_up(db, subject)
    return loop_status(db, subject_id)


def catch_up(db: Session, subject: Subject) -> list[str]:
    """After a pause: schedule the latest unscheduled loop synthetic set, or start a cycle from
    the latest completed session that has none."""
    actions: list[str] = []
    jobs = _loop_jobs(db, subject.id)
    triggered = {int((j.params or {}).get("trigger_session_id", 0)) for j in jobs}
    latest = db.scalar(
        select(RecordingSession)
        .where(
            RecordingSession.subject_id == subject.id,
            RecordingSession.state == SessionState.completed.value,
        )
        .order_by(RecordingSession.scheduled_date.desc(), RecordingSession.id.desc())
        .limit(1)
    )
    synth = [
        j
        for j in jobs
        if j.kind == "synthesize"
        and j.state == JobState.succeeded.value
        and j.result
        and j.result.get("next_session_id") is None
    ]
    if synth and (
        latest is None or int(synth[-1].params.get("trigger_session_id", 0)) == latest.id
    ):
        job = synth[-1]
        trigger = db.get(RecordingSession, int(job.params["trigger_session_id"]))
        assert job.result is not None
        stimulus_set = db.get(StimulusSet, int(job.result["stimulus_set_id"]))
        if trigger is not None and stimulus_set is not None:
            session = schedule_next_session(
                db, trigger, stimulus_set.id, job.result.get("targets") or [], job_id=job.id
            )
            job.result = {**job.result, "next_session_id": session.id}
            actions.append(f"scheduled session {session.id}")
    elif latest is not None and latest.id not in triggered:
        jobs_started = start_cycle(db, latest, reason="resumed")
        actions.append(f"started a cycle from session {latest.id}: {jobs_started}")
    db.flush()
    return actions


def trigger_cycle(db: Session, subject_id: int, session_id: int) -> dict[str, int]:
    """Operator override: start a cycle from a completed session now (even while paused)."""
    session = db.get(RecordingSession, session_id)
    if session is None or session.subject_id != subject_id:
        raise NotFound(f"session {session_id} of subject {subject_id} does not exist")
    return start_cycle(db, session, reason="operator")


def schedule_for_set(
    db: Session, subject_id: int, stimulus_set_id: int, trigger_session_id: int | None
) -> RecordingSession:
    """Operator override: schedule the next session for a synthetic set now."""
    subject = _subject(db, subject_id)
    stimulus_set = db.get(StimulusSet, stimulus_set_id)
    if stimulus_set is None:
        raise NotFound(f"stimulus set {stimulus_set_id} does not exist")
    query = select(RecordingSession).where(
        RecordingSession.subject_id == subject.id,
        RecordingSession.state == SessionState.completed.value,
    )
    if trigger_session_id is not None:
        query = query.where(RecordingSession.id == trigger_session_id)
    trigger = db.scalar(
        query.order_by(RecordingSession.scheduled_date.desc(), RecordingSession.id.desc()).limit(1)
    )
    if trigger is None:
        raise Invalid(
            f"subject {subject.id} has no completed session"
            + (f" {trigger_session_id}" if trigger_session_id else "")
            + " to schedule after"
        )
    targets = sorted(
        {
            int(s.provenance["target_site"])
            for s in db.scalars(
                select(Stimulus)
                .join(StimulusSetMember, StimulusSetMember.stimulus_id == Stimulus.id)
                .where(StimulusSetMember.stimulus_set_id == stimulus_set.id)
            )
            if (s.provenance or {}).get("target_site") is not None
        }
    )
    return schedule_next_session(db, trigger, stimulus_set.id, targets)
