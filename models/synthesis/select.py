"""Candidate selection and comparison with the best natural image."""

from __future__ import annotations

import torch
from torch import Tensor


def best_k(values: Tensor, k: int) -> Tensor:
    """values (targets, candidates) -> (targets, k) candidate indices, best first.

    Ties go to the lower candidate index, so selection is deterministic.
    """
    if not 1 <= k <= values.shape[1]:
        raise ValueError(f"k must be in 1..{values.shape[1]} candidates, got {k}")
    candidates = values.shape[1]
    # stable descending sort: sort on (-value, index)
    order = torch.argsort(-values.double(), dim=1, stable=True)  # (targets, candidates)
    assert order.shape[1] == candidates
    return order[:, :k]


def best_natural(values: Tensor) -> tuple[Tensor, Tensor]:
    """values (targets, natural_images) -> best value (targets,) and its image index (targets,)."""
    if values.shape[1] == 0:
        raise ValueError("natural reference is empty; pass at least one natural image")
    best, index = values.max(dim=1)
    return best, index
