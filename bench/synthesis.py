"""Synthesis throughput: full synthesis vs the bare backbone, batched vs one target at a time.

Encoder under test: AlexNet to conv3 (models.backbones, random weights: speed does not depend on
them) with the Encoder's preprocessing (gray -> 3 channels, bilinear resize to input_size,
ImageNet normalisation) and a factorized readout (spatial mask x channel weights per site).

Measured in one run, interleaved so that load from other processes hits both sides alike:
- backbone: forward + backward to the input of the preprocessed batch, nothing else;
- synthesis: the steady-state step time of ``synthesize`` (taken from progress callbacks),
  with random shifts (+-6 %; --affine adds scale and rotation), one-hot objective, TV and
  gradient blur;
- batched vs sequential: wall time of one ``synthesize`` call for all targets against one
  call per target, both including set-up, PNG encoding and final scoring.

Prints a table, then one JSON line.  ``--quick`` runs a small version in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from models.backbones import IMAGENET_MEAN, IMAGENET_STD, RandomWeightsWarning, load_backbone
from models.synthesis import SynthesisConfig, synthesize


class BenchEncoder(nn.Module):
    """Encoder-contract model: AlexNet conv3 + factorized readout, random but fixed weights."""

    mean_rgb: Tensor  # (1, 3, 1, 1)
    inv_std_rgb: Tensor  # (1, 3, 1, 1)
    masks: Tensor  # (members, sites, h, w), each summing to 1
    weights: Tensor  # (members, sites, C)
    bias: Tensor  # (members, sites)
    trunk: nn.Module

    def __init__(self, n_sites: int, input_size: int, n_members: int = 1, seed: int = 0) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RandomWeightsWarning)
            backbone = load_backbone("alexnet", seed=seed)
        self.trunk = backbone.truncated("conv3")
        with torch.no_grad():
            _, channels, height, width = self.trunk(torch.zeros(1, 3, input_size, input_size)).shape
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mean_rgb", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("inv_std_rgb", 1.0 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        masks = torch.rand((n_members, n_sites, height, width), generator=gen)
        self.register_buffer("masks", masks / masks.sum(dim=(2, 3), keepdim=True))
        self.register_buffer("weights", torch.randn((n_members, n_sites, channels), generator=gen))
        self.register_buffer("bias", torch.full((n_members, n_sites), 10.0))
        self.site_ids = list(range(n_sites))
        self.input_size = input_size
        self.min_image_size = 32
        self.natural_mean: Tensor | None = None
        self.natural_std: Tensor | None = None
        self.n_members = n_members

    @property
    def device(self) -> torch.device:
        return self.masks.device

    def preprocess(self, images: Tensor) -> Tensor:
        """(batch, 1|3, H, W) in [0, 1] -> (batch, 3, input_size, input_size) normalised."""
        if images.shape[-1] != self.input_size:  # resize before replicating gray to 3 channels
            size = (self.input_size, self.input_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images * self.inv_std_rgb - self.mean_rgb * self.inv_std_rgb  # broadcasts 1 -> 3

    def forward_members(self, images: Tensor) -> Tensor:
        features = self.trunk(self.preprocess(images))  # (batch, C, h, w)
        flat = features.flatten(2).transpose(1, 2)[None]  # (1, batch, h*w, C)
        mixed = flat @ self.weights.transpose(1, 2)[:, None]  # (members, batch, h*w, sites)
        drive = (mixed * self.masks.flatten(2).transpose(1, 2)[:, None]).sum(2)
        return drive + self.bias[:, None]  # (members, batch, sites)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_members(images).mean(0)  # (batch, sites)

    def spatial_masks(self) -> Tensor | None:
        return self.masks.mean(0)

    def set_natural_stats(self, images: Tensor, batch_size: int = 64) -> None:
        with torch.no_grad():
            preds = torch.cat(
                [self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            )
        self.natural_mean = preds.mean(0)
        self.natural_std = preds.std(0).clamp_min(1e-6)


class BackboneStep:
    """One bare trunk forward + backward (to the input) on a preprocessed batch, timed."""

    def __init__(self, encoder: BenchEncoder, batch: int) -> None:
        size = encoder.input_size
        gen = torch.Generator().manual_seed(0)
        self.trunk = encoder.trunk
        self.x = torch.rand((batch, 3, size, size), generator=gen).to(encoder.device)
        self.x.requires_grad_(True)

    def __call__(self) -> float:
        start = time.perf_counter()
        torch.autograd.grad(self.trunk(self.x).sum(), [self.x])
        return time.perf_counter() - start


def time_interleaved(
    encoder: BenchEncoder, targets: list[int], cfg: SynthesisConfig
) -> tuple[list[float], list[float]]:
    """Synthesis step times and bare-backbone step times, alternating step by step.

    The progress callback runs one bare backbone step between two synthesis steps; a synthesis
    step's time is the gap between callbacks minus that. Returns (synthesis step seconds,
    backbone step seconds).
    """
    backbone = BackboneStep(encoder, len(targets))
    synth: list[float] = []
    bare: list[float] = []
    last_end = [0.0]

    def on_progress(step: int, total: int) -> None:
        now = time.perf_counter()
        if step > 1:  # the first step includes set-up
            synth.append(now - last_end[0])
        bare.append(backbone())
        last_end[0] = time.perf_counter()

    synthesize(encoder, targets, "one_hot", cfg, (0.45, 0.12), progress=on_progress)
    return synth, bare[1:]


class Stamps:
    """Progress callback that records when each step ended."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, step: int, total: int) -> None:
        self.times.append(time.perf_counter())


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (seconds)")
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--size-px", type=int, default=128)
    parser.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="backbone input in px; images are resized to it (default: --size-px, no resize)",
    )
    parser.add_argument("--sites", type=int, default=288)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed synthesis call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--affine", action="store_true", help="jitter with scale and rotation too (resampling)"
    )
    args = parser.parse_args()
    if args.quick:
        args.targets, args.size_px, args.input_size, args.sites = 8, 64, 64, 96
        args.steps, args.repeats = 4, 1
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.input_size is None:
        args.input_size = args.size_px
    device = torch.device(args.device)
    encoder = BenchEncoder(args.sites, args.input_size).to(device)
    naturals = torch.rand(
        (16, 1, args.size_px, args.size_px), generator=torch.Generator().manual_seed(1)
    )
    encoder.set_natural_stats(naturals.to(device))
    targets = list(range(args.targets))
    cfg = SynthesisConfig(
        size_px=args.size_px,
        steps=args.steps,
        chunk_images=args.targets,
        seed=0,
        shift_frac=0.06,
        scale_frac=0.05 if args.affine else 0.0,
        rotation_deg=5.0 if args.affine else 0.0,
        tv_weight=0.01,
        grad_blur_sigma_px=1.0,
    )
    batch = len(targets)

    synthesize(encoder, targets, "one_hot", cfg, (0.45, 0.12))  # warm-up: kernels, caches
    synthesize(encoder, targets[:1], "one_hot", cfg, (0.45, 0.12))
    synth_s: list[float] = []
    backbone_s: list[float] = []
    batched_wall, sequential_wall = [], []
    single_step_s: list[float] = []  # steady-state step times of one-target runs
    for _ in range(args.repeats):  # interleaved, so shared-machine load hits both sides
        synth, bare = time_interleaved(encoder, targets, cfg)
        synth_s += synth
        backbone_s += bare
        start = time.perf_counter()
        synthesize(encoder, targets, "one_hot", cfg, (0.45, 0.12))
        batched_wall.append(time.perf_counter() - start)
        start = time.perf_counter()
        for target in targets:
            stamps = Stamps()
            synthesize(encoder, [target], "one_hot", cfg, (0.45, 0.12), progress=stamps)
            single_step_s += [b - a for a, b in itertools.pairwise(stamps.times[1:])]
        sequential_wall.append(time.perf_counter() - start)

    # Step times come in adjacent pairs (synthesis step, then bare step) that share the
    # machine's load of that moment: the overhead is the median of the per-pair ratios.
    # Wall times: the least disturbed repeat of each.
    backbone_step, synth_step = median(backbone_s), median(synth_s)
    pair_ratio = median([a / b for a, b in zip(synth_s, backbone_s, strict=True)])
    batched, sequential = min(batched_wall), min(sequential_wall)
    result = {
        "image_steps_per_s": round(batch / synth_step, 2),
        "backbone_image_steps_per_s": round(batch / backbone_step, 2),
        "overhead_vs_backbone": round(pair_ratio - 1.0, 4),
        "batched_vs_sequential_ratio": round(sequential / batched, 3),
        "batched_vs_sequential_step_ratio": round(batch * median(single_step_s) / synth_step, 3),
        "batched_wall_s": round(batched, 3),
        "sequential_wall_s": round(sequential, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": batch,
        "size_px": args.size_px,
        "input_size": args.input_size,
        "sites": args.sites,
        "steps_per_call": args.steps,
        "repeats": args.repeats,
        "affine_jitter": args.affine,
        "step_pairs": len(synth_s),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    rows = [
        ("synthesis step (s)", f"{synth_step:.4f}"),
        ("backbone fwd+bwd step (s)", f"{backbone_step:.4f}"),
        ("image-steps/s synthesis", f"{result['image_steps_per_s']}"),
        ("image-steps/s backbone", f"{result['backbone_image_steps_per_s']}"),
        ("overhead vs backbone", f"{result['overhead_vs_backbone']:.1%}  (target <= 15%)"),
        (f"batched wall, {batch} targets (s)", f"{batched:.3f}"),
        ("one target at a time wall (s)", f"{sequential:.3f}"),
        (
            "batched vs sequential",
            f"{result['batched_vs_sequential_ratio']:.2f}x  (target >= 1.4x)",
        ),
        (
            "  per steady-state step",
            f"{result['batched_vs_sequential_step_ratio']:.2f}x  (set-up and PNG work excluded)",
        ),
        ("peak RSS (MB)", f"{result['peak_rss_mb']}"),
    ]
    print(
        f"synthesis benchmark: {batch} targets, {args.size_px} px images, AlexNet conv3 at "
        f"{args.input_size} px, {args.sites} sites, {device}, {torch.get_num_threads()} threads"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
