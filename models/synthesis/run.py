"""``synthesize``: the entry the worker and the CLI call.

All targets x candidates are optimised as one batch (split into chunks of
``config.chunk_images``), then each image is matched to the natural luminance and contrast,
quantised to 8 bits, encoded as PNG, and scored again from the decoded pixels, so the
predicted responses are those of the image that will be shown.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from models.synthesis import regularizers as reg
from models.synthesis.config import SynthesisConfig
from models.synthesis.objectives import Objective, Responses, ensemble, from_kind
from models.synthesis.optimize import BatchResult, make_responses, optimize_batch, predict
from models.synthesis.param import noise_start, rf_masked_start
from models.synthesis.protocol import EncoderLike
from models.synthesis.select import best_k, best_natural

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class SynthesizedImage:
    target_site: int
    rank: int  # 0 = best of this target's candidates
    candidate_index: int
    png: bytes  # 8-bit grayscale (or RGB) PNG, the image to show
    predicted: np.ndarray  # (sites,) ensemble-mean prediction for the PNG's pixels
    objective_value: float  # the optimised objective on the PNG (ranking key)
    score: float  # the named objective on the ensemble mean (one-hot: control score)
    natural_best_score: float | None  # same score for the best natural reference image
    natural_best_index: int | None  # which natural reference image that was
    trace: np.ndarray  # (steps_run,) objective per step during optimisation
    provenance: dict[str, Any]


def image_seed(seed: int, target_site: int, candidate_index: int) -> int:
    """Seed of one image's generator: depends only on (seed, target, candidate)."""
    entropy = [seed % (1 << 64), target_site % (1 << 64), candidate_index]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1  # < 2**63


def encode_png(image: Tensor) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes; the same pixels always give the same bytes."""
    pixels = to_uint8(image)
    buffer = io.BytesIO()  # (H, W) uint8 -> mode L, (H, W, 3) uint8 -> mode RGB
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(
        buffer, format="PNG", compress_level=6
    )
    return buffer.getvalue()


def to_uint8(image: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8, rounded to nearest."""
    scaled = (image.detach().cpu().float().clamp(0.0, 1.0) * 255.0).round()
    return scaled.to(torch.uint8).permute(1, 2, 0).numpy()


def decode_png(data: bytes) -> Tensor:
    """PNG bytes -> (C, H, W) float in [0, 1]."""
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255.0


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the duration, without NaN-filling every new tensor (slow)."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    if enabled:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill  # type: ignore[attr-defined]


def synthesize(
    encoder: EncoderLike,
    targets: Sequence[int],
    objective: str | Objective = "stretch",
    config: SynthesisConfig | None = None,
    natural_stats: tuple[float, float] | None = None,
    *,
    natural_reference: Tensor | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    model_id: str = "",
    start_images: Mapping[int, Tensor] | None = None,
) -> list[SynthesizedImage]:
    """Synthesize ``config.keep_k`` images per target site, best first, targets in order.

    objective: "stretch" | "one_hot" | "suppress" (applied to each target), or any Objective
        (e.g. ``one_hot() - 0.2 * suppress(17)``, ``pattern({site: z_state})``).
    natural_stats: (mean luminance, RMS contrast) of the natural set in [0, 1] units; required
        while ``config.match_luminance`` is on.
    natural_reference: natural images (n, C, H, W) in [0, 1] or their predictions (n, sites);
        when given, each result carries the best natural image's score for comparison.
    device: must be the encoder's device (move the encoder first); None means the encoder's.
    progress: called as progress(step, total) after every optimisation step.
    start_images: with ``config.start == "image"``, one (C, H, W) image in [0, 1] per target
        site at ``size_px`` (e.g. the target's best natural image); each candidate starts from
        it plus uniform noise of amplitude ``config.start_noise``.
    """
    cfg = config if config is not None else SynthesisConfig()
    run_device = _check_device(encoder, device)
    targets = [int(t) for t in targets]
    named = from_kind(objective, cfg.temperature) if isinstance(objective, str) else objective
    optimised = named
    if cfg.ensemble_spread_weight > 0:
        if encoder.n_members < 2:
            raise ValueError(
                f"ensemble_spread_weight > 0 needs an ensemble encoder; this one has "
                f"n_members={encoder.n_members}"
            )
        optimised = ensemble(named, cfg.ensemble_spread_weight)
    _check_inputs(encoder, targets, optimised, cfg, natural_stats)
    starts_by_target = _check_start_images(targets, cfg, start_images)
    masks = _rf_masks(encoder, cfg) if cfg.start == "rf_noise" else None
    columns = {site: col for col, site in enumerate(encoder.site_ids)}

    jobs = [(t, c) for t in targets for c in range(cfg.n_candidates)]
    seeds = [image_seed(cfg.seed, t, c) for t, c in jobs]
    chunks = [
        list(range(i, min(i + cfg.chunk_images, len(jobs))))
        for i in range(0, len(jobs), cfg.chunk_images)
    ]
    total_steps = len(chunks) * cfg.steps

    finals: list[_Final] = []
    with _deterministic(cfg.deterministic and run_device.type == "cpu"):
        for chunk_no, chunk in enumerate(chunks):

            def on_step(step: int, _base: int = chunk_no * cfg.steps) -> None:
                if progress is not None:
                    progress(_base + step, total_steps)

            result = _optimize_chunk(
                encoder,
                optimised,
                [jobs[i] for i in chunk],
                [seeds[i] for i in chunk],
                columns,
                masks,
                cfg,
                run_device,
                on_step,
                starts_by_target,
            )
            finals.extend(
                _finish_chunk(
                    encoder,
                    optimised,
                    named,
                    result,
                    [jobs[i] for i in chunk],
                    columns,
                    cfg,
                    natural_stats,
                    run_device,
                )
            )
            if progress is not None and result.trace.shape[0] < cfg.steps:
                progress((chunk_no + 1) * cfg.steps, total_steps)  # chunk stopped on plateau

        natural = _natural_scores(encoder, named, targets, columns, natural_reference, run_device)

    values = torch.tensor([f.objective_value for f in finals]).view(len(targets), cfg.n_candidates)
    keep = best_k(values, cfg.keep_k)  # (targets, k)
    out: list[SynthesizedImage] = []
    for t_index, target in enumerate(targets):
        for rank, cand in enumerate(keep[t_index].tolist()):
            job_index = t_index * cfg.n_candidates + cand
            final = finals[job_index]
            provenance = {
                "model_id": model_id,
                "objective": optimised.describe(),
                "target_site": target,
                "candidate_index": cand,
                "n_candidates": cfg.n_candidates,
                "seed": cfg.seed,
                "image_seed": seeds[job_index],
                "steps": final.steps_run,
                "config": asdict(cfg),
                "natural_stats": list(natural_stats) if natural_stats is not None else None,
                "encoder": {
                    "n_sites": len(encoder.site_ids),
                    "n_members": encoder.n_members,
                    "input_size": encoder.input_size,
                },
                "device": str(run_device),
                "torch": torch.__version__,
            }
            nat_score, nat_index = natural[t_index] if natural is not None else (None, None)
            out.append(
                SynthesizedImage(
                    target_site=target,
                    rank=rank,
                    candidate_index=cand,
                    png=final.png,
                    predicted=final.predicted,
                    objective_value=final.objective_value,
                    score=final.score,
                    natural_best_score=nat_score,
                    natural_best_index=nat_index,
                    trace=final.trace,
                    provenance=provenance,
                )
            )
    return out


@dataclass(frozen=True)
class _Final:
    png: bytes
    predicted: np.ndarray  # (sites,)
    objective_value: float
    score: float
    trace: np.ndarray  # (steps_run,)
    steps_run: int


def _check_device(encoder: EncoderLike, device: str | torch.device | None) -> torch.device:
    encoder_device = encoder.device
    if device is None:
        return encoder_device
    wanted = torch.device(device)
    same = wanted.type == encoder_device.type and (
        wanted.index is None or wanted.index == encoder_device.index
    )
    if not same:
        raise ValueError(
            f"synthesis device {wanted} differs from the encoder's {encoder_device}; "
            f"move the encoder first (encoder.to({str(wanted)!r}))"
        )
    return encoder_device


def _check_inputs(
    encoder: EncoderLike,
    targets: list[int],
    objective: Objective,
    cfg: SynthesisConfig,
    natural_stats: tuple[float, float] | None,
) -> None:
    if not targets:
        raise ValueError("targets is empty; pass at least one site id")
    if len(set(targets)) != len(targets):
        raise ValueError("targets contains duplicate site ids; use n_candidates for more images")
    known = set(encoder.site_ids)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(
            f"unknown target site id(s) {unknown}: the encoder predicts {len(known)} sites "
            f"(ids {min(known)}..{max(known)}); refit or pick fitted sites"
        )
    if cfg.size_px < encoder.min_image_size:
        raise ValueError(
            f"size_px={cfg.size_px} is smaller than the encoder's min_image_size="
            f"{encoder.min_image_size}; use size_px >= {encoder.min_image_size}"
        )
    has_stats = encoder.natural_mean is not None and encoder.natural_std is not None
    objective.check(encoder.site_ids, targets, has_stats)
    if cfg.match_luminance and natural_stats is None:
        raise ValueError(
            "luminance/contrast matching is on but natural_stats is None; pass "
            "natural_stats=(mean_luminance, rms_contrast) of the natural set, or set "
            "SynthesisConfig(match_luminance=False)"
        )


def _check_start_images(
    targets: list[int], cfg: SynthesisConfig, start_images: Mapping[int, Tensor] | None
) -> dict[int, Tensor] | None:
    """The start image of every target as a float (C, size_px, size_px) tensor, or None."""
    if cfg.start != "image":
        if start_images is not None:
            raise ValueError("start_images were given but config.start is not 'image'")
        return None
    if start_images is None:
        raise ValueError(
            "config.start='image' needs start_images: one (C, H, W) image in [0, 1] per target"
        )
    missing = [t for t in targets if t not in start_images]
    if missing:
        raise ValueError(f"no start image for target site(s) {missing}")
    want = (cfg.channels, cfg.size_px, cfg.size_px)
    out: dict[int, Tensor] = {}
    for t in targets:
        image = torch.as_tensor(start_images[t], dtype=torch.float32).cpu()
        if image.ndim == 2:
            image = image[None]
        if tuple(image.shape) != want:
            raise ValueError(
                f"start image of site {t} has shape {tuple(image.shape)}; expected {want} "
                "(channels, size_px, size_px)"
            )
        if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
            raise ValueError(f"start image of site {t} must be finite and within [0, 1]")
        out[t] = image
    return out


def _rf_masks(encoder: EncoderLike, cfg: SynthesisConfig) -> Tensor:
    masks = encoder.spatial_masks()
    if masks is None:
        raise ValueError(
            "start='rf_noise' needs readout spatial masks but this encoder has none "
            "(e.g. a ridge readout); use start='noise'"
        )
    return masks.detach().cpu()


def _optimize_chunk(
    encoder: EncoderLike,
    objective: Objective,
    jobs: list[tuple[int, int]],
    seeds: list[int],
    columns: dict[int, int],
    masks: Tensor | None,
    cfg: SynthesisConfig,
    device: torch.device,
    on_step: Callable[[int], None],
    start_images: Mapping[int, Tensor] | None = None,
) -> BatchResult:
    """Optimise one chunk; on CUDA out-of-memory, split it in halves and retry."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    starts = []
    for (target, _), gen in zip(jobs, generators, strict=True):
        noise = noise_start(gen, cfg.channels, cfg.size_px)  # (C, H, W)
        if start_images is not None:
            image = start_images[target]
            starts.append((image + cfg.start_noise * (noise - 0.5)).clamp(0.0, 1.0))
        elif masks is not None:
            starts.append(rf_masked_start(noise, masks[columns[target]]))
        else:
            starts.append(noise)
    start = torch.stack(starts).to(device)  # (batch, C, H, W)
    target_col = torch.tensor([columns[t] for t, _ in jobs], device=device)
    try:
        return optimize_batch(encoder, objective, start, target_col, generators, cfg, on_step)
    except torch.cuda.OutOfMemoryError:
        if len(jobs) == 1:
            raise
        torch.cuda.empty_cache()
    half = len(jobs) // 2
    # generators were advanced; rebuild them from the seeds inside the recursive calls
    first = _optimize_chunk(
        encoder,
        objective,
        jobs[:half],
        seeds[:half],
        columns,
        masks,
        cfg,
        device,
        on_step,
        start_images,
    )
    second = _optimize_chunk(
        encoder,
        objective,
        jobs[half:],
        seeds[half:],
        columns,
        masks,
        cfg,
        device,
        on_step,
        start_images,
    )
    steps = max(first.trace.shape[0], second.trace.shape[0])
    return BatchResult(
        images=torch.cat([first.images, second.images]),
        trace=torch.cat([_pad_trace(first.trace, steps), _pad_trace(second.trace, steps)], 1),
        steps_run=first.steps_run + second.steps_run,
    )


def _pad_trace(trace: Tensor, steps: int) -> Tensor:
    if trace.shape[0] == steps:
        return trace
    pad = trace[-1:].expand(steps - trace.shape[0], -1)
    return torch.cat([trace, pad])


def _finish_chunk(
    encoder: EncoderLike,
    optimised: Objective,
    named: Objective,
    result: BatchResult,
    jobs: list[tuple[int, int]],
    columns: dict[int, int],
    cfg: SynthesisConfig,
    natural_stats: tuple[float, float] | None,
    device: torch.device,
) -> list[_Final]:
    images = result.images
    if cfg.match_luminance:
        assert natural_stats is not None
        images = reg.match_luminance_contrast(
            images, natural_stats[0], natural_stats[1], cfg.match_tolerance
        )
    pngs = [encode_png(img) for img in images]
    shown = torch.stack([decode_png(p) for p in pngs]).to(device)  # (batch, C, H, W)
    target_col = torch.tensor([columns[t] for t, _ in jobs], device=device)
    with torch.no_grad():
        responses = make_responses(encoder, shown, target_col, columns, optimised.needs_members)
        values = optimised(responses)  # (batch,)
        scores = named(responses) if not named.needs_members else values
    predicted = responses.mean.double().cpu().numpy()
    trace = result.trace.double().numpy()  # (steps, batch)
    return [
        _Final(
            png=pngs[i],
            predicted=predicted[i],
            objective_value=float(values[i]),
            score=float(scores[i]),
            trace=trace[: result.steps_run[i], i].copy(),
            steps_run=result.steps_run[i],
        )
        for i in range(len(jobs))
    ]


def _natural_scores(
    encoder: EncoderLike,
    named: Objective,
    targets: list[int],
    columns: dict[int, int],
    reference: Tensor | None,
    device: torch.device,
    batch_size: int = 64,
) -> list[tuple[float, int]] | None:
    """Best natural score per target: [(score, image index)] in target order, or None."""
    if reference is None:
        return None
    n_sites = len(encoder.site_ids)
    if reference.dim() == 2:
        if reference.shape[1] != n_sites:
            raise ValueError(
                f"natural_reference predictions have {reference.shape[1]} columns; the encoder "
                f"predicts {n_sites} sites"
            )
        if named.needs_members:
            raise ValueError(
                "this objective needs per-member predictions: pass natural "
                "images (n, C, H, W) as natural_reference, not predictions"
            )
        means, members = reference.to(device).float(), None
    elif reference.dim() == 4:
        mean_parts, member_parts = [], []
        with torch.no_grad():
            for i in range(0, reference.shape[0], batch_size):
                chunk = reference[i : i + batch_size].to(device)
                mean, mem = predict(encoder, chunk, named.needs_members)
                mean_parts.append(mean)
                if mem is not None:
                    member_parts.append(mem)
        means = torch.cat(mean_parts)  # (n, sites)
        members = torch.cat(member_parts, dim=1) if member_parts else None  # (K, n, sites)
    else:
        raise ValueError("natural_reference must be images (n, C, H, W) or predictions (n, sites)")
    n_images = means.shape[0]
    rows = []
    with torch.no_grad():
        for target in targets:
            target_col = torch.full((n_images,), columns[target], device=device)
            responses = Responses(
                means, members, target_col, columns, encoder.natural_mean, encoder.natural_std
            )
            rows.append(named(responses))  # (n_images,)
    best, index = best_natural(torch.stack(rows))  # (targets,)
    return [(float(b), int(i)) for b, i in zip(best.tolist(), index.tolist(), strict=True)]
