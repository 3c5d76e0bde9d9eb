"""Evaluation of a session that showed synthetic images: did control work?

Per target site (Bashivan, Kar & DiCarlo 2019):

* stretch ratio = max over its stretch images of the measured mean response / max over the
  natural images of the session, with a bootstrap 95 % CI (presentations resampled within each
  image, seeded);
* one-hot control score of an image = softmax at the target over the population's measured mean
  responses, each site z-scored with the mean and std of its responses to the session's natural
  images; the best synthetic image of the target is compared with the best natural image;
* predicted vs measured on synthetic images: Pearson r of each image's predicted and measured
  response at its target, and the over-prediction ratio = Σ predicted / Σ measured (> 1: the model
  promised more than the site gave).

The first half of this module is pure numpy (tested on planted numbers); ``evaluate_handler`` is
the ``evaluate`` job: it reads the session, computes, and stores an ``evaluation`` row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from server.db.models import Evaluation, NeuronModel, RecordingSession, Stimulus, StimulusKind
from server.jobs.queue import Committer, JobError

if TYPE_CHECKING:
    from server.worker import JobContext


def stimulus_means(
    counts: np.ndarray, stimulus_index: np.ndarray, n_stimuli: int
) -> tuple[np.ndarray, np.ndarray]:
    """counts (presentations, sites), stimulus_index (presentations,) in [0, n_stimuli) ->
    mean response per stimulus (n_stimuli, sites) (NaN where never shown), repetitions (n_stimuli,)."""
    counts = np.asarray(counts, dtype=np.float64)
    assert counts.ndim == 2, f"counts must be (presentations, sites), got {counts.shape}"
    assert stimulus_index.shape == (counts.shape[0],), "one stimulus index per presentation"
    reps = np.bincount(stimulus_index, minlength=n_stimuli).astype(np.int64)
    sums = np.zeros((n_stimuli, counts.shape[1]))
    np.add.at(sums, stimulus_index, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / reps[:, None]
    means[reps == 0] = np.nan
    return means, reps


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(
            denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan
        )
    return np.asarray(out, dtype=np.float64)


@dataclass(frozen=True)
class StretchResult:
    target_column: int
    ratio: float  # NaN when the natural maximum is 0
    ci_low: float
    ci_high: float
    max_synthetic: float
    max_natural: float
    best_synthetic: int  # stimulus index
    best_natural: int  # stimulus index


@dataclass(frozen=True)
class StretchSummary:
    per_target: list[StretchResult]
    success_fraction: float | None  # fraction of targets with ratio > 1
    success_ci: tuple[float, float] | None
    median_ratio: float | None


def _presentation_groups(
    stimulus_index: np.ndarray, stimuli: Sequence[int]
) -> dict[int, np.ndarray]:
    return {int(s): np.flatnonzero(stimulus_index == s) for s in sorted(set(stimuli))}


def stretch_ratios(
    counts: np.ndarray,
    stimulus_index: np.ndarray,
    stretch_images: Mapping[int, Sequence[int]],
    natural_images: Sequence[int],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> StretchSummary:
    """Stretch ratio per target column with a bootstrap CI.

    counts (presentations, sites); stimulus_index (presentations,); stretch_images maps a target
    column to the stimulus indices of its stretch images; natural_images: stimulus indices of the
    natural images. Each bootstrap replicate resamples every image's presentations with
    replacement (the same replicate for all targets, so the success fraction gets a CI too).
    """
    counts = np.asarray(counts, dtype=np.float64)
    targets = sorted(int(t) for t in stretch_images if len(stretch_images[t]) > 0)
    if not targets or not natural_images:
        return StretchSummary([], None, None, None)
    shown = set(np.unique(stimulus_index).tolist())
    natural = [int(n) for n in natural_images if n in shown]
    if not natural:
        raise ValueError("none of the natural images was shown (no valid presentations)")
    every = set(natural)
    for t in targets:
        every.update(int(s) for s in stretch_images[t] if s in shown)
    groups = _presentation_groups(stimulus_index, sorted(every))
    rng = np.random.default_rng(seed)
    # (images, targets) point estimates and (images, boot, targets) replicates
    order = sorted(groups)
    row_of = {s: i for i, s in enumerate(order)}
    point = np.stack([counts[groups[s]][:, targets].mean(0) for s in order])
    boot = np.empty((len(order), n_boot, len(targets)))
    for i, s in enumerate(order):
        values = counts[groups[s]][:, targets]  # (reps, targets)
        picks = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
        boot[i] = values[picks].mean(1)
    nat_rows = [row_of[n] for n in natural]
    nat_point = point[nat_rows]  # (natural, targets)
    nat_boot_max = boot[nat_rows].max(0)  # (boot, targets)
    alpha = (1.0 - ci) / 2.0
    results: list[StretchResult] = []
    boot_ratios = np.full((n_boot, len(targets)), np.nan)
    for j, t in enumerate(targets):
        rows = [row_of[int(s)] for s in stretch_images[t] if int(s) in row_of]
        if not rows:
            continue
        syn = point[rows, j]
        best_syn = rows[int(np.argmax(syn))]
        best_nat = nat_rows[int(np.argmax(nat_point[:, j]))]
        max_syn = float(syn.max())
        max_nat = float(nat_point[:, j].max())
        ratio = float(_ratio(np.array(max_syn), np.array(max_nat)))
        boot_ratios[:, j] = _ratio(boot[rows, :, j].max(0), nat_boot_max[:, j])
        finite = boot_ratios[:, j][np.isfinite(boot_ratios[:, j])]
        low, high = (
            (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha)))
            if finite.size
            else (math.nan, math.nan)
        )
        results.append(
            StretchResult(t, ratio, low, high, max_syn, max_nat, order[best_syn], order[best_nat])
        )
    ratios = np.array([r.ratio for r in results])
    finite_ratios = ratios[np.isfinite(ratios)]
    if finite_ratios.size == 0:
        return StretchSummary(results, None, None, None)
    evaluated = [targets.index(r.target_column) for r in results if math.isfinite(r.ratio)]
    success_boot = (boot_ratios[:, evaluated] > 1).mean(1)  # (boot,)
    return StretchSummary(
        per_target=results,
        success_fraction=float((finite_ratios > 1).mean()),
        success_ci=(
            float(np.quantile(success_boot, alpha)),
            float(np.quantile(success_boot, 1 - alpha)),
        ),
        median_ratio=float(np.median(finite_ratios)),
    )


def zscore_by_natural(means: np.ndarray, natural_images: Sequence[int]) -> np.ndarray:
    """means (stimuli, sites) -> z-scored per site with the natural images' mean and std (ddof 0)."""
    nat = means[list(natural_images)]
    mu = np.nanmean(nat, axis=0)
    sd = np.nanstd(nat, axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return np.asarray((means - mu) / sd)


def onehot_scores(
    z: np.ndarray, target_column: int, population: Sequence[int], temperature: float = 1.0
) -> np.ndarray:
    """Control score of every stimulus for one target: softmax at the target over the population
    columns (which must include the target). z (stimuli, sites) -> (stimuli,)."""
    cols = list(population)
    if target_column not in cols:
        raise ValueError(f"target column {target_column} is not in the population")
    logits = z[:, cols] / temperature  # (stimuli, population)
    logits = logits - np.nanmax(logits, axis=1, keepdims=True)
    weights = np.exp(logits)
    return np.asarray(weights[:, cols.index(target_column)] / weights.sum(1))


@dataclass(frozen=True)
class OneHotResult:
    target_column: int
    best_synthetic_score: float
    best_natural_score: float
    improved: bool  # best synthetic > best natural
    best_synthetic: int  # stimulus index
    best_natural: int


def onehot_results(
    means: np.ndarray,
    onehot_images: Mapping[int, Sequence[int]],
    natural_images: Sequence[int],
    population: Sequence[int],
    temperature: float = 1.0,
) -> list[OneHotResult]:
    """One-hot control per target column: best synthetic vs best natural image."""
    shown = set(np.flatnonzero(~np.isnan(means).any(axis=1)).tolist())
    natural = [int(n) for n in natural_images if n in shown]
    if not natural:
        return []
    z = zscore_by_natural(means, natural)
    out: list[OneHotResult] = []
    for t in sorted(onehot_images):
        images = [int(s) for s in onehot_images[t] if int(s) in shown]
        if not images:
            continue
        scores = onehot_scores(z, t, population, temperature)
        best_syn = images[int(np.argmax(scores[images]))]
        best_nat = natural[int(np.argmax(scores[natural]))]
        out.append(
            OneHotResult(
                target_column=t,
                best_synthetic_score=float(scores[best_syn]),
                best_natural_score=float(scores[best_nat]),
                improved=bool(scores[best_syn] > scores[best_nat]),
                best_synthetic=best_syn,
                best_natural=best_nat,
            )
        )
    return out


@dataclass(frozen=True)
class PredictionAgreement:
    n_images: int
    r: float | None  # Pearson r of predicted vs measured at each image's target
    overprediction: float | None  # Σ predicted / Σ measured


def prediction_agreement(predicted: np.ndarray, measured: np.ndarray) -> PredictionAgreement:
    """predicted, measured (images,): each synthetic image's response at its own target."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    keep = np.isfinite(predicted) & np.isfinite(measured)
    p, m = predicted[keep], measured[keep]
    if p.size == 0:
        return PredictionAgreement(0, None, None)
    r = float(np.corrcoef(p, m)[0, 1]) if p.size >= 3 and p.std() > 0 and m.std() > 0 else None
    total = float(m.sum())
    return PredictionAgreement(int(p.size), r, float(p.sum() / total) if total > 0 else None)


# ---------------------------------------------------------------------------------------------
# the evaluate job


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def session_normalizer_stats(
    counts: np.ndarray, is_normalizer: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-site mean and std (ddof 0, floored at 1e-6) over a session's normalizer presentations."""
    rows = counts[is_normalizer]
    if rows.shape[0] < 2:
        return None
    return rows.mean(0), np.maximum(rows.std(0), 1e-6)


@dataclass(frozen=True)
class EvaluateParams:
    n_boot: int = 1000
    seed: int = 0
    temperature: float = 1.0

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> EvaluateParams:
        return cls(
            n_boot=int(params.get("n_boot", 1000)),
            seed=int(params.get("seed", 0)),
            temperature=float(params.get("temperature", 1.0)),
        )


def _objective_kind(provenance: Mapping[str, Any]) -> str:
    """'stretch' or 'one_hot' (or '' when the provenance names neither)."""
    kind = str(provenance.get("objective_kind") or provenance.get("objective") or "")
    if "one_hot" in kind or "onehot" in kind:
        return "one_hot"
    if "stretch" in kind:
        return "stretch"
    return ""


def evaluate_session(db: Session, session_id: int, params: EvaluateParams) -> dict[str, Any]:
    """Compute the evaluation of one session: {summary, per_site, model_id}."""
    from server.sessions.service import get_session, response_matrix

    session = get_session(db, session_id)
    matrix = response_matrix(db, [session_id])
    if not matrix.presentation_ids:
        raise JobError(f"session {session_id} has no valid presentations to evaluate")
    order = sorted(set(matrix.stimulus_ids))
    stimuli = {s.id: s for s in db.scalars(select(Stimulus).where(Stimulus.id.in_(order)))}
    index_of = {sid: i for i, sid in enumerate(order)}
    stim_index = np.array([index_of[s] for s in matrix.stimulus_ids], dtype=np.int64)
    counts = matrix.counts.astype(np.float64)
    column_of = {site: c for c, site in enumerate(matrix.site_ids)}

    natural = [index_of[s] for s in order if stimuli[s].kind == StimulusKind.natural.value]
    stretch: dict[int, list[int]] = {}
    onehot: dict[int, list[int]] = {}
    predicted_target: dict[int, float] = {}
    model_ids: set[int] = set()
    population: set[int] = set()
    for sid in order:
        stim = stimuli[sid]
        if stim.kind != StimulusKind.synthetic.value:
            continue
        prov = stim.provenance or {}
        target_site = prov.get("target_site")
        if target_site is None or int(target_site) not in column_of:
            continue
        col = column_of[int(target_site)]
        kind = _objective_kind(prov)
        if kind == "stretch":
            stretch.setdefault(col, []).append(index_of[sid])
        elif kind == "one_hot":
            onehot.setdefault(col, []).append(index_of[sid])
        predicted = prov.get("predicted") or {}
        if str(target_site) in predicted:
            predicted_target[index_of[sid]] = float(predicted[str(target_site)])
        population.update(column_of[int(s)] for s in predicted if int(s) in column_of)
        if prov.get("model_id") not in (None, ""):
            model_ids.add(int(prov["model_id"]))
    if not stretch and not onehot:
        raise JobError(
            f"session {session_id} showed no synthetic images with a target site and objective; "
            "evaluate only sessions that include a synthetic set"
        )
    means, reps = stimulus_means(counts, stim_index, len(order))
    stretch_summary = stretch_ratios(
        counts, stim_index, stretch, natural, n_boot=params.n_boot, seed=params.seed
    )
    pop = sorted(population) if population else list(range(len(matrix.site_ids)))
    onehot_out = onehot_results(means, onehot, natural, pop, params.temperature)

    # predictions are in the fitted model's units (responses z-scored with the session's
    # normalizer images); back to spike counts with this session's normalizer statistics
    is_norm = np.array(
        [stimuli[s].kind == StimulusKind.normalizer.value for s in matrix.stimulus_ids], dtype=bool
    )
    norm = session_normalizer_stats(counts, is_norm)
    model_id = min(model_ids) if model_ids else None
    normalized_model = True
    if model_id is not None:
        model = db.get(NeuronModel, model_id)
        if model is not None:
            normalized_model = (model.params or {}).get("normalization", "normalizer") != "none"
    pred_rows, meas_rows = [], []
    target_of: dict[int, int] = {}
    for by_target in (stretch, onehot):
        for col, images in by_target.items():
            for i in images:
                target_of[i] = col
    for i, pred in predicted_target.items():
        col = target_of[i]
        if normalized_model:
            if norm is None:
                continue
            pred = pred * float(norm[1][col]) + float(norm[0][col])
        pred_rows.append(pred)
        meas_rows.append(float(means[i, col]))
    agreement = prediction_agreement(np.array(pred_rows), np.array(meas_rows))

    site_of = {c: s for s, c in column_of.items()}
    per_site: dict[int, dict[str, Any]] = {}
    for r in stretch_summary.per_target:
        per_site.setdefault(site_of[r.target_column], {"site_id": site_of[r.target_column]}).update(
            stretch_ratio=_finite(r.ratio),
            stretch_ci=[_finite(r.ci_low), _finite(r.ci_high)],
            max_synthetic=r.max_synthetic,
            max_natural=r.max_natural,
            best_stretch_stimulus=order[r.best_synthetic],
            best_natural_stimulus=order[r.best_natural],
        )
    for o in onehot_out:
        per_site.setdefault(site_of[o.target_column], {"site_id": site_of[o.target_column]}).update(
            onehot_synthetic_score=o.best_synthetic_score,
            onehot_natural_score=o.best_natural_score,
            onehot_improved=o.improved,
            best_onehot_stimulus=order[o.best_synthetic],
        )
    summary = {
        "session_id": session_id,
        "subject_id": session.subject_id,
        "sites": len(matrix.site_ids),
        "valid_presentations": len(matrix.presentation_ids),
        "n_stretch_targets": len(stretch_summary.per_target),
        "stretch_success_fraction": stretch_summary.success_fraction,
        "stretch_success_ci": list(stretch_summary.success_ci)
        if stretch_summary.success_ci
        else None,
        "median_stretch_ratio": stretch_summary.median_ratio,
        "n_onehot_targets": len(onehot_out),
        "onehot_improved_fraction": float(np.mean([o.improved for o in onehot_out]))
        if onehot_out
        else None,
        "predicted_measured_r": _finite(agreement.r),
        "overprediction": _finite(agreement.overprediction),
        "n_synthetic_images": agreement.n_images,
        "predicted_vs_measured": [
            [round(float(p), 4), round(float(m), 4)]
            for p, m in zip(pred_rows, meas_rows, strict=True)
        ],
        "min_repetitions": int(reps[reps > 0].min()) if (reps > 0).any() else 0,
        "params": asdict(params),
    }
    return {
        "summary": summary,
        "per_site": [per_site[k] for k in sorted(per_site)],
        "model_id": model_id,
    }


def store_evaluation(
    db: Session, session_id: int, outcome: Mapping[str, Any], job_id: int | None
) -> Evaluation:
    model_id = outcome.get("model_id")
    if model_id is not None and db.get(NeuronModel, model_id) is None:
        model_id = None
    row = Evaluation(
        session_id=session_id,
        model_id=model_id,
        job_id=job_id,
        summary=dict(outcome["summary"]),
        per_site=list(outcome["per_site"]),
    )
    db.add(row)
    db.flush()
    return row


def evaluate_handler(ctx: JobContext) -> Committer:
    """The ``evaluate`` job: params {session_id (or the job's session), n_boot, seed, temperature}."""
    from server.db.session import transaction

    session_id = ctx.params.get("session_id", ctx.job.session_id)
    if session_id is None:
        raise JobError(
            "an evaluate job needs a session: set params.session_id or the job's session"
        )
    params = EvaluateParams.from_dict(ctx.params)
    ctx.progress(0.1, f"evaluating session {session_id}")
    with transaction(ctx.factory) as db:
        if db.get(RecordingSession, int(session_id)) is None:
            raise JobError(f"session {session_id} does not exist")
        outcome = evaluate_session(db, int(session_id), params)
    ctx.progress(0.9, "storing the evaluation")

    def commit(db: Session) -> dict[str, Any]:
        row = store_evaluation(db, int(session_id), outcome, ctx.job.id)
        return {"evaluation_id": row.id, "session_id": int(session_id), **outcome["summary"]}

    return commit
