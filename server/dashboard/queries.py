"""Read-only aggregates behind the dashboard pages. Nothing here writes.

Spike vectors are decoded in bulk: the rows' packed ``<u2`` vectors are joined and reshaped into
one (presentations, sites) array, and only over a bounded recent window (``recent_n``), so the
live monitor costs the same after 100 presentations and after 100,000.

Rasters (``presentation.raster``): a packed array of counts, ``raster_meta`` as the ingest stores
it, ``{"bins": 40, "bin_ms": 10, "start_ms": -100, "dtype": "<u2", "n_sites": 288}`` (``n_bins``
is read too; dtype defaults to ``<u2``); the bytes are read as (rows, bins), rows being sites.
A raster that does not fit its meta is skipped, not guessed at.
"""

from __future__ import annotations

import calendar
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from server.db.models import (
    ApiToken,
    Array,
    Block,
    Evaluation,
    Job,
    NeuronModel,
    Presentation,
    RecordingSession,
    Rig,
    SessionState,
    Site,
    Stimulus,
    StimulusKind,
    StimulusSet,
    StimulusSetMember,
    Subject,
)

RECENT_N = 500  # most recent presentations the heatmap and PSTHs use (their valid ones)
PSTH_N = 200  # at most this many rasters of the recent window are read
PSTH_IMAGES = 6  # recent images shown with their own PSTH


def finite(value: Any) -> float | None:
    """A float for display, or None for missing / NaN / infinite / non-numeric values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def decode_counts(blobs: Sequence[bytes], n_sites: int) -> np.ndarray:
    """Packed little-endian uint16 vectors -> (len(blobs), n_sites) float64; short vectors pad 0."""
    out = np.zeros((len(blobs), n_sites), dtype=np.float64)
    if not blobs or n_sites == 0:
        return out
    width = 2 * n_sites
    if all(len(b) == width for b in blobs):
        out[:] = np.frombuffer(b"".join(blobs), dtype="<u2").reshape(len(blobs), n_sites)
        return out
    for i, blob in enumerate(blobs):  # rare: vectors of another length (site list changed)
        vec = np.frombuffer(blob[: len(blob) - len(blob) % 2], dtype="<u2")
        out[i, : min(n_sites, vec.size)] = vec[:n_sites]
    return out


def _pairs(db: Session, statement: Any) -> dict[Any, Any]:
    """A two-column query as a dict of first column -> second column."""
    return {row[0]: row[1] for row in db.execute(statement)}


# --- catalog ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteLayout:
    """A subject's sites in storage order, and where each array starts."""

    site_ids: list[int]
    labels: list[str]
    arrays: list[dict[str, Any]]  # {id, name, area, n_sites, offset}

    def column_of(self) -> dict[int, int]:
        return {site: col for col, site in enumerate(self.site_ids)}


def site_layout(db: Session, subject_id: int) -> SiteLayout:
    rows = db.execute(
        select(Site.id, Site.label, Site.channel, Array.id, Array.name, Array.area)
        .join(Array, Site.array_id == Array.id)
        .where(Array.subject_id == subject_id)
        .order_by(Array.id, Site.channel)
    ).all()
    arrays: list[dict[str, Any]] = []
    for col, row in enumerate(rows):
        if not arrays or arrays[-1]["id"] != row[3]:
            arrays.append(
                {"id": row[3], "name": row[4], "area": row[5], "n_sites": 0, "offset": col}
            )
        arrays[-1]["n_sites"] += 1
    return SiteLayout(
        site_ids=[int(r[0]) for r in rows],
        labels=[r[1] or f"{r[4]}-{r[2]:03d}" for r in rows],
        arrays=arrays,
    )


def site_labels(db: Session, site_ids: Iterable[int]) -> dict[int, str]:
    ids = sorted(set(site_ids))
    if not ids:
        return {}
    rows = db.execute(
        select(Site.id, Site.label, Site.channel, Array.name)
        .join(Array, Site.array_id == Array.id)
        .where(Site.id.in_(ids))
    )
    return {int(r[0]): (r[1] or f"{r[3]}-{r[2]:03d}") for r in rows}


def subjects_overview(db: Session) -> list[dict[str, Any]]:
    arrays = _pairs(db, select(Array.subject_id, func.count()).group_by(Array.subject_id))
    sites = _pairs(
        db,
        select(Array.subject_id, func.count(Site.id))
        .join(Site, Site.array_id == Array.id)
        .group_by(Array.subject_id),
    )
    sessions = _pairs(
        db, select(RecordingSession.subject_id, func.count()).group_by(RecordingSession.subject_id)
    )
    models = _pairs(
        db, select(NeuronModel.subject_id, func.count()).group_by(NeuronModel.subject_id)
    )
    return [
        {
            "subject": s,
            "arrays": arrays.get(s.id, 0),
            "sites": sites.get(s.id, 0),
            "sessions": sessions.get(s.id, 0),
            "models": models.get(s.id, 0),
        }
        for s in db.scalars(select(Subject).order_by(Subject.id))
    ]


def arrays_overview(db: Session) -> list[dict[str, Any]]:
    rows = db.execute(
        select(Array, Subject.name).join(Subject, Subject.id == Array.subject_id).order_by(Array.id)
    ).all()
    return [{"array": a, "subject_name": name} for a, name in rows]


def rigs_overview(db: Session) -> list[dict[str, Any]]:
    running = _pairs(
        db,
        select(RecordingSession.rig_id, RecordingSession.id).where(
            RecordingSession.state == SessionState.running.value
        ),
    )
    # last presentation per rig, from the rig's most recently started session only (the
    # presentation table grows without bound; this reads one session's rows per rig)
    last_seen: dict[int, datetime | None] = {}
    for rig_id in _pairs(db, select(Rig.id, Rig.name)):
        latest = db.scalar(
            select(RecordingSession.id)
            .where(RecordingSession.rig_id == rig_id, RecordingSession.started_at.is_not(None))
            .order_by(RecordingSession.started_at.desc())
            .limit(1)
        )
        if latest is not None:
            last_seen[rig_id] = db.scalar(
                select(func.max(Presentation.received_at)).where(Presentation.session_id == latest)
            )
    tokens = _pairs(
        db,
        select(ApiToken.rig_id, func.count())
        .where(ApiToken.rig_id.is_not(None), ApiToken.revoked.is_(False))
        .group_by(ApiToken.rig_id),
    )
    return [
        {
            "rig": r,
            "running_session": running.get(r.id),
            "last_presentation_at": last_seen.get(r.id),
            "tokens": tokens.get(r.id, 0),
        }
        for r in db.scalars(select(Rig).order_by(Rig.id))
    ]


# --- sessions -----------------------------------------------------------------------------------


def _names(db: Session) -> tuple[dict[int, str], dict[int, str]]:
    subjects = _pairs(db, select(Subject.id, Subject.name))
    rigs = _pairs(db, select(Rig.id, Rig.name))
    return subjects, rigs


def session_rows(db: Session, limit: int = 100) -> list[dict[str, Any]]:
    sessions = list(
        db.scalars(
            select(RecordingSession)
            .order_by(RecordingSession.scheduled_date.desc(), RecordingSession.id.desc())
            .limit(limit)
        )
    )
    ids = [s.id for s in sessions]
    # presentations per listed session: answered from the (session_id, block_id) index alone
    counts: dict[int, int] = (
        _pairs(
            db,
            select(Presentation.session_id, func.count())
            .where(Presentation.session_id.in_(ids))
            .group_by(Presentation.session_id),
        )
        if ids
        else {}
    )
    blocks: dict[int, int] = (
        _pairs(
            db,
            select(Block.session_id, func.count())
            .where(Block.session_id.in_(ids))
            .group_by(Block.session_id),
        )
        if ids
        else {}
    )
    subjects, rigs = _names(db)
    return [
        {
            "session": s,
            "subject_name": subjects.get(s.subject_id, "?"),
            "rig_name": rigs.get(s.rig_id, "?"),
            "presentations": int(counts.get(s.id, 0)),
            "blocks": blocks.get(s.id, 0),
        }
        for s in sessions
    ]


@dataclass
class CalendarDay:
    day: date
    in_month: bool
    sessions: list[dict[str, Any]] = field(default_factory=list)


def month_calendar(db: Session, year: int, month: int) -> list[list[CalendarDay]]:
    """Weeks (Monday first) of the month, each day with its sessions."""
    cal = calendar.Calendar(firstweekday=0)
    weeks = cal.monthdatescalendar(year, month)
    first, last = weeks[0][0], weeks[-1][-1]
    subjects, rigs = _names(db)
    by_day: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for s in db.scalars(
        select(RecordingSession)
        .where(RecordingSession.scheduled_date >= first, RecordingSession.scheduled_date <= last)
        .order_by(RecordingSession.id)
    ):
        by_day[s.scheduled_date].append(
            {
                "id": s.id,
                "state": s.state,
                "subject_name": subjects.get(s.subject_id, "?"),
                "rig_name": rigs.get(s.rig_id, "?"),
            }
        )
    return [
        [CalendarDay(day=d, in_month=d.month == month, sessions=by_day.get(d, [])) for d in week]
        for week in weeks
    ]


def block_rows(
    db: Session, session: RecordingSession, valid_by_block: Mapping[int, int] | None = None
) -> list[dict[str, Any]]:
    """Per block: set name, images, repetitions, valid presentations so far and the target."""
    set_ids = {b.stimulus_set_id for b in session.blocks}
    members = (
        _pairs(
            db,
            select(StimulusSetMember.stimulus_set_id, func.count())
            .where(StimulusSetMember.stimulus_set_id.in_(set_ids))
            .group_by(StimulusSetMember.stimulus_set_id),
        )
        if set_ids
        else {}
    )
    names = (
        _pairs(db, select(StimulusSet.id, StimulusSet.name).where(StimulusSet.id.in_(set_ids)))
        if set_ids
        else {}
    )
    valid = valid_by_block
    if valid is None:
        valid = _pairs(
            db,
            select(Presentation.block_id, func.count())
            .where(Presentation.session_id == session.id, Presentation.valid.is_(True))
            .group_by(Presentation.block_id),
        )
    rows = []
    for b in session.blocks:
        target = int(members.get(b.stimulus_set_id, 0)) * b.repetitions
        done = int(valid.get(b.id, 0))
        rows.append(
            {
                "id": b.id,
                "index": b.index,
                "set_id": b.stimulus_set_id,
                "set_name": names.get(b.stimulus_set_id, "?"),
                "images": int(members.get(b.stimulus_set_id, 0)),
                "repetitions": b.repetitions,
                "state": b.state,
                "valid": done,
                "target": target,
                "fraction": min(1.0, done / target) if target else 0.0,
            }
        )
    return rows


# --- live monitor -------------------------------------------------------------------------------


def _psth_from(raster: bytes, meta: Mapping[str, Any]) -> tuple[float, float, np.ndarray] | None:
    """(start_ms, bin_ms, mean count per row per bin (n_bins,)) or None when it does not fit."""
    try:
        n_bins = int(meta.get("n_bins") or meta.get("bins") or 0)
        bin_ms = float(meta.get("bin_ms", 0))
        start_ms = float(meta.get("start_ms", 0.0))
        values = np.frombuffer(raster, dtype=np.dtype(str(meta.get("dtype", "<u2"))))
    except (TypeError, ValueError):
        return None
    if n_bins <= 0 or bin_ms <= 0 or values.size == 0 or values.size % n_bins:
        return None
    return start_ms, bin_ms, values.reshape(-1, n_bins).astype(np.float64).mean(axis=0)


def _psths(db: Session, presentation_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Mean PSTH of each of the most recent images among ``presentation_ids`` (newest first)."""
    if not presentation_ids:
        return []
    fetched = {
        row[0]: row[1:]
        for row in db.execute(
            select(
                Presentation.id,
                Presentation.stimulus_id,
                Presentation.raster,
                Presentation.raster_meta,
            ).where(Presentation.id.in_(list(presentation_ids)))
        )
    }
    rows = [fetched[pid] for pid in presentation_ids if pid in fetched]
    by_image: dict[str, list[np.ndarray]] = {}
    axis: dict[str, tuple[float, float]] = {}
    order: list[str] = []
    for stimulus_id, raster, meta in rows:
        parsed = _psth_from(raster, meta or {}) if raster else None
        if parsed is None:
            continue
        start_ms, bin_ms, mean_counts = parsed
        if stimulus_id not in by_image:
            if len(order) >= PSTH_IMAGES:
                continue
            order.append(stimulus_id)
            by_image[stimulus_id] = []
            axis[stimulus_id] = (start_ms, bin_ms)
        seen = by_image[stimulus_id]
        if not seen or seen[0].size == mean_counts.size:
            seen.append(mean_counts)
    out = []
    for sid in order:
        start_ms, bin_ms = axis[sid]
        stack = np.stack(by_image[sid])  # (presentations, bins)
        rate_hz = stack.mean(axis=0) / (bin_ms / 1000.0)
        out.append(
            {
                "stimulus_id": sid,
                "n": int(stack.shape[0]),
                "start_ms": start_ms,
                "bin_ms": bin_ms,
                "rate_hz": [round(float(v), 2) for v in rate_hz],
            }
        )
    return out


def _ingest_view(status: Any, rig_name: str) -> dict[str, Any]:
    """The parts of the ingest status that concern this rig: spool depth, last ack, counters."""
    if not isinstance(status, Mapping):
        return {}
    rigs = status.get("rigs")
    scoped: Mapping[str, Any] = status
    if isinstance(rigs, Mapping) and isinstance(rigs.get(rig_name), Mapping):
        scoped = rigs[rig_name]
    view: dict[str, Any] = {}
    for key, value in scoped.items():
        if isinstance(value, str | int | float | bool) or value is None:
            view[str(key)] = value
        elif isinstance(value, datetime):
            view[str(key)] = value.isoformat(timespec="seconds")
    return view


def live_snapshot(
    db: Session,
    session_id: int,
    *,
    recent_n: int = RECENT_N,
    ingest_status: Any = None,
    with_labels: bool = False,
) -> dict[str, Any]:
    """Everything the live monitor shows, JSON-ready (site labels only ``with_labels``)."""
    session = db.get(RecordingSession, session_id)
    if session is None:
        return {"error": f"session {session_id} does not exist"}
    where = Presentation.session_id == session_id
    # one scan of the session's rows for every count (no filter on ``valid``: SQLite would pick
    # the index on ``valid`` over the session's and scan every session's presentations)
    total = valid = fix_ok = dropped = with_drops = 0
    last_at: datetime | None = None
    invalid: dict[str, int] = defaultdict(int)
    valid_by_block: dict[int, int] = defaultdict(int)
    for block_id, is_valid, reason, n, n_fix, n_dropped, n_with_drops, last in db.execute(
        select(
            Presentation.block_id,
            Presentation.valid,
            Presentation.invalid_reason,
            func.count(),
            func.sum(case((Presentation.fixation_ok.is_(True), 1), else_=0)),
            func.sum(Presentation.dropped_frames),
            func.sum(case((Presentation.dropped_frames > 0, 1), else_=0)),
            func.max(Presentation.received_at),
        )
        .where(where)
        .group_by(Presentation.block_id, Presentation.valid, Presentation.invalid_reason)
    ):
        total += int(n)
        fix_ok += int(n_fix or 0)
        dropped += int(n_dropped or 0)
        with_drops += int(n_with_drops or 0)
        if last is not None and (last_at is None or last > last_at):
            last_at = last
        if is_valid:
            valid += int(n)
            valid_by_block[int(block_id)] += int(n)
        else:
            invalid[reason or "unspecified"] += int(n)
    trials = db.scalar(
        select(func.count()).select_from(
            select(Presentation.block_id, Presentation.trial_index)
            .where(where)
            .distinct()
            .subquery()
        )
    )
    # the recent window: ids in arrival order first, then the vectors of the valid ones by id
    window = db.execute(
        select(Presentation.id, Presentation.valid, Presentation.raster.is_not(None))
        .where(where)
        .order_by(Presentation.received_at.desc(), Presentation.id.desc())
        .limit(recent_n)
    ).all()
    valid_ids = [pid for pid, ok, _ in window if ok]
    raster_ids = [pid for pid, ok, has_raster in window if ok and has_raster][:PSTH_N]
    layout = site_layout(db, session.subject_id)
    blobs = (
        list(db.scalars(select(Presentation.spike_counts).where(Presentation.id.in_(valid_ids))))
        if valid_ids
        else []
    )
    counts = decode_counts(blobs, len(layout.site_ids))  # (recent valid, sites)
    means = counts.mean(axis=0) if len(blobs) else np.zeros(len(layout.site_ids))
    rig = db.get(Rig, session.rig_id)
    rig_name = rig.name if rig else ""
    return {
        "session_id": session.id,
        "state": session.state,
        "presentations": total,
        "valid": valid,
        "invalid": total - valid,
        "invalid_by_reason": dict(sorted(invalid.items(), key=lambda kv: -kv[1])),
        "trials": int(trials or 0),
        "fixation_rate": (fix_ok / total) if total else None,
        "dropped_frames": dropped,
        "presentations_with_drops": with_drops,
        "last_received_at": last_at.isoformat(timespec="seconds") if last_at else None,
        "blocks": [
            {k: r[k] for k in ("index", "set_name", "state", "valid", "target")}
            for r in block_rows(db, session, valid_by_block)
        ],
        "heatmap": {
            "window": len(blobs),
            "arrays": [
                {k: a[k] for k in ("name", "area", "n_sites", "offset")} for a in layout.arrays
            ],
            "mean_counts": [round(float(v), 3) for v in means],
            "max": round(float(means.max()), 3) if means.size else 0.0,
            "labels": layout.labels if with_labels else None,
        },
        "psth": _psths(db, raster_ids),
        "ingest": _ingest_view(ingest_status, rig_name),
    }


# --- models -------------------------------------------------------------------------------------


def model_sites(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-site metrics from a model's ``metrics`` JSON.

    Reads ``sites: [{site_id, cv_r, ceiling, ncev, reliable, rf_mask?}]``, or the column form
    ``{site_ids: [...], cv_r: [...], ceiling: [...], ncev: [...], reliable: [...]}``.
    """
    sites = metrics.get("sites")
    if isinstance(sites, list):
        return [dict(s) for s in sites if isinstance(s, Mapping) and "site_id" in s]
    ids = metrics.get("site_ids")
    if not isinstance(ids, list):
        return []
    out = []
    for i, site_id in enumerate(ids):
        row: dict[str, Any] = {"site_id": site_id}
        for key in ("cv_r", "ceiling", "ncev", "reliable", "rf_mask"):
            column = metrics.get(key)
            if isinstance(column, list) and i < len(column):
                row[key] = column[i]
        out.append(row)
    return out


def _median(values: Iterable[Any]) -> float | None:
    numbers = [v for v in (finite(x) for x in values) if v is not None]
    return float(np.median(numbers)) if numbers else None


def model_rows(db: Session, limit: int = 200) -> list[dict[str, Any]]:
    subjects, _ = _names(db)
    rows = []
    for m in db.scalars(select(NeuronModel).order_by(NeuronModel.id.desc()).limit(limit)):
        sites = model_sites(m.metrics or {})
        rows.append(
            {
                "model": m,
                "subject_name": subjects.get(m.subject_id, "?"),
                "n_sites": len(sites) or len(m.site_ids or []),
                "n_reliable": sum(1 for s in sites if s.get("reliable")),
                "median_ncev": _median(s.get("ncev") for s in sites),
                "median_ncev_reliable": _median(s.get("ncev") for s in sites if s.get("reliable")),
            }
        )
    return rows


def rf_mask(value: Any, max_side: int = 64) -> np.ndarray | None:
    """A small 2-D array from a JSON list of lists, or None when it is not one."""
    if not isinstance(value, list) or not value:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if (
        arr.ndim != 2
        or arr.shape[0] > max_side
        or arr.shape[1] > max_side
        or not np.isfinite(arr).all()
    ):
        return None
    return arr


# --- synthesis gallery --------------------------------------------------------------------------


def _predicted_at_target(provenance: Mapping[str, Any], target: int) -> float | None:
    if "predicted_target" in provenance:
        return finite(provenance.get("predicted_target"))
    predicted = provenance.get("predicted")
    if isinstance(predicted, Mapping):
        return finite(predicted.get(str(target), predicted.get(target)))
    return None


def objective_kind(provenance: Mapping[str, Any]) -> str:
    kind = str(provenance.get("objective_kind") or provenance.get("objective") or "")
    if "one_hot" in kind or "onehot" in kind:
        return "one-hot"
    if "stretch" in kind:
        return "stretch"
    return kind or "?"


def gallery(db: Session, model_id: int | None = None, limit: int = 400) -> list[dict[str, Any]]:
    """Synthetic images grouped by target site: [{site_id, label, images: [...]}], most recent first."""
    query = select(Stimulus).where(Stimulus.kind == StimulusKind.synthetic.value)
    stimuli = list(
        db.scalars(query.order_by(Stimulus.created_at.desc(), Stimulus.id).limit(limit * 4))
    )
    if model_id is not None:
        stimuli = [s for s in stimuli if str((s.provenance or {}).get("model_id")) == str(model_id)]
    stimuli = stimuli[:limit]
    measured = measured_at_target(db, stimuli)
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for s in stimuli:
        prov = s.provenance or {}
        try:
            target = int(prov.get("target_site"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        mean, n = measured.get(s.id, (None, 0))
        groups[target].append(
            {
                "id": s.id,
                "name": s.name,
                "objective": objective_kind(prov),
                "model_id": prov.get("model_id"),
                "predicted": _predicted_at_target(prov, target),
                "predicted_units": str(prov.get("predicted_units") or ""),
                "measured": mean,
                "n": n,
            }
        )
    labels = site_labels(db, groups)
    return [
        {"site_id": site, "label": labels.get(site, f"site {site}"), "images": groups[site]}
        for site in sorted(groups)
    ]


def measured_at_target(db: Session, stimuli: Sequence[Stimulus]) -> dict[str, tuple[float, int]]:
    """Mean valid response at each synthetic image's target site, over every session it was shown."""
    targets: dict[str, int] = {}
    for s in stimuli:
        try:
            targets[s.id] = int((s.provenance or {}).get("target_site"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    if not targets:
        return {}
    rows = db.execute(
        select(Presentation.stimulus_id, RecordingSession.subject_id, Presentation.spike_counts)
        .join(RecordingSession, RecordingSession.id == Presentation.session_id)
        .where(Presentation.stimulus_id.in_(list(targets)), Presentation.valid.is_(True))
    ).all()
    by_subject: dict[int, list[tuple[str, bytes]]] = defaultdict(list)
    for sid, subject_id, blob in rows:
        by_subject[int(subject_id)].append((sid, blob))
    sums: dict[str, float] = defaultdict(float)
    ns: dict[str, int] = defaultdict(int)
    for subject_id, items in by_subject.items():
        column_of = site_layout(db, subject_id).column_of()
        counts = decode_counts([b for _, b in items], len(column_of))  # (rows, sites)
        cols = np.array([column_of.get(targets[sid], -1) for sid, _ in items])
        known = cols >= 0
        values = np.zeros(len(items))
        values[known] = counts[np.nonzero(known)[0], cols[known]]
        for (sid, _), ok, v in zip(items, known, values, strict=True):
            if ok:
                sums[sid] += float(v)
                ns[sid] += 1
    return {sid: (sums[sid] / ns[sid], ns[sid]) for sid in ns}


# --- loop overview ------------------------------------------------------------------------------

SUMMARY_ALIASES = {
    "stretch_ratio_median": ("stretch_ratio_median", "median_stretch_ratio"),
    "stretch_success_fraction": ("stretch_success_fraction",),
    "onehot_improved_fraction": ("onehot_improved_fraction",),
    "overprediction": ("overprediction",),
}


def _summary_value(summary: Mapping[str, Any], key: str) -> float | None:
    for name in SUMMARY_ALIASES[key]:
        if name in summary:
            return finite(summary[name])
    return None


def loop_overview(db: Session, subject_id: int | None = None) -> dict[str, Any]:
    """Evaluations by recording day: overall summary per day and a site × day stretch table."""
    query = (
        select(Evaluation, RecordingSession.scheduled_date, RecordingSession.subject_id)
        .join(RecordingSession, RecordingSession.id == Evaluation.session_id)
        .order_by(RecordingSession.scheduled_date, Evaluation.id)
    )
    if subject_id is not None:
        query = query.where(RecordingSession.subject_id == subject_id)
    rows = db.execute(query).all()
    days: list[dict[str, Any]] = []
    per_site: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for ev, day, subj in rows:
        summary = ev.summary or {}
        days.append(
            {
                "evaluation_id": ev.id,
                "session_id": ev.session_id,
                "subject_id": subj,
                "model_id": ev.model_id,
                "day": day,
                **{key: _summary_value(summary, key) for key in SUMMARY_ALIASES},
                "n_targets": len(ev.per_site or []),
            }
        )
        label = f"{day.isoformat()} #{ev.session_id}"
        for item in ev.per_site or []:
            if not isinstance(item, Mapping) or "site_id" not in item:
                continue
            per_site[int(item["site_id"])][label] = {
                "stretch_ratio": finite(item.get("stretch_ratio")),
                "onehot_improved": item.get("onehot_improved"),
                "onehot_score": finite(item.get("onehot_synthetic_score")),
            }
    columns = [f"{d['day'].isoformat()} #{d['session_id']}" for d in days]
    labels = site_labels(db, per_site)
    return {
        "days": days,
        "columns": columns,
        "sites": [
            {"site_id": s, "label": labels.get(s, f"site {s}"), "cells": per_site[s]}
            for s in sorted(per_site)
        ],
    }


# --- jobs ---------------------------------------------------------------------------------------


def job_rows(db: Session, limit: int = 200) -> list[Job]:
    return list(db.scalars(select(Job).order_by(Job.id.desc()).limit(limit)))


def form_choices(db: Session) -> dict[str, Any]:
    """What the scheduling form offers: subjects, rigs, stimulus sets with their sizes."""
    sizes = _pairs(
        db,
        select(StimulusSetMember.stimulus_set_id, func.count()).group_by(
            StimulusSetMember.stimulus_set_id
        ),
    )
    return {
        "subjects": list(db.execute(select(Subject.id, Subject.name).order_by(Subject.name)).all()),
        "rigs": list(db.scalars(select(Rig.name).order_by(Rig.name))),
        "sets": [
            {"id": i, "name": n, "kind": k, "size": int(sizes.get(i, 0))}
            for i, n, k in db.execute(
                select(StimulusSet.id, StimulusSet.name, StimulusSet.kind).order_by(StimulusSet.id)
            )
        ],
    }
