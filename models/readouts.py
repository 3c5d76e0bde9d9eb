"""Per-site readouts from backbone features, fitted for all sites at once as batched tensors.

* ``factorized`` (Bashivan et al. 2019, after Klindt et al. 2017): per site a spatial mask s[x, y],
  channel weights w[c] and a bias b; y_hat = sum_xy sum_c s[x, y] G[c, x, y] w[c] + b, with
  G = (F - mean_F) / scale_F the features centred per (c, x, y) and divided by one scalar, their
  typical across-image standard deviation (the same model class, as the bias absorbs the centring;
  it makes the lambdas independent of the backbone's activation scale).
  Loss: squared error (or Poisson) on z-scored targets + lambda_s * ||Laplacian(s)||^2 +
  lambda_d * (||s||^2 + ||w||^2); Adam on mini-batches; per-site early stopping on a held-out
  split. Defaults are the released code's (lambda_s 0.05, lambda_d 0.1, lr 0.01, batch 50).
  All sites (and, when ``lambda_grid`` is set, all sites x all grid points) are one set of
  tensors: the loss is a sum of independent per-unit terms and Adam is element-wise, so the
  batched fit equals fitting each site alone, only much faster.
* ``ridge``: PCA of the flattened features (closed form through the n x n Gram matrix), ridge in
  PCA space with the penalty chosen per site by exact leave-one-out error, folded back into one
  (features, sites) weight matrix.
* Ensembles: :func:`fit_readout` fits K members from different seeds and splits and stacks them;
  ``forward_members`` returns all members, (K, batch, sites).

Readouts hold only buffers (no trainable parameters) and return responses in the units of the
targets they were fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Progress = Callable[[int, int], None]
LossKind = Literal["mse", "poisson"]
ReadoutKind = Literal["factorized", "ridge"]


def laplacian_matrix(height: int, width: int) -> Tensor:
    """(P, P) matrix L with (mask.flatten() @ L.T) = 5-point Laplacian of the mask, zero padded."""
    size = height * width
    lap = torch.zeros(size, size)
    for i in range(height):
        for j in range(width):
            k = i * width + j
            lap[k, k] = -4.0
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                if 0 <= i + di < height and 0 <= j + dj < width:
                    lap[k, (i + di) * width + (j + dj)] = 1.0
    return lap


@dataclass(frozen=True)
class FactorizedConfig:
    """Factorized readout training. ``lambda_grid``: (lambda_s, lambda_d) pairs; when not empty
    every pair is fitted for every site (still one batched fit) and each site keeps the pair
    with the lowest validation loss. Early stopping evaluates the held-out split after every
    round of training: one epoch, or as many epochs as make ``min_steps_per_round`` optimizer
    steps when the data set is small; ``max_epochs`` and ``patience`` count rounds. A site's
    validation loss must drop by ``min_improvement`` (relative) to count as improved.
    ``compute_dtype="bfloat16"`` runs the two large products of
    each training step in bfloat16 (float32 accumulation); validation, early stopping and the
    fitted readout stay float32."""

    lambda_s: float = 0.05
    lambda_d: float = 0.1
    lr: float = 0.01
    batch_size: int = 50
    max_epochs: int = 60
    patience: int = 5
    min_steps_per_round: int = 25
    min_improvement: float = 1e-3
    val_fraction: float = 0.1
    loss: LossKind = "mse"
    lambda_grid: tuple[tuple[float, float], ...] = ()
    compute_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass(frozen=True)
class RidgeConfig:
    """PCA + ridge. ``alpha_grid`` is relative to the mean kept PCA eigenvalue; each site gets
    the alpha with the lowest leave-one-out error. Ensemble members (K > 1) are each fitted on a
    random ``subsample_fraction`` of the images."""

    n_components: int = 1000
    alpha_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    subsample_fraction: float = 0.9
    chunk_features: int = 8192


@dataclass(frozen=True)
class ReadoutConfig:
    kind: ReadoutKind = "factorized"
    n_members: int = 1
    factorized: FactorizedConfig = field(default_factory=FactorizedConfig)
    ridge: RidgeConfig = field(default_factory=RidgeConfig)


class Readout(nn.Module):
    """Base: maps features (batch, C, h, w) to responses (members, batch, sites) in target units.

    ``output`` is "linear" (z-scored targets, un-z-scored with ``target_offset``/``target_scale``)
    or "softplus" (Poisson fits: rate = softplus(linear) * target_scale).
    """

    kind: str = ""
    target_offset: Tensor
    target_scale: Tensor

    def __init__(self, target_offset: Tensor, target_scale: Tensor, output: str) -> None:
        super().__init__()
        if output not in ("linear", "softplus"):
            raise ValueError(f"output must be 'linear' or 'softplus'; got {output!r}")
        self.output = output
        self.register_buffer("target_offset", target_offset.float().clone())  # (sites,)
        self.register_buffer("target_scale", target_scale.float().clone())  # (sites,)

    @property
    def n_sites(self) -> int:
        return int(self.target_offset.shape[0])

    @property
    def n_members(self) -> int:
        raise NotImplementedError

    def _unscale(self, linear: Tensor) -> Tensor:
        if self.output == "softplus":
            linear = F.softplus(linear)
        return linear * self.target_scale + self.target_offset

    def forward_members(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        return self.forward_members(features).mean(0)  # (batch, sites)

    def spatial_masks(self) -> Tensor | None:
        return None


class FactorizedReadout(Readout):
    kind = "factorized"
    masks: Tensor
    channel_weights: Tensor
    bias: Tensor
    feature_scale: Tensor
    feature_mean: Tensor
    lambda_s: Tensor
    lambda_d: Tensor

    def __init__(
        self,
        masks: Tensor,  # (members, sites, h, w)
        channel_weights: Tensor,  # (members, sites, C)
        bias: Tensor,  # (members, sites)
        feature_scale: Tensor,  # () typical across-image std of the training features
        feature_mean: Tensor,  # (C, h, w) training-feature mean
        target_offset: Tensor,
        target_scale: Tensor,
        lambda_s: Tensor,  # (sites,) penalty used per site (mean over members)
        lambda_d: Tensor,  # (sites,)
        output: str = "linear",
    ) -> None:
        super().__init__(target_offset, target_scale, output)
        k, s = masks.shape[:2]
        if channel_weights.shape[:2] != (k, s) or bias.shape != (k, s):
            raise ValueError("masks, channel_weights and bias disagree on (members, sites)")
        self.register_buffer("masks", masks.float().clone())
        self.register_buffer("channel_weights", channel_weights.float().clone())
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("feature_scale", feature_scale.float().clone().reshape(()))
        self.register_buffer("feature_mean", feature_mean.float().clone())
        self.register_buffer("lambda_s", lambda_s.float().clone())
        self.register_buffer("lambda_d", lambda_d.float().clone())

    @property
    def n_members(self) -> int:
        return int(self.masks.shape[0])

    def forward_members(self, features: Tensor) -> Tensor:
        k, s, h, w = self.masks.shape
        b, c = features.shape[:2]
        if features.shape[1:] != (self.channel_weights.shape[2], h, w):
            raise ValueError(
                f"features {tuple(features.shape[1:])} do not match the readout "
                f"({self.channel_weights.shape[2]}, {h}, {w})"
            )
        linear = _centered_linear(
            features.reshape(b, c, h * w),
            self.masks.reshape(k * s, h * w),
            self.channel_weights.reshape(k * s, c),
            self.feature_mean.reshape(c, h * w),
        )  # (batch, members * sites)
        linear = linear / self.feature_scale + self.bias.reshape(1, k * s)
        return self._unscale(linear.reshape(b, k, s).transpose(0, 1))  # (members, batch, sites)

    def spatial_masks(self) -> Tensor:
        return self.masks.mean(0)  # (sites, h, w)


class RidgeReadout(Readout):
    kind = "ridge"
    weight: Tensor
    bias: Tensor
    alpha: Tensor

    def __init__(
        self,
        weight: Tensor,  # (members, C*h*w, sites)
        bias: Tensor,  # (members, sites)
        feature_shape: tuple[int, int, int],
        target_offset: Tensor,
        target_scale: Tensor,
        alpha: Tensor,  # (sites,) chosen penalty (mean over members)
    ) -> None:
        super().__init__(target_offset, target_scale, "linear")
        if weight.shape[1] != math.prod(feature_shape):
            raise ValueError(f"weight rows {weight.shape[1]} != prod{feature_shape}")
        self.feature_shape: tuple[int, int, int] = (
            int(feature_shape[0]),
            int(feature_shape[1]),
            int(feature_shape[2]),
        )
        # no copy: the (features, sites) matrix is the one large tensor of a ridge readout
        self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer("bias", bias.float().clone())
        self.register_buffer("alpha", alpha.float().clone())

    @property
    def n_members(self) -> int:
        return int(self.weight.shape[0])

    def forward_members(self, features: Tensor) -> Tensor:
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"features {tuple(features.shape[1:])} do not match the readout {self.feature_shape}"
            )
        flat = features.reshape(features.shape[0], -1)  # (batch, C*h*w)
        linear = torch.matmul(flat, self.weight) + self.bias[:, None, :]  # (members, batch, sites)
        return self._unscale(linear)


def _centered_linear(features: Tensor, masks: Tensor, weights: Tensor, mean: Tensor) -> Tensor:
    """As _factorized_linear on (features - mean), mean (C, P), without a centred copy."""
    offset = ((masks.float() @ mean.T) * weights.float()).sum(1)  # (U,)
    return _factorized_linear(features, masks, weights) - offset


def _factorized_linear(features: Tensor, masks: Tensor, weights: Tensor) -> Tensor:
    """features (b, C, P), masks (U, P), weights (U, C) -> (b, U) = sum_cp F m w."""
    b, c, p = features.shape
    pooled = (features.reshape(b * c, p) @ masks.T).reshape(b, c, -1)  # (b, C, U)
    return (pooled * weights.T.unsqueeze(0)).sum(1, dtype=torch.float32)  # (b, U)


def standardize_targets(targets: Tensor, loss: LossKind) -> tuple[Tensor, Tensor, Tensor]:
    """targets (n, sites) -> (scaled targets, offset (sites,), scale (sites,)).

    mse: z-scores; poisson: divides by the std only (targets stay non-negative)."""
    scale = targets.std(0, unbiased=False)
    if bool((scale <= 0).any()):
        bad = torch.nonzero(scale <= 0).flatten().tolist()
        raise ValueError(f"target columns {bad[:20]} have zero variance; drop those sites")
    offset = targets.mean(0) if loss == "mse" else torch.zeros_like(scale)
    return (targets - offset) / scale, offset, scale


def feature_moments(
    features: Tensor, rows: Tensor | None = None, chunk: int = 128
) -> tuple[Tensor, float]:
    """Mean over ``rows`` per feature (same shape as one row) and the root mean across-image
    variance (a scalar), computed in chunks (no full-size temporary)."""
    rows = torch.arange(features.shape[0]) if rows is None else rows
    total = torch.zeros(features.shape[1:], dtype=torch.float64, device=features.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(rows), chunk):
        block = features.index_select(0, rows[start : start + chunk].to(features.device)).double()
        total += block.sum(0)
        total_sq += (block * block).sum(0)
    n = max(len(rows), 1)
    mean = total / n
    variance = (total_sq / n - mean * mean).clamp_min(0.0)
    scale = math.sqrt(float(variance.mean()))
    return mean.float(), scale if scale > 0 else 1.0


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    if n < 4:
        raise ValueError(f"need at least 4 images to fit a factorized readout; got {n}")
    n_val = min(max(1, round(val_fraction * n)), n - 2)
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:], perm[:n_val]


def _data_loss(linear: Tensor, targets: Tensor, loss: LossKind, weight: Tensor) -> Tensor:
    """Mean over the batch per unit: (b, U), (b, U) -> (U,).

    Poisson: negative log-likelihood times ``weight`` (U,) = 2 x mean target, which gives it the
    curvature of the squared error on unit-variance targets, so lambda_s/lambda_d mean the same
    for both losses."""
    if loss == "mse":
        return ((linear - targets) ** 2).mean(0)
    rate = F.softplus(linear) + 1e-6
    return (rate - targets * torch.log(rate)).mean(0) * weight


@dataclass(frozen=True)
class FactorizedFit:
    readout: FactorizedReadout
    rounds: int  # evaluation rounds run (see FactorizedConfig)
    unit_rounds: int  # sum over rounds of the units still training
    epochs: int  # passes over the training split
    val_loss: Tensor  # (sites,) best held-out data loss per site
    lambda_s: Tensor  # (sites,)
    lambda_d: Tensor  # (sites,)


def _compact(
    params: list[Tensor], optimizer: torch.optim.Optimizer, keep: Tensor, lr: float
) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Keep rows ``keep`` of every parameter, carrying their Adam state over unchanged."""
    kept = [p.detach()[keep].clone().requires_grad_(True) for p in params]
    new_optimizer = torch.optim.Adam(kept, lr=lr)
    for old, new in zip(params, kept, strict=True):
        state = optimizer.state.get(old)
        if state:
            new_optimizer.state[new] = {
                key: (value[keep].clone() if key != "step" else value.clone())
                for key, value in state.items()
            }
    return kept, new_optimizer


def fit_factorized(
    features: Tensor,  # (N, C, h, w)
    targets: Tensor,  # (n, sites) in response units, one row per entry of ``rows``
    config: FactorizedConfig = FactorizedConfig(),
    *,
    rows: Tensor | None = None,  # (n,) feature rows to fit on; all N by default
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> FactorizedFit:
    """Fit one factorized readout per site, all sites as one batched problem.

    ``rows`` selects training images without copying the feature tensor (cross-validation)."""
    device = torch.device(device)
    n_all, c, h, w = features.shape
    rows = torch.arange(n_all) if rows is None else rows.long()
    n = len(rows)
    if targets.shape[0] != n:
        raise ValueError(f"{targets.shape[0]} target rows for {n} feature rows")
    p = h * w
    n_sites = targets.shape[1]
    generator = torch.Generator().manual_seed(seed)
    grid = config.lambda_grid or ((config.lambda_s, config.lambda_d),)
    n_grid = len(grid)
    units = n_grid * n_sites
    lam_s = torch.tensor([g[0] for g in grid], device=device).repeat_interleave(n_sites)  # (U,)
    lam_d = torch.tensor([g[1] for g in grid], device=device).repeat_interleave(n_sites)  # (U,)

    scaled, offset, scale = standardize_targets(targets.float(), config.loss)
    feats = features.reshape(n_all, c, p).to(device)  # (N, C, P); no copy on the CPU
    rows = rows.to(device)
    feature_mean, rms = feature_moments(feats, rows)  # (C, P), scalar
    y = scaled.to(device).repeat(1, n_grid)  # (n, U)
    train_idx, val_idx = _split(n, config.val_fraction, generator)

    masks = (torch.randn(units, p, generator=generator) * 0.01).to(device)
    weights = (torch.randn(units, c, generator=generator) * 0.01).to(device)
    loss_weight = 2.0 * y.mean(0)  # (U,) used by the Poisson loss only
    if config.loss == "poisson":  # start at the mean rate: softplus(bias) = mean target
        bias = torch.log(torch.expm1(y.mean(0).clamp_min(1e-3)))
    else:
        bias = torch.zeros(units, device=device)
    best = [t.clone() for t in (masks, weights, bias)]
    best_loss = torch.full((units,), math.inf, device=device)
    stale = torch.zeros(units, dtype=torch.long, device=device)

    # Units still training. A unit whose validation loss has not improved for ``patience``
    # rounds is retired (exactly per-site early stopping); when enough units have retired the
    # tensors are compacted so that later rounds cost only what the active units need.
    active = torch.arange(units, device=device)
    params = [t.clone().requires_grad_(True) for t in (masks, weights, bias)]
    optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=config.lr)
    y_active, weight_active = y, loss_weight
    lam_s_active, lam_d_active = lam_s, lam_d
    running = torch.ones(units, dtype=torch.bool, device=device)  # over the active units
    lap_t = laplacian_matrix(h, w).T.contiguous().to(device)  # (P, P)
    compute = torch.bfloat16 if config.compute_dtype == "bfloat16" else torch.float32
    buffer = torch.empty((config.batch_size, c, p), dtype=feats.dtype, device=device)

    epoch = 0
    unit_rounds = 0  # sum over rounds of the units trained (a cost measure)
    batches_per_epoch = math.ceil(len(train_idx) / config.batch_size)
    epochs_per_round = max(1, math.ceil(config.min_steps_per_round / batches_per_epoch))
    vidx = val_idx.to(device)
    for epoch in range(1, config.max_epochs + 1):
        m, wt, b = params
        unit_rounds += len(active)
        batches: list[Tensor] = []
        for _ in range(epochs_per_round):
            order = train_idx[torch.randperm(len(train_idx), generator=generator)]
            batches.extend(order.split(config.batch_size))
        for cpu_idx in batches:
            idx = cpu_idx.to(device)
            batch = torch.index_select(feats, 0, rows[idx], out=buffer[: len(idx)])  # (b, C, P)
            if compute == torch.float32:
                linear = _factorized_linear(batch, m, wt)
            else:
                linear = _factorized_linear(batch.to(compute), m.to(compute), wt.to(compute))
            centring = ((m @ feature_mean.T) * wt).sum(1)  # (U,)
            linear = (linear - centring) / rms + b  # (b, U)
            data = _data_loss(linear, y_active.index_select(0, idx), config.loss, weight_active)
            smooth = lam_s_active * (m @ lap_t).pow(2).sum(1)
            decay = lam_d_active * (m.pow(2).sum(1) + wt.pow(2).sum(1))
            optimizer.zero_grad(set_to_none=True)
            (data + smooth + decay).sum().backward()
            optimizer.step()
        with torch.no_grad():
            val = torch.zeros(len(active), device=device)
            for start in range(0, len(vidx), 256):
                chunk = vidx[start : start + 256]
                linear = _centered_linear(feats.index_select(0, rows[chunk]), m, wt, feature_mean)
                target = y_active.index_select(0, chunk)
                val += _data_loss(linear / rms + b, target, config.loss, weight_active) * len(chunk)
            val /= len(vidx)
            previous = best_loss[active]
            tolerance = config.min_improvement * previous.abs().nan_to_num(0.0, 0.0)
            improved = (val < previous - tolerance) & running  # (U_active,)
            best_loss[active] = torch.where(improved, val, previous)
            for kept, current in zip(best, params, strict=True):
                kept[active[improved]] = current.detach()[improved]
            stale[active] = torch.where(improved, 0, stale[active] + 1)
            running = stale[active] < config.patience
        if progress is not None:
            progress(epoch, config.max_epochs)
        n_running = int(running.sum())
        if n_running == 0:
            break
        if n_running <= 0.9 * len(active):
            params, optimizer = _compact(params, optimizer, running, config.lr)
            active = active[running]
            y_active, weight_active = y_active[:, running], weight_active[running]
            lam_s_active, lam_d_active = lam_s_active[running], lam_d_active[running]
            running = torch.ones(len(active), dtype=torch.bool, device=device)

    # pick, per site, the grid point with the lowest validation loss
    loss_grid = best_loss.view(n_grid, n_sites)
    choice = loss_grid.argmin(0)  # (sites,)
    unit = choice * n_sites + torch.arange(n_sites, device=device)
    # (mask, weights) and (-mask, -weights) predict the same: keep the mask summing positive,
    # so that masks of ensemble members can be averaged.
    sign = torch.where(best[0][unit].sum(1) < 0, -1.0, 1.0)[:, None]  # (sites, 1)
    readout = FactorizedReadout(
        masks=(best[0][unit] * sign).view(1, n_sites, h, w).cpu(),
        channel_weights=(best[1][unit] * sign).view(1, n_sites, c).cpu(),
        bias=best[2][unit].view(1, n_sites).cpu(),
        feature_scale=torch.tensor(rms),
        feature_mean=feature_mean.view(c, h, w).cpu(),
        target_offset=offset,
        target_scale=scale,
        lambda_s=lam_s[unit].cpu(),
        lambda_d=lam_d[unit].cpu(),
        output="linear" if config.loss == "mse" else "softplus",
    )
    return FactorizedFit(
        readout=readout,
        rounds=epoch,
        epochs=epoch * epochs_per_round,
        unit_rounds=unit_rounds,
        val_loss=best_loss.view(n_grid, n_sites).gather(0, choice[None]).squeeze(0).cpu(),
        lambda_s=lam_s[unit].cpu(),
        lambda_d=lam_d[unit].cpu(),
    )


def fit_ridge(
    features: Tensor,  # (N, C, h, w)
    targets: Tensor,  # (n, sites), one row per entry of ``rows``
    config: RidgeConfig = RidgeConfig(),
    *,
    rows: Tensor | None = None,  # (n,) feature rows to fit on; all N by default
    device: str | torch.device = "cpu",
) -> RidgeReadout:
    """PCA(n_components) + ridge for all sites at once, alpha per site by leave-one-out error."""
    device = torch.device(device)
    rows = torch.arange(features.shape[0]) if rows is None else rows.long()
    n = len(rows)
    if targets.shape[0] != n:
        raise ValueError(f"{targets.shape[0]} target rows for {n} feature rows")
    feature_shape = (int(features.shape[1]), int(features.shape[2]), int(features.shape[3]))
    if n < 3:
        raise ValueError(f"need at least 3 images to fit a ridge readout; got {n}")
    flat = features.reshape(features.shape[0], -1).to(device)  # (N, D); no copy on the CPU
    rows = rows.to(device)
    d = flat.shape[1]
    step = config.chunk_features
    every_row = n == flat.shape[0] and bool((rows == torch.arange(n, device=device)).all())

    def columns(start: int) -> Tensor:  # (n, step) a view when every row is used
        return flat[:, start : start + step] if every_row else flat[rows, start : start + step]

    mean = torch.cat([columns(start).mean(0) for start in range(0, d, step)])  # (D,)
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)  # centered X X^T
    for start in range(0, d, step):
        block = columns(start) - mean[start : start + step]
        gram += (block @ block.T).double()
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = int(min(config.n_components, n - 1, int((evals > evals[0] * 1e-10).sum())))
    if keep < 1:
        raise ValueError("features have no variance across images; cannot fit ridge")
    s2 = evals[:keep]  # (k,) squared singular values
    u = evecs[:, :keep]  # (n, k)

    scaled, offset, scale = standardize_targets(targets.double().to(device), "mse")
    uty = u.T @ scaled  # (k, sites)
    leverage_base = 1.0 / n  # the intercept's share of the hat matrix
    best_err = torch.full((scaled.shape[1],), math.inf, dtype=torch.float64, device=device)
    best_alpha = torch.zeros(scaled.shape[1], dtype=torch.float64, device=device)
    for rel in config.alpha_grid:
        alpha = rel * float(s2.mean())
        shrink = s2 / (s2 + alpha)  # (k,)
        fitted = u @ (shrink[:, None] * uty)  # (n, sites)
        hat = (u * u) @ shrink + leverage_base  # (n,)
        loo = ((scaled - fitted) / (1.0 - hat)[:, None]).pow(2).mean(0)  # (sites,)
        better = loo < best_err
        best_err = torch.where(better, loo, best_err)
        best_alpha = torch.where(better, torch.full_like(best_alpha, alpha), best_alpha)
    coef = u @ (uty / (s2[:, None] + best_alpha[None, :]))  # (n, sites): W = Xc^T coef
    coef32 = coef.float()
    weight = torch.empty(d, coef.shape[1], device=device)  # (D, sites)
    for start in range(0, d, step):
        block = columns(start) - mean[start : start + step]
        weight[start : start + step] = block.T @ coef32
    bias = -(mean @ weight)  # (sites,)
    return RidgeReadout(
        weight=weight[None].cpu(),
        bias=bias[None].cpu(),
        feature_shape=feature_shape,
        target_offset=offset.float().cpu(),
        target_scale=scale.float().cpu(),
        alpha=best_alpha.float().cpu(),
    )


def stack_members(readouts: list[Readout]) -> Readout:
    """Stack single fits into one ensemble readout (members along the first axis)."""
    first = readouts[0]
    if len(readouts) == 1:
        return first
    if isinstance(first, FactorizedReadout):
        parts = [r for r in readouts if isinstance(r, FactorizedReadout)]
        for r in parts:
            if not (
                torch.equal(r.target_offset, first.target_offset)
                and torch.equal(r.target_scale, first.target_scale)
                and torch.equal(r.feature_mean, first.feature_mean)
            ):
                raise ValueError("factorized ensemble members must be fitted on the same targets")
        return FactorizedReadout(
            masks=torch.cat([r.masks for r in parts]),
            channel_weights=torch.cat([r.channel_weights for r in parts]),
            bias=torch.cat([r.bias for r in parts]),
            feature_scale=first.feature_scale,
            feature_mean=first.feature_mean,
            target_offset=first.target_offset,
            target_scale=first.target_scale,
            lambda_s=torch.stack([r.lambda_s for r in parts]).mean(0),
            lambda_d=torch.stack([r.lambda_d for r in parts]).mean(0),
            output=first.output,
        )
    if isinstance(first, RidgeReadout):
        ridge = [r for r in readouts if isinstance(r, RidgeReadout)]
        # Members fitted on different subsets z-scored differently: re-express every member in
        # the first member's target units (exact, the output is linear).
        weights: list[Tensor] = []
        biases: list[Tensor] = []
        for member in ridge:
            ratio = member.target_scale / first.target_scale  # (sites,)
            weights.append(member.weight * ratio)
            shifted = member.bias * member.target_scale + member.target_offset
            biases.append((shifted - first.target_offset) / first.target_scale)
        return RidgeReadout(
            weight=torch.cat(weights),
            bias=torch.cat(biases),
            feature_shape=first.feature_shape,
            target_offset=first.target_offset,
            target_scale=first.target_scale,
            alpha=torch.stack([r.alpha for r in ridge]).mean(0),
        )
    raise TypeError(f"cannot stack readouts of type {type(first).__name__}")


def fit_readout(
    features: Tensor,  # (N, C, h, w)
    targets: Tensor,  # (n, sites), one row per entry of ``rows``
    config: ReadoutConfig = ReadoutConfig(),
    *,
    rows: Tensor | None = None,  # (n,) feature rows to fit on; all N by default
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> Readout:
    """Fit ``config.n_members`` readouts (seeds seed, seed+1, ...) and stack them."""
    if config.n_members < 1:
        raise ValueError(f"n_members must be >= 1; got {config.n_members}")
    rows = torch.arange(features.shape[0]) if rows is None else rows.long()
    members: list[Readout] = []
    for k in range(config.n_members):
        if config.kind == "factorized":
            fit = fit_factorized(
                features, targets, config.factorized, rows=rows, seed=seed + k, device=device
            )
            members.append(fit.readout)
        elif config.kind == "ridge":
            if config.n_members == 1:
                members.append(fit_ridge(features, targets, config.ridge, rows=rows, device=device))
            else:
                rng = np.random.default_rng(seed + k)
                size = max(3, round(config.ridge.subsample_fraction * len(rows)))
                pick = torch.from_numpy(np.sort(rng.choice(len(rows), size=size, replace=False)))
                members.append(
                    fit_ridge(features, targets[pick], config.ridge, rows=rows[pick], device=device)
                )
        else:
            raise ValueError(f"unknown readout kind {config.kind!r}; use 'factorized' or 'ridge'")
        if progress is not None:
            progress(k + 1, config.n_members)
    return stack_members(members)


@torch.no_grad()
def predict_features(
    readout: Readout,
    features: Tensor,  # (N, C, h, w)
    rows: Tensor | None = None,  # (n,) rows to predict; all by default
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Ensemble-mean predictions (n, sites) on the CPU, in chunks (no full-size temporaries)."""
    device = torch.device(device)
    rows = torch.arange(features.shape[0]) if rows is None else rows.long()
    readout = readout.to(device)
    out = [
        readout(features.index_select(0, rows[start : start + batch_size]).to(device)).cpu()
        for start in range(0, len(rows), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, readout.n_sites)
