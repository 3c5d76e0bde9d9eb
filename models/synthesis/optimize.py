"""The optimisation loop: one batch of images, each row with its own target, ascended together.

Per step: parameterisation -> images -> (gradient blur on the way back) -> jittered copies ->
encoder -> objective per row -> minus penalties -> one backward -> per-image update.
Updates are per image (the gradient is normalised by each image's own std, plateaus are
detected per image), so an image's result does not depend on its batch-mates beyond
floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from models.synthesis import regularizers as reg
from models.synthesis.config import SynthesisConfig
from models.synthesis.objectives import Objective, Responses
from models.synthesis.param import make_param
from models.synthesis.protocol import EncoderLike
from models.synthesis.transforms import apply_jitter, draw_jitter


@dataclass(frozen=True)
class BatchResult:
    images: Tensor  # (batch, C, H, W) in [0, 1], detached, on the optimisation device
    trace: Tensor  # (steps_run, batch) objective per step (mean over jittered copies), CPU
    steps_run: list[int]  # per image: steps until it plateaued, or config.steps


class _BlurGrad(torch.autograd.Function):
    """Identity forward; Gaussian-blurred gradient backward."""

    @staticmethod
    def forward(ctx: Any, images: Tensor, sigma_px: float) -> Tensor:
        ctx.sigma_px = sigma_px
        return images.view_as(images)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        return reg.blur(grads[0], ctx.sigma_px), None


def predict(
    encoder: EncoderLike, images: Tensor, need_members: bool
) -> tuple[Tensor, Tensor | None]:
    """(batch, C, H, W) -> mean (batch, sites), members (members, batch, sites) or None."""
    if need_members:
        members = encoder.forward_members(images)
        return members.mean(dim=0), members
    return encoder.forward(images), None


def make_responses(
    encoder: EncoderLike,
    images: Tensor,
    target_col: Tensor,
    columns: Mapping[int, int],
    need_members: bool,
) -> Responses:
    mean, members = predict(encoder, images, need_members)
    return Responses(
        mean=mean,
        members=members,
        target_col=target_col,
        columns=columns,
        natural_mean=encoder.natural_mean,
        natural_std=encoder.natural_std,
    )


def optimize_batch(
    encoder: EncoderLike,
    objective: Objective,
    starts: Tensor,
    target_col: Tensor,
    generators: Sequence[torch.Generator],
    config: SynthesisConfig,
    on_step: Callable[[int], None] | None = None,
) -> BatchResult:
    """Ascend ``objective`` from ``starts`` (batch, C, H, W) in [0, 1].

    target_col: (batch,) output column of each row's target; generators: one per row, used
    for that row's jitter only.
    """
    batch = starts.shape[0]
    device = starts.device
    columns = {site: col for col, site in enumerate(encoder.site_ids)}
    copies = config.jitter_copies
    jitter = config.jitter
    target_rep = target_col.repeat(copies)  # (copies*batch,), copy-major
    need_members = objective.needs_members

    param = make_param(config.parameterization, starts)
    leaf = param.tensor
    adam = torch.optim.Adam([leaf], lr=config.lr) if config.optimizer == "adam" else None

    active = torch.ones(batch, dtype=torch.bool, device=device)
    best = torch.full((batch,), -torch.inf, device=device)
    since_best = torch.zeros(batch, dtype=torch.long, device=device)
    steps_run = torch.full((batch,), config.steps, dtype=torch.long, device=device)
    trace: list[Tensor] = []
    per_row = (batch,) + (1,) * (leaf.dim() - 1)

    for step in range(config.steps):
        images = param.images()  # (batch, C, H, W)
        if config.grad_blur_sigma_px > 0:
            images = _BlurGrad.apply(images, config.grad_blur_sigma_px)
        if jitter.active:
            draw = draw_jitter(generators, copies, config.size_px, jitter)
            views = apply_jitter(images, draw, jitter)  # (copies*batch, C, H, W)
        elif copies > 1:
            views = images.repeat(copies, 1, 1, 1)
        else:
            views = images
        responses = make_responses(encoder, views, target_rep, columns, need_members)
        values = objective(responses).view(copies, batch)  # (copies, batch)
        score = values.mean(dim=0)  # (batch,)
        total = score
        if config.tv_weight > 0:
            total = total - config.tv_weight * reg.total_variation(images)
        if config.contrast_weight > 0:
            total = total - config.contrast_weight * reg.contrast_energy(images)
        if config.response_variation_weight > 0:
            total = total - config.response_variation_weight * reg.response_variation(values)
        loss = -(total * active).sum()
        (grad,) = torch.autograd.grad(loss, [leaf])
        trace.append(score.detach())

        with torch.no_grad():
            before = leaf.detach().clone() if adam is not None else None
            if adam is not None:
                leaf.grad = grad
                adam.step()
                leaf.grad = None
            else:
                std = grad.flatten(1).std(dim=1).clamp_min(1e-12).view(per_row)
                leaf.sub_(config.lr * grad / std * active.view(per_row))
            if before is not None:
                leaf.copy_(torch.where(active.view(per_row), leaf, before))
            param.project()

        if config.plateau_patience_steps is not None:
            current = score.detach()
            improved = current > best + config.plateau_min_gain
            best = torch.where(improved, current, best)
            since_best = torch.where(improved, torch.zeros_like(since_best), since_best + 1)
            stalled = active & (since_best >= config.plateau_patience_steps)
            steps_run = torch.where(stalled, torch.full_like(steps_run, step + 1), steps_run)
            active = active & ~stalled
        if on_step is not None:
            on_step(step + 1)
        if config.plateau_patience_steps is not None and not bool(active.any()):
            break

    with torch.no_grad():
        final = param.images().detach().clone()
    return BatchResult(
        images=final,
        trace=torch.stack(trace).cpu(),
        steps_run=[int(s) for s in steps_run.tolist()],
    )
