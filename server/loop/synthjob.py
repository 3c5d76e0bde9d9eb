"""The ``synthesize`` job: stretch and one-hot images for target sites, stored as a stimulus set.

Targets default to the model's reliable, stable, well-predicted sites (noise-corrected EV at
least ``min_ncev``), best first, at most ``max_targets``. Every image becomes a stimulus of kind
``synthetic`` whose provenance holds the model id, target site, objective, synthesis settings
and every site's predicted response (model units, ``predicted``; the target's alone in
``predicted_target``). The images' PNG blobs are written before the commit (content-addressed,
so a retry rewrites the same files); the stimulus rows and the new set are written in the job's
commit transaction, so a crash never leaves half a set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.db.models import NeuronModel, StimulusKind, StimulusSet, StimulusSetMember
from server.jobs.queue import Committer, JobError, dependency_result
from server.stimuli.blobs import BlobStore
from server.stimuli.images import CanonicalImage, canonicalize

if TYPE_CHECKING:
    from models.synthesis import SynthesizedImage
    from server.worker import JobContext

ProgressFn = Callable[[float, str], None]
OBJECTIVES = ("stretch", "one_hot")


@dataclass(frozen=True)
class SynthParams:
    """Parameters of a synthesize job (``job.params``; unknown keys are refused)."""

    model_id: int | None = None  # default: the result of the fit job this one depends on
    targets: tuple[int, ...] | None = None  # site ids; default: chosen from the model's metrics
    max_targets: int = 8
    min_ncev: float = 0.3
    objectives: tuple[str, ...] = OBJECTIVES
    images_per_target: int = 2  # kept per target and objective (best of n_candidates)
    n_candidates: int = 2
    steps: int = 200
    size_px: int = 128
    seed: int = 0
    synthesis: dict[str, Any] = field(default_factory=dict)  # more SynthesisConfig fields
    set_name: str | None = None
    pause_before_commit_s: float = 0.0  # crash tests: first attempt holds its results this long
    extra: dict[str, Any] = field(default_factory=dict)  # loop bookkeeping

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> SynthParams:
        known = {f.name for f in fields(cls)} - {"extra"}
        loop_keys = {"loop", "trigger_session_id"}
        unknown = set(params) - known - loop_keys
        if unknown:
            raise JobError(
                f"unknown synthesize parameters {sorted(unknown)}; known: {', '.join(sorted(known))}"
            )
        values = {k: v for k, v in params.items() if k in known}
        if values.get("targets") is not None:
            values["targets"] = tuple(int(t) for t in values["targets"])
        if "objectives" in values:
            values["objectives"] = tuple(values["objectives"])
        values["extra"] = {k: params[k] for k in loop_keys if k in params}
        try:
            out = cls(**values)
        except TypeError as exc:
            raise JobError(f"bad synthesize parameters: {exc}") from None
        bad = set(out.objectives) - set(OBJECTIVES)
        if bad or not out.objectives:
            raise JobError(f"objectives must be among {OBJECTIVES}, got {list(out.objectives)}")
        return out


def choose_targets(model: NeuronModel, params: SynthParams) -> list[int]:
    """The model's reliable, stable sites with NC-EV >= min_ncev, best NC-EV first, capped."""
    fitted = set(model.site_ids)
    if params.targets is not None:
        unknown = [t for t in params.targets if t not in fitted]
        if unknown:
            raise JobError(
                f"targets {unknown} are not sites of model {model.id} "
                f"(it has {len(fitted)} sites: unstable or constant sites are left out)"
            )
        return list(params.targets)
    candidates = [
        s
        for s in (model.metrics or {}).get("sites", [])
        if s.get("site_id") in fitted
        and s.get("reliable")
        and not s.get("unstable")
        and s.get("ncev") is not None
        and s["ncev"] >= params.min_ncev
    ]
    candidates.sort(key=lambda s: (-float(s["ncev"]), int(s["site_id"])))
    chosen = [int(s["site_id"]) for s in candidates[: params.max_targets]]
    if not chosen:
        raise JobError(
            f"model {model.id} has no reliable, stable site with noise-corrected EV >= "
            f"{params.min_ncev}; lower min_ncev, pass targets explicitly, or record more data"
        )
    return chosen


@dataclass(frozen=True)
class SynthOutcome:
    model_id: int
    subject_id: int
    targets: list[int]
    images: list[tuple[CanonicalImage, dict[str, Any]]]  # (canonical PNG, provenance)


def _provenance(
    image: SynthesizedImage, model: NeuronModel, kind: str, job_id: int | None
) -> dict[str, Any]:
    site_ids = list(model.site_ids)
    predicted = {str(s): round(float(v), 5) for s, v in zip(site_ids, image.predicted, strict=True)}
    return {
        **image.provenance,
        "model_id": model.id,
        "subject_id": model.subject_id,
        "objective_kind": kind,
        "target_site": int(image.target_site),
        "rank": int(image.rank),
        "predicted": predicted,
        "predicted_target": predicted[str(image.target_site)],
        "predicted_units": (model.metrics or {}).get("units", ""),
        "score": float(image.score),
        "objective_value": float(image.objective_value),
        "job_id": job_id,
    }


def compute(
    model: NeuronModel,
    params: SynthParams,
    blobs: BlobStore,
    *,
    device: str = "cpu",
    job_id: int | None = None,
    progress: ProgressFn | None = None,
    start_stimuli: Mapping[int, str] | None = None,
) -> SynthOutcome:
    """Load the model, synthesize, write the PNG blobs; nothing is written to the database.

    ``start_stimuli`` (site id -> stimulus id, see ``best_natural_stimuli``) is used when the
    synthesis settings ask for ``start: "image"``: each target starts from that image."""
    from models.artifact import load_encoder
    from models.synthesis import SynthesisConfig, synthesize

    targets = choose_targets(model, params)
    weights = (model.params or {}).get("weights")
    try:
        encoder = load_encoder(blobs.root / model.artifact_path, weights=weights, device=device)
    except (OSError, ValueError) as exc:
        raise JobError(f"cannot load model {model.id} from {model.artifact_path}: {exc}") from None
    stats = (model.params or {}).get("natural_stats")
    base: dict[str, Any] = {
        "size_px": params.size_px,
        "steps": params.steps,
        "n_candidates": max(params.n_candidates, params.images_per_target),
        "keep_k": params.images_per_target,
        "seed": params.seed,
        "match_luminance": stats is not None,
        **params.synthesis,
    }
    try:
        config = SynthesisConfig(**base)
    except (TypeError, ValueError) as exc:
        raise JobError(f"bad synthesis settings {params.synthesis}: {exc}") from None
    starts = _start_images(config, targets, start_stimuli, blobs)
    images: list[tuple[CanonicalImage, dict[str, Any]]] = []
    for k, kind in enumerate(params.objectives):

        def on_step(step: int, total: int, _k: int = k, _kind: str = kind) -> None:
            if progress is not None:
                share = (_k + step / max(total, 1)) / len(params.objectives)
                progress(0.05 + 0.85 * share, f"{_kind}: step {step}/{total}")

        results = synthesize(
            encoder,
            targets,
            kind,
            config,
            tuple(stats) if stats is not None else None,
            device=device,
            progress=on_step,
            model_id=str(model.id),
            start_images=starts,
        )
        for image in results:
            canonical = canonicalize(image.png)
            blobs.put(canonical.sha256, canonical.png)
            provenance = _provenance(image, model, kind, job_id)
            if starts is not None and start_stimuli is not None:
                provenance["start_stimulus_id"] = start_stimuli[image.target_site]
            images.append((canonical, provenance))
    return SynthOutcome(model.id, model.subject_id, targets, images)


def best_natural_stimuli(db: Session, subject_id: int) -> dict[int, str]:
    """Per site, the natural image with the highest mean measured response over the subject's
    completed sessions (the start of ``start: "image"`` synthesis)."""
    import numpy as np

    from server.loop.policy import natural_means

    measured = natural_means(db, subject_id)
    if measured is None:
        return {}
    best = np.argmax(measured.means, axis=0)  # (sites,)
    return {site: measured.stimulus_ids[int(best[c])] for c, site in enumerate(measured.site_ids)}


def _start_images(
    config: Any,
    targets: list[int],
    start_stimuli: Mapping[int, str] | None,
    blobs: BlobStore,
) -> dict[int, Any] | None:
    """Each target's start image as a (1, size_px, size_px) tensor, when the config asks."""
    if config.start != "image":
        return None
    import io

    import numpy as np
    import torch
    from PIL import Image

    missing = [t for t in targets if not start_stimuli or t not in start_stimuli]
    if missing:
        raise JobError(
            f"start 'image' needs a natural image with recorded responses for sites {missing}"
        )
    assert start_stimuli is not None
    out: dict[int, Any] = {}
    for t in targets:
        with Image.open(io.BytesIO(blobs.get(start_stimuli[t]))) as img:
            gray = img.convert("L").resize(
                (config.size_px, config.size_px), Image.Resampling.BILINEAR
            )
            pixels = np.asarray(gray, dtype=np.float32) / 255.0
        out[t] = torch.from_numpy(pixels)[None]
    return out


def store(
    db: Session,
    blobs: BlobStore,
    outcome: SynthOutcome,
    *,
    set_name: str,
    description: str = "",
) -> StimulusSet:
    """Stimulus rows (one per distinct image) and the ordered set, in the caller's transaction.
    The blobs already exist (written by ``compute``), so ``store_stimulus`` writes no file."""
    from server.stimuli.service import store_stimulus

    if db.scalar(select(StimulusSet.id).where(StimulusSet.name == set_name)) is not None:
        raise JobError(f"a stimulus set named {set_name!r} already exists; choose another set_name")
    stimulus_set = StimulusSet(
        name=set_name, kind=StimulusKind.synthetic.value, description=description
    )
    members: list[StimulusSetMember] = []
    seen: set[str] = set()
    for canonical, provenance in outcome.images:
        if canonical.sha256 in seen:
            continue
        seen.add(canonical.sha256)
        name = (
            f"{provenance['objective_kind']}-site{provenance['target_site']}"
            f"-r{provenance['rank']}-model{outcome.model_id}"
        )
        store_stimulus(
            db,
            blobs,
            canonical,
            kind=StimulusKind.synthetic.value,
            name=name,
            provenance=provenance,
        )
        members.append(StimulusSetMember(position=len(members), stimulus_id=canonical.sha256))
    stimulus_set.members = members
    db.add(stimulus_set)
    db.flush()
    return stimulus_set


def _wants_image_start(params: SynthParams) -> bool:
    return params.synthesis.get("start") == "image"


def _model(db: Session, model_id: int) -> NeuronModel:
    model = db.get(NeuronModel, model_id)
    if model is None:
        raise JobError(f"model {model_id} does not exist")
    db.expunge(model)
    return model


def synthesize_for_model(
    factory: sessionmaker[Session],
    blobs: BlobStore,
    model_id: int,
    params: SynthParams | None = None,
    *,
    device: str = "cpu",
    set_name: str | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Synthesize and store in-process (no job row); returns the new stimulus set's id."""
    from server.db.session import transaction

    p = params or SynthParams()
    with transaction(factory) as db:
        model = _model(db, model_id)
        starts = best_natural_stimuli(db, model.subject_id) if _wants_image_start(p) else None
    outcome = compute(model, p, blobs, device=device, progress=progress, start_stimuli=starts)
    with transaction(factory) as db:
        name = set_name or p.set_name or f"synthetic-model{model_id}-seed{p.seed}"
        return store(db, blobs, outcome, set_name=name).id


def synthesize_handler(ctx: JobContext) -> Committer:
    """The ``synthesize`` job. When it belongs to the closed loop (``params.loop``), its commit
    also schedules the subject's next session (``server.loop.policy.after_synthesize``)."""
    from server.db.session import transaction

    params = SynthParams.from_dict(ctx.params)
    with transaction(ctx.factory) as db:
        model_id = params.model_id
        if model_id is None:
            model_id = dependency_result(db, ctx.job.id).get("model_id")
        if model_id is None:
            raise JobError(
                "a synthesize job needs a model: set params.model_id, or depend on a fit job"
            )
        model = _model(db, int(model_id))
        starts = best_natural_stimuli(db, model.subject_id) if _wants_image_start(params) else None
    ctx.progress(0.02, f"synthesizing with model {model.id}")
    outcome = compute(
        model,
        params,
        ctx.blobs,
        device=ctx.device,
        job_id=ctx.job.id,
        progress=ctx.progress,
        start_stimuli=starts,
    )
    if params.pause_before_commit_s > 0 and ctx.job.attempts == 1:
        ctx.progress(0.95, f"holding results {params.pause_before_commit_s:.0f} s before commit")
        ctx.sleep(params.pause_before_commit_s)
    set_name = params.set_name or f"synthetic-subject{model.subject_id}-job{ctx.job.id}"

    def commit(db: Session) -> dict[str, Any]:
        stimulus_set = store(
            db,
            ctx.blobs,
            outcome,
            set_name=set_name,
            description=f"job {ctx.job.id}: {', '.join(params.objectives)} images of sites "
            f"{outcome.targets} from model {model.id}",
        )
        result: dict[str, Any] = {
            "stimulus_set_id": stimulus_set.id,
            "model_id": model.id,
            "targets": outcome.targets,
            "n_images": len(stimulus_set.members),
        }
        if ctx.params.get("loop"):
            from server.loop.policy import after_synthesize

            scheduled = after_synthesize(db, ctx.job.id, ctx.params, stimulus_set, outcome.targets)
            result["next_session_id"] = scheduled
        return result

    return commit
