"""Synthesis objectives: functions of predicted responses, one value per batch row.

Every row of a batch has its own target site, so all targets x candidates of a run are
optimised together. An objective built without a site (``stretch()``) follows each row's
target; one built with a site (``stretch(12)``) uses that site for every row.

Objectives compose: ``one_hot() - 0.1 * suppress(7)``, ``2 * stretch() + pattern(z)``.
Higher is better; the optimiser ascends.

Scores (Bashivan et al. 2019):
- stretch: the target's prediction;
- one-hot population: softmax over sites at the target, on predictions z-scored with each
  site's natural-image mean and std, divided by a temperature;
- pattern: negative mean squared error between the z-scored population and a requested state.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Responses:
    """Predicted responses of one batch together with what objectives need to score them."""

    mean: Tensor  # (batch, sites) ensemble-mean prediction
    members: Tensor | None  # (members, batch, sites), present when an objective needs it
    target_col: Tensor  # (batch,) long: output column of each row's target site
    columns: Mapping[int, int]  # site id -> output column
    natural_mean: Tensor | None  # (sites,)
    natural_std: Tensor | None  # (sites,)

    def zscored(self) -> Tensor:
        """(batch, sites) predictions in units of each site's natural-image std."""
        if self.natural_mean is None or self.natural_std is None:
            raise ValueError(
                "this objective z-scores predictions but the encoder has no natural-image "
                "statistics; call encoder.set_natural_stats(natural_images) first"
            )
        return (self.mean - self.natural_mean) / self.natural_std

    def column_of(self, site: int | None) -> Tensor:
        """(batch,) column per row: the given site's for every row, else each row's target."""
        if site is None:
            return self.target_col
        return torch.full_like(self.target_col, self.columns[site])

    def with_mean(self, mean: Tensor) -> Responses:
        return Responses(
            mean=mean,
            members=None,
            target_col=self.target_col,
            columns=self.columns,
            natural_mean=self.natural_mean,
            natural_std=self.natural_std,
        )


class Objective(abc.ABC):
    """A differentiable score per batch row; compose with ``+``, ``-`` and scalar ``*``."""

    @abc.abstractmethod
    def __call__(self, responses: Responses) -> Tensor:
        """(batch,) score per row."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable name and parameters, for provenance."""

    def children(self) -> tuple[Objective, ...]:
        return ()

    def fixed_sites(self) -> set[int]:
        """Site ids this objective names explicitly (not the per-row targets)."""
        sites: set[int] = set()
        for child in self.children():
            sites |= child.fixed_sites()
        return sites

    @property
    def needs_natural_stats(self) -> bool:
        return any(child.needs_natural_stats for child in self.children())

    @property
    def needs_members(self) -> bool:
        return any(child.needs_members for child in self.children())

    def check(
        self, site_ids: Sequence[int], targets: Sequence[int], has_natural_stats: bool
    ) -> None:
        """Raise ValueError when this objective cannot be evaluated on the given encoder."""
        known = set(site_ids)
        unknown = sorted(self.fixed_sites() - known)
        if unknown:
            raise ValueError(
                f"objective names site(s) {unknown} that the encoder does not predict; "
                f"known site ids: {_preview(site_ids)}"
            )
        if self.needs_natural_stats and not has_natural_stats:
            raise ValueError(
                f"objective {self.describe()['kind']!r} z-scores predictions but the encoder "
                "has no natural-image statistics; call encoder.set_natural_stats(natural_images)"
            )
        for child in self.children():
            child.check(site_ids, targets, has_natural_stats)

    def __add__(self, other: Objective) -> Objective:
        return Sum((self, other))

    def __sub__(self, other: Objective) -> Objective:
        return Sum((self, Scaled(other, -1.0)))

    def __mul__(self, factor: float) -> Objective:
        return Scaled(self, float(factor))

    def __rmul__(self, factor: float) -> Objective:
        return Scaled(self, float(factor))

    def __neg__(self) -> Objective:
        return Scaled(self, -1.0)


class Sum(Objective):
    def __init__(self, terms: tuple[Objective, ...]) -> None:
        self.terms = terms

    def __call__(self, responses: Responses) -> Tensor:
        total = self.terms[0](responses)
        for term in self.terms[1:]:
            total = total + term(responses)
        return total

    def describe(self) -> dict[str, Any]:
        return {"kind": "sum", "terms": [t.describe() for t in self.terms]}

    def children(self) -> tuple[Objective, ...]:
        return self.terms


class Scaled(Objective):
    def __init__(self, inner: Objective, factor: float) -> None:
        self.inner = inner
        self.factor = factor

    def __call__(self, responses: Responses) -> Tensor:
        return self.factor * self.inner(responses)

    def describe(self) -> dict[str, Any]:
        return {"kind": "scaled", "factor": self.factor, "inner": self.inner.describe()}

    def children(self) -> tuple[Objective, ...]:
        return (self.inner,)


class _SiteObjective(Objective):
    def __init__(self, site: int | None) -> None:
        self.site = site

    def fixed_sites(self) -> set[int]:
        return set() if self.site is None else {self.site}


class Stretch(_SiteObjective):
    """The site's predicted response (response units)."""

    def __call__(self, responses: Responses) -> Tensor:
        col = responses.column_of(self.site)  # (batch,)
        return responses.mean.gather(1, col[:, None])[:, 0]

    def describe(self) -> dict[str, Any]:
        return {"kind": "stretch", "site": self.site}


class Suppress(_SiteObjective):
    """Minus the site's predicted response."""

    def __call__(self, responses: Responses) -> Tensor:
        col = responses.column_of(self.site)
        return -responses.mean.gather(1, col[:, None])[:, 0]

    def describe(self) -> dict[str, Any]:
        return {"kind": "suppress", "site": self.site}


class OneHot(_SiteObjective):
    """Softmax over the z-scored population at the site: the one-hot control score in (0, 1)."""

    def __init__(self, site: int | None, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"one_hot temperature must be > 0, got {temperature}")
        super().__init__(site)
        self.temperature = float(temperature)

    def __call__(self, responses: Responses) -> Tensor:
        logits = responses.zscored() / self.temperature  # (batch, sites)
        col = responses.column_of(self.site)
        return torch.softmax(logits, dim=1).gather(1, col[:, None])[:, 0]

    def describe(self) -> dict[str, Any]:
        return {"kind": "one_hot", "site": self.site, "temperature": self.temperature}

    @property
    def needs_natural_stats(self) -> bool:
        return True


class Pattern(Objective):
    """Negative mean squared error (z units) between the population and a requested state.

    ``z`` is one state for every row, (sites,), or a mapping target site id -> (sites,)
    so that each row reaches the state registered for its target.
    """

    def __init__(self, z: Tensor | Mapping[int, Tensor]) -> None:
        if isinstance(z, Tensor):
            if z.dim() != 1:
                raise ValueError(f"pattern z must have shape (sites,), got {tuple(z.shape)}")
            self.states: dict[int, Tensor] | None = None
            self.z: Tensor | None = z.detach().float()
        else:
            if not z:
                raise ValueError("pattern needs at least one target state")
            self.states = {int(k): v.detach().float() for k, v in z.items()}
            self.z = None

    def __call__(self, responses: Responses) -> Tensor:
        zs = responses.zscored()  # (batch, sites)
        if self.z is not None:
            goal = self.z.to(zs.device)[None, :]  # (1, sites)
        else:
            assert self.states is not None
            by_col = {responses.columns[s]: v for s, v in self.states.items()}
            rows = [by_col[int(c)] for c in responses.target_col.tolist()]
            goal = torch.stack(rows).to(zs.device)  # (batch, sites)
        return -((zs - goal) ** 2).mean(dim=1)

    def describe(self) -> dict[str, Any]:
        if self.z is not None:
            return {"kind": "pattern", "z": [round(v, 6) for v in self.z.tolist()]}
        assert self.states is not None
        return {
            "kind": "pattern",
            "z_by_target": {
                str(k): [round(x, 6) for x in v.tolist()] for k, v in sorted(self.states.items())
            },
        }

    @property
    def needs_natural_stats(self) -> bool:
        return True

    def check(
        self, site_ids: Sequence[int], targets: Sequence[int], has_natural_stats: bool
    ) -> None:
        super().check(site_ids, targets, has_natural_stats)
        states = [self.z] if self.z is not None else list((self.states or {}).values())
        for state in states:
            if state is not None and state.shape != (len(site_ids),):
                raise ValueError(
                    f"pattern state has shape {tuple(state.shape)}; the encoder predicts "
                    f"{len(site_ids)} sites, so it must be ({len(site_ids)},)"
                )
        if self.states is not None:
            missing = sorted(set(targets) - set(self.states))
            if missing:
                raise ValueError(f"pattern has no requested state for target site(s) {missing}")
            unknown = sorted(set(self.states) - set(site_ids))
            if unknown:
                raise ValueError(f"pattern states keyed by unknown site id(s) {unknown}")


class EnsembleAware(Objective):
    """Mean over ensemble members of ``inner`` minus ``spread_weight`` x their std.

    Penalising disagreement between members curbs the over-prediction that optimising one
    model's mean invites on synthetic images.
    """

    def __init__(self, inner: Objective, spread_weight: float) -> None:
        if spread_weight < 0:
            raise ValueError(f"ensemble spread_weight must be >= 0, got {spread_weight}")
        self.inner = inner
        self.spread_weight = float(spread_weight)

    def __call__(self, responses: Responses) -> Tensor:
        if responses.members is None:
            raise ValueError("ensemble objective needs per-member predictions")
        per_member = torch.stack(
            [self.inner(responses.with_mean(m)) for m in responses.members]
        )  # (members, batch)
        if per_member.shape[0] < 2:
            return per_member[0]
        return per_member.mean(0) - self.spread_weight * per_member.std(0)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "ensemble",
            "spread_weight": self.spread_weight,
            "inner": self.inner.describe(),
        }

    def children(self) -> tuple[Objective, ...]:
        return (self.inner,)

    @property
    def needs_members(self) -> bool:
        return True


def stretch(site: int | None = None) -> Objective:
    return Stretch(site)


def suppress(site: int | None = None) -> Objective:
    return Suppress(site)


def one_hot(site: int | None = None, temperature: float = 1.0) -> Objective:
    return OneHot(site, temperature)


def pattern(z: Tensor | Mapping[int, Tensor]) -> Objective:
    return Pattern(z)


def ensemble(inner: Objective, spread_weight: float = 1.0) -> Objective:
    return EnsembleAware(inner, spread_weight)


KINDS = ("stretch", "one_hot", "suppress")


def from_kind(kind: str, temperature: float = 1.0) -> Objective:
    """The per-target objective named by ``kind`` (one of KINDS)."""
    if kind == "stretch":
        return stretch()
    if kind == "one_hot":
        return one_hot(temperature=temperature)
    if kind == "suppress":
        return suppress()
    raise ValueError(
        f"unknown objective kind {kind!r}; use one of {list(KINDS)} or pass an Objective "
        "(e.g. objectives.pattern(z))"
    )


def _preview(ids: Sequence[int], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in list(ids)[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}] ({len(ids)} sites)"
