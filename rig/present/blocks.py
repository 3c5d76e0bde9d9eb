"""Fetching a block before it runs, and saving its state after: shared by both presenters."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rig.present.engine import BlockResult, Progress
from rig.present.net import FlipChannel, ImageCache, ServerClient
from rig.present.schedule import BlockPlan

log = logging.getLogger("popcontrol.present")


@dataclass(frozen=True)
class PreparedBlock:
    plan: BlockPlan
    base_counts: dict[str, int]  # valid presentations per image from earlier runs of the block
    images: dict[str, np.ndarray]  # stimulus id -> (H, W) float32 luminance in [0, 1]

    @property
    def mean_luminance(self) -> float:
        """Mean luminance over the block's images: the background grey."""
        if not self.images:
            return 0.5
        return float(np.mean([img.mean() for img in self.images.values()]))


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) float32 luminance in [0, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def prepare_block(client: ServerClient, cache: ImageCache) -> PreparedBlock | None:
    """Ask for the rig's next block, download and verify its images; None when nothing is due."""
    body = client.next_block()
    if body is None:
        return None
    plan = BlockPlan.from_next_block(body)
    saved = client.block(plan.block_id)
    repetitions = int(saved["repetitions"])
    # Images missing from the plan need nothing more: they have all their repetitions.
    base_counts = {str(sid): repetitions for sid in saved.get("shown_counts", {})}
    base_counts.update({sid: max(0, repetitions - n) for sid, n in plan.remaining.items()})
    images = {
        sid: decode_png(cache.get(client, sid, url)) for sid, url in sorted(plan.image_urls.items())
    }
    log.info(
        "block %d: %d images ready (%d presentations to go)",
        plan.block_id,
        len(images),
        len(plan.sequence),
    )
    return PreparedBlock(plan=plan, base_counts=base_counts, images=images)


def finish_block(
    result: BlockResult,
    channel: FlipChannel,
    progress: Progress,
    drain_timeout_s: float,
) -> bool:
    """Wait for the last flip acks and save the block's state on the server.

    Returns False when acks or the progress post did not complete in time (the flips stay queued
    in the channel and are still delivered while it runs).
    """
    drained = channel.wait_drained(drain_timeout_s)
    if not drained:
        log.warning(
            "block %d: %d flip messages still unacknowledged after %.0f s",
            result.block_id,
            channel.stats().pending,
            drain_timeout_s,
        )
    progress.report(result.block_id, result.state, result.shown_counts)
    saved = progress.flush(drain_timeout_s)
    if not saved:
        log.warning("block %d: progress not saved on the server yet", result.block_id)
    return drained and saved
