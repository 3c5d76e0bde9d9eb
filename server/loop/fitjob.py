"""The ``fit`` job: fit a neuron model of a subject's sites on its recorded sessions.

Steps: (1) every valid presentation of the chosen sessions (default: all the subject's completed
sessions); (2) responses z-scored per session and site with the session's normalizer images
(stimuli of kind ``normalizer``, shown in every session), so day-to-day drift in gain cancels;
(3) sites whose normalizer responses stop correlating across days (a site's mean-response profile
over the normalizer images in one session against the average of the other sessions, r below
``stability_threshold``) are flagged unstable and left out, as are sites with constant
responses. Only a site whose normalizer profile is reliable within a session (split-half,
Spearman–Brown corrected, at least ``stability_min_reliability`` on average) can be judged: for
a noisy site a low r across days says nothing about drift, so it is left to the reliability
criterion instead of being thrown out; (4) ``models.fit.fit_model`` on all images shown
(synthetic ones included: the refit learns from the model's own mistakes); (5) the artifact goes to the blob store as
``models/<id>.safetensors`` and a ``model`` row holds per-site metrics.

``prepare`` reads (one short transaction), ``compute`` fits (no database), ``store`` writes (the
job's commit transaction); ``fit_subject`` chains the three in-process for the demo.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import (
    NeuronModel,
    RecordingSession,
    SessionState,
    Stimulus,
    StimulusKind,
)
from server.jobs.queue import Committer, JobError
from server.stimuli.blobs import BlobStore

if TYPE_CHECKING:
    from models.fit import FitResult
    from server.worker import JobContext

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class FitParams:
    """Parameters of a fit job (``job.params``; unknown keys are refused)."""

    session_ids: tuple[int, ...] | None = None  # default: every completed session of the subject
    backbone: str = "alexnet"
    weights: str | None = None  # local backbone weights file; None = random init (warned)
    layer: str = "conv3"
    input_size: int = 224
    readout: str = "factorized"  # or "ridge"
    n_members: int = 1  # ensemble size
    max_epochs: int | None = None  # factorized readout epochs (None: the models default)
    cv_folds: int = 5
    reliability_threshold: float = 0.5
    # 0.3: on the simulator with 16 normalizers x 6 repetitions, r < 0.5 flags about a quarter
    # of perfectly stable sites (Poisson noise on weakly tuned sites); r < 0.3 about a tenth
    stability_threshold: float = 0.3
    stability_min_reliability: float = 0.5
    include_synthetic: bool = True
    seed: int = 0
    scatter_points: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)  # loop bookkeeping (not used by the fit)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> FitParams:
        known = {f.name for f in fields(cls)}
        loop_keys = {"loop", "trigger_session_id", "subject_id"}
        unknown = set(params) - known - loop_keys
        if unknown:
            raise JobError(
                f"unknown fit parameters {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in params.items() if k in known}
        if values.get("session_ids") is not None:
            values["session_ids"] = tuple(int(s) for s in values["session_ids"])
        values["extra"] = {k: params[k] for k in loop_keys if k in params}
        try:
            out = cls(**values)
        except TypeError as exc:
            raise JobError(f"bad fit parameters: {exc}") from None
        if out.readout not in ("factorized", "ridge"):
            raise JobError(f"readout must be 'factorized' or 'ridge', not {out.readout!r}")
        return out


@dataclass(frozen=True)
class FitData:
    subject_id: int
    session_ids: list[int]
    site_ids: list[int]  # every site of the subject, in storage order
    stimulus_ids: list[str]  # images, one row each
    stimulus_kinds: list[str]
    stimulus_index: np.ndarray  # (presentations,) row of stimulus_ids
    session_of: np.ndarray  # (presentations,) position in session_ids
    counts: np.ndarray  # (presentations, sites) float64 spike counts
    normalized: np.ndarray  # (presentations, sites) z-scored per session with normalizers
    normalization: list[str]  # per session: "normalizer" or "session" (fallback)
    stability_r: np.ndarray  # (sites,) min over sessions of normalizer-profile r (NaN: untested)
    unstable: np.ndarray  # (sites,) bool
    flat: np.ndarray  # (sites,) bool: constant responses, cannot be fitted


def normalize_session(counts: np.ndarray, is_normalizer: np.ndarray) -> tuple[np.ndarray, str]:
    """z-score one session's (presentations, sites) counts per site with its normalizer
    presentations; without at least 2 of them, with all of the session's presentations."""
    source = counts[is_normalizer] if int(is_normalizer.sum()) >= 2 else counts
    mu = source.mean(0)
    sd = source.std(0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    return (counts - mu) / sd, ("normalizer" if int(is_normalizer.sum()) >= 2 else "session")


def _column_r(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r per column of two (images, sites) matrices; -1 where either column is constant."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(0) / np.where(denom > 0, denom, 1), -1.0)


def normalizer_reliability(sessions: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """sessions: per session, its normalizer presentations as (counts (presentations, sites),
    stimulus index (presentations,)). Returns (sites,) the mean over sessions of the
    Spearman–Brown corrected split-half reliability (``models.metrics``; each image's
    presentations split into first and second half; NaN with < 3 images shown twice)."""
    import torch

    from models.metrics import split_half_reliability

    if not sessions:
        return np.zeros(0)
    per_session = [
        split_half_reliability(
            torch.from_numpy(counts), torch.from_numpy(index), randomize=False
        ).numpy()
        for counts, index in sessions
    ]
    return np.asarray(np.mean(per_session, axis=0))


def normalizer_stability(profiles: Sequence[np.ndarray]) -> np.ndarray:
    """profiles: one (normalizer images, sites) mean-response matrix per session, same images in
    the same order. Returns (sites,) the minimum over sessions of the Pearson r between that
    session's profile and the mean profile of the other sessions (NaN with < 2 sessions or
    < 3 images; -1 where a profile is constant, i.e. the site stopped responding)."""
    if len(profiles) < 2 or profiles[0].shape[0] < 3:
        return np.full(profiles[0].shape[1] if profiles else 0, np.nan)
    stack = np.stack(profiles)  # (sessions, images, sites)
    worst = np.full(stack.shape[2], np.inf)
    for k in range(stack.shape[0]):
        worst = np.minimum(worst, _column_r(stack[k], np.delete(stack, k, axis=0).mean(0)))
    return worst


def judge_stability(
    stability: np.ndarray, reliability: np.ndarray, threshold: float, min_reliability: float
) -> tuple[np.ndarray, np.ndarray]:
    """(stability r, unstable flags) per site: r is kept only where the normalizer profile is
    reliable enough to judge (NaN otherwise, never unstable); unstable where r < threshold."""
    judged = np.nan_to_num(reliability, nan=-np.inf) >= min_reliability
    kept = np.where(judged, stability, np.nan)
    return kept, np.nan_to_num(kept, nan=np.inf) < threshold


def prepare(db: Session, subject_id: int, params: FitParams) -> FitData:
    """Read the subject's presentations and normalise them (one read transaction)."""
    from server.catalog.service import get_subject
    from server.sessions.service import response_matrix

    get_subject(db, subject_id)
    if params.session_ids:
        sessions = list(
            db.scalars(select(RecordingSession).where(RecordingSession.id.in_(params.session_ids)))
        )
        missing = set(params.session_ids) - {s.id for s in sessions}
        if missing:
            raise JobError(f"sessions {sorted(missing)} do not exist")
        foreign = [s.id for s in sessions if s.subject_id != subject_id]
        if foreign:
            raise JobError(f"sessions {foreign} belong to another subject than {subject_id}")
    else:
        sessions = list(
            db.scalars(
                select(RecordingSession).where(
                    RecordingSession.subject_id == subject_id,
                    RecordingSession.state == SessionState.completed.value,
                )
            )
        )
    sessions.sort(key=lambda s: (s.scheduled_date, s.id))
    if not sessions:
        raise JobError(
            f"subject {subject_id} has no completed sessions to fit on; complete a session first "
            "or pass session_ids"
        )
    matrices = [response_matrix(db, [s.id]) for s in sessions]
    site_ids = matrices[0].site_ids
    every_id = sorted({sid for m in matrices for sid in m.stimulus_ids})
    kinds: dict[str, str] = {
        sid: kind
        for sid, kind in db.execute(
            select(Stimulus.id, Stimulus.kind).where(Stimulus.id.in_(every_id))
        )
    }
    keep_kinds = {k.value for k in StimulusKind}
    if not params.include_synthetic:
        keep_kinds.discard(StimulusKind.synthetic.value)
    stimulus_ids = [s for s in every_id if kinds.get(s) in keep_kinds]
    row_of = {s: i for i, s in enumerate(stimulus_ids)}

    counts_parts, norm_parts, index_parts, session_parts = [], [], [], []
    normalization: list[str] = []
    profiles: list[dict[str, np.ndarray]] = []
    normalizer_shown: list[tuple[np.ndarray, np.ndarray]] = []
    for k, m in enumerate(matrices):
        keep = np.array([s in row_of for s in m.stimulus_ids], dtype=bool)
        counts = m.counts.astype(np.float64)[keep]
        ids = [s for s, ok in zip(m.stimulus_ids, keep, strict=True) if ok]
        if not ids:
            continue
        is_norm = np.array([kinds[s] == StimulusKind.normalizer.value for s in ids], dtype=bool)
        z, how = normalize_session(counts, is_norm)
        normalization.append(how)
        index = np.array([row_of[s] for s in ids], dtype=np.int64)
        counts_parts.append(counts)
        norm_parts.append(z)
        index_parts.append(index)
        session_parts.append(np.full(len(ids), k, dtype=np.int64))
        profiles.append(
            {
                sid: counts[index == row_of[sid]].mean(0)
                for sid in sorted({s for s, n in zip(ids, is_norm, strict=True) if n})
            }
        )
        normalizer_shown.append((counts[is_norm], index[is_norm]))
    if not counts_parts:
        raise JobError(f"sessions {[s.id for s in sessions]} have no valid presentations to fit on")
    counts_all = np.concatenate(counts_parts)
    common = sorted(set.intersection(*(set(p) for p in profiles))) if profiles else []
    stability = normalizer_stability(
        [np.stack([p[s] for s in common]) for p in profiles] if common else []
    )
    if stability.size == 0:
        stability = np.full(len(site_ids), np.nan)
    reliability = normalizer_reliability(normalizer_shown)
    if reliability.size == 0:
        reliability = np.full(len(site_ids), np.nan)
    stability, unstable = judge_stability(
        stability, reliability, params.stability_threshold, params.stability_min_reliability
    )
    normalized = np.concatenate(norm_parts)
    index_all = np.concatenate(index_parts)
    # a site is "flat" when its image means do not vary: the fit cannot use it
    sums = np.zeros((len(stimulus_ids), len(site_ids)))
    np.add.at(sums, index_all, normalized)
    reps = np.bincount(index_all, minlength=len(stimulus_ids))
    shown = reps > 0
    means = sums[shown] / reps[shown, None]
    flat = means.std(0) <= 1e-9
    return FitData(
        subject_id=subject_id,
        session_ids=[s.id for s in sessions],
        site_ids=list(site_ids),
        stimulus_ids=stimulus_ids,
        stimulus_kinds=[kinds[s] for s in stimulus_ids],
        stimulus_index=index_all,
        session_of=np.concatenate(session_parts),
        counts=counts_all,
        normalized=normalized,
        normalization=normalization,
        stability_r=stability,
        unstable=unstable,
        flat=flat,
    )


def image_loader_fn(blobs: BlobStore, size_px: int) -> Callable[[Sequence[str]], Any]:
    """ids -> (n, 1, size_px, size_px) float tensor in [0, 1]: grayscale, resized (bilinear)."""
    import torch
    from PIL import Image

    def load(ids: Sequence[str]) -> torch.Tensor:
        arrays = []
        for sid in ids:
            with Image.open(io.BytesIO(blobs.get(sid))) as img:
                gray = img.convert("L")
                if gray.size != (size_px, size_px):
                    gray = gray.resize((size_px, size_px), Image.Resampling.BILINEAR)
                arrays.append(np.asarray(gray, dtype=np.float32) / 255.0)
        return torch.from_numpy(np.stack(arrays))[:, None]

    return load


@dataclass(frozen=True)
class FitOutcome:
    data: FitData
    params: FitParams
    result: FitResult
    fitted_site_ids: list[int]
    metrics: dict[str, Any]
    natural_stats: tuple[float, float] | None


def _clean(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


def compute(
    data: FitData,
    params: FitParams,
    blobs: BlobStore,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> FitOutcome:
    """Fit the model (no database access)."""
    import torch

    from models.features import ImageLoader
    from models.fit import FitConfig, fit_model
    from models.readouts import FactorizedConfig, ReadoutConfig, ReadoutKind
    from models.synthesis.regularizers import image_stats

    included = ~(data.unstable | data.flat)
    fitted = [s for s, ok in zip(data.site_ids, included, strict=True) if ok]
    if not fitted:
        raise JobError(
            f"no site of subject {data.subject_id} can be fitted: {int(data.unstable.sum())} "
            f"unstable, {int(data.flat.sum())} with constant responses"
        )
    factorized = (
        FactorizedConfig(max_epochs=params.max_epochs)
        if params.max_epochs is not None
        else FactorizedConfig()
    )
    config = FitConfig(
        backbone=params.backbone,
        weights=params.weights,
        layer=params.layer,
        input_size=params.input_size,
        readout=ReadoutConfig(
            kind=cast(ReadoutKind, params.readout),
            n_members=params.n_members,
            factorized=factorized,
        ),
        cv_folds=params.cv_folds,
        reliability_threshold=params.reliability_threshold,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )
    load = image_loader_fn(blobs, params.input_size)
    loader = ImageLoader(tuple(data.stimulus_ids), load)

    def on_step(done: int, total: int) -> None:
        if progress is not None:
            progress(0.05 + 0.85 * done / max(total, 1), f"fitting: step {done}/{total}")

    try:
        result = fit_model(
            loader,
            torch.from_numpy(data.normalized[:, included].astype(np.float32)),
            torch.from_numpy(data.stimulus_index),
            config=config,
            site_ids=fitted,
            stimulus_ids=data.stimulus_ids,
            device=device,
            seed=params.seed,
            progress=on_step,
        )
    except ValueError as exc:
        raise JobError(f"the fit refused its input: {exc}") from None

    natural_rows = [i for i, k in enumerate(data.stimulus_kinds) if k == StimulusKind.natural.value]
    natural_stats: tuple[float, float] | None = None
    if natural_rows:
        lum, contrast = image_stats(load([data.stimulus_ids[i] for i in natural_rows[:500]]))
        natural_stats = (float(lum.mean()), float(contrast.mean()))
    metrics = site_metrics(data, result, fitted, params)
    return FitOutcome(data, params, result, fitted, metrics, natural_stats)


def site_metrics(
    data: FitData, result: FitResult, fitted: list[int], params: FitParams
) -> dict[str, Any]:
    """The model row's metrics JSON: sites [{site_id, cv_r, ceiling, ncev, reliable, unstable,
    stability_r, fitted}], median_ncev (fitted sites), scatter {pred, meas, site_id} (CV)."""
    m = result.metrics
    column = {s: i for i, s in enumerate(fitted)}
    sites = []
    for j, site in enumerate(data.site_ids):
        entry: dict[str, Any] = {
            "site_id": site,
            "unstable": bool(data.unstable[j]),
            "stability_r": _clean(float(data.stability_r[j])),
            "flat": bool(data.flat[j]),
            "fitted": site in column,
        }
        if site in column:
            c = column[site]
            entry.update(
                cv_r=_clean(float(m.cv_r[c])),
                ceiling=_clean(float(m.ceiling[c])),
                ncev=_clean(float(m.ncev[c])),
                reliable=bool(m.reliable[c]),
            )
        else:
            entry.update(cv_r=None, ceiling=None, ncev=None, reliable=False)
        sites.append(entry)
    ncev = np.asarray(m.ncev, dtype=np.float64)
    reliable = np.asarray(m.reliable, dtype=bool)
    pred = result.cv_predictions.numpy()
    meas = result.mean_responses.numpy()
    rng = np.random.default_rng(params.seed)
    n_total = pred.size
    pick = np.sort(rng.choice(n_total, size=min(params.scatter_points, n_total), replace=False))
    return {
        "sites": sites,
        "median_ncev": _clean(float(np.nanmedian(ncev))) if np.isfinite(ncev).any() else None,
        "median_ncev_reliable": _clean(float(np.nanmedian(ncev[reliable])))
        if reliable.any() and np.isfinite(ncev[reliable]).any()
        else None,
        "median_cv_r": _clean(float(np.nanmedian(m.cv_r))) if np.isfinite(m.cv_r).any() else None,
        "n_sites": len(data.site_ids),
        "n_fitted": len(fitted),
        "n_reliable": int(reliable.sum()),
        "n_unstable": int(data.unstable.sum()),
        "n_images": len(result.image_rows),
        "n_presentations": int(data.counts.shape[0]),
        "normalization": data.normalization,
        "units": "z (per session, normalizer images)",
        "scatter": {
            "pred": [round(float(v), 4) for v in pred.reshape(-1)[pick]],
            "meas": [round(float(v), 4) for v in meas.reshape(-1)[pick]],
            "site_id": [fitted[int(i) % len(fitted)] for i in pick],
        },
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }


def store(
    db: Session,
    blobs: BlobStore,
    outcome: FitOutcome,
    job_id: int | None = None,
) -> NeuronModel:
    """Write the model row and its artifact (``models/<id>.safetensors`` in the blob store)."""
    encoder = outcome.result.encoder
    params = asdict(outcome.params)
    params.pop("extra", None)
    params["session_ids"] = outcome.data.session_ids
    params["natural_stats"] = list(outcome.natural_stats) if outcome.natural_stats else None
    params["normalization"] = "normalizer"
    model = NeuronModel(
        subject_id=outcome.data.subject_id,
        backbone_id=encoder.backbone_id,
        weights_sha256=encoder.weights_sha256,
        layer=encoder.layer,
        readout_kind=outcome.params.readout,
        session_ids=outcome.data.session_ids,
        site_ids=outcome.fitted_site_ids,
        metrics=outcome.metrics,
        params=params,
        artifact_path="",
        job_id=job_id,
    )
    db.add(model)
    db.flush()
    relative = f"models/{model.id}.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        path = outcome.result.save(
            Path(tmp) / "model.safetensors", extra={"model_id": model.id, "job_id": job_id}
        )
        blobs.put_file(relative, path.read_bytes())
    model.artifact_path = relative
    db.flush()
    return model


def fit_subject(
    factory: sessionmaker[Session],
    blobs: BlobStore,
    subject_id: int,
    params: FitParams | None = None,
    *,
    device: str = "cpu",
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Prepare, fit and store in-process (no job row); returns the model id."""
    from server.db.session import transaction

    p = params or FitParams()
    with transaction(factory) as db:
        data = prepare(db, subject_id, p)
    outcome = compute(data, p, blobs, device=device, cache_dir=cache_dir, progress=progress)
    with transaction(factory) as db:
        return store(db, blobs, outcome).id


def fit_handler(ctx: JobContext) -> Committer:
    """The ``fit`` job. Subject: ``params.subject_id`` or the job's subject."""
    from server.db.session import transaction

    subject_id = ctx.params.get("subject_id", ctx.job.subject_id)
    if subject_id is None:
        raise JobError("a fit job needs a subject: set the job's subject_id")
    params = FitParams.from_dict(ctx.params)
    ctx.progress(0.01, "reading presentations")
    with transaction(ctx.factory) as db:
        data = prepare(db, int(subject_id), params)
    ctx.progress(
        0.05,
        f"fitting {int((~(data.unstable | data.flat)).sum())} sites on "
        f"{data.counts.shape[0]} presentations of {len(data.stimulus_ids)} images",
    )
    outcome = compute(
        data,
        params,
        ctx.blobs,
        device=ctx.device,
        cache_dir=ctx.settings.data_dir / "features",
        progress=ctx.progress,
    )
    ctx.progress(0.95, "storing the model")

    def commit(db: Session) -> dict[str, Any]:
        model = store(db, ctx.blobs, outcome, ctx.job.id)
        return {
            "model_id": model.id,
            "median_ncev": outcome.metrics["median_ncev"],
            "n_fitted": outcome.metrics["n_fitted"],
            "n_reliable": outcome.metrics["n_reliable"],
            "n_unstable": outcome.metrics["n_unstable"],
            "session_ids": data.session_ids,
        }

    return commit
