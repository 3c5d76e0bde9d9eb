"""Control in the simulator, without the noise of a recording: does synthesis really stretch?

For each backbone (and synthesis setting) this fits a model of the virtual monkey's sites on
natural images (seeded crops of scikit-image photographs, responses with the simulator's trial
noise and Poisson spiking), synthesizes one stretch image per target (the best-predicted
sites), and asks the simulator's hidden ground truth, noise-free, how hard each image drives
its target compared with the best of *all* the natural images. This is the quantity the demo's
measured stretch ratio estimates through noisy repetitions.

Rows: the fixed V1-like filter bank (``v1``, the demo's backbone) against a randomly initialised
AlexNet (no ImageNet weights can be had offline), synthesis from the best natural image with 30
and 60 steps and from noise; and the simulator's ceiling (every site at saturation).

Prints a table, then one JSON line. ``--quick`` runs a smaller version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from models.backbones import RandomWeightsWarning
from models.fit import FitConfig, FitResult, fit_model
from models.readouts import ReadoutConfig
from models.synthesis import SynthesisConfig, synthesize
from models.synthesis.run import decode_png
from rig.sim.population import PopulationConfig, V4Population
from server.naturalset import natural_images


def record(
    pop: V4Population, images: np.ndarray, repetitions: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy spike counts (presentations, sites), stimulus index, and noise-free expectations."""
    expected = pop.expected_counts(pop.rates(list(images), 0), 0)  # (images, sites)
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(len(images)), repetitions)
    counts = rng.poisson(expected[index] * pop.trial_gains(rng, len(index)))
    return counts, index, expected


def fit(images: np.ndarray, counts: np.ndarray, index: np.ndarray, backbone: str) -> FitResult:
    layer = "complex" if backbone == "v1" else "conv3"
    config = FitConfig(
        backbone=backbone,
        layer=layer,
        input_size=128,
        readout=ReadoutConfig(kind="ridge"),
        cv_folds=4,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return fit_model(
            torch.from_numpy(images)[:, None],
            torch.from_numpy(counts).float(),
            torch.from_numpy(index),
            config=config,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and targets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    n_images, n_targets = (160, 4) if args.quick else (300, 8)
    pop = V4Population(PopulationConfig(n_sites=48, n_arrays=2, seed=args.seed))
    images = np.stack(natural_images(n_images, 128, seed=args.seed)).astype(np.float32) / 255
    counts, index, expected = record(pop, images, repetitions=6, seed=args.seed + 1)
    natural_max = expected.max(0)  # (sites,) noise-free best natural response
    baseline, gain, _ = pop.day_state(0)
    ceiling = pop.expected_counts((baseline * (1 + gain))[None], 0)[0] / natural_max
    stats = (float(images.mean()), float(images.std(axis=(1, 2)).mean()))

    rows: list[dict[str, object]] = []
    settings = [
        ("v1", "image", 30),
        ("v1", "image", 60),
        ("v1", "noise", 60),
        ("alexnet", "image", 30),
    ]
    fits: dict[str, tuple[FitResult, list[int], float]] = {}
    for backbone, start, steps in settings:
        if backbone not in fits:
            t0 = time.perf_counter()
            result = fit(images, counts, index, backbone)
            ncev = np.nan_to_num(np.asarray(result.metrics.ncev), nan=-1.0)
            reliable = np.asarray(result.metrics.reliable, dtype=bool)
            order = [int(i) for i in np.argsort(-np.where(reliable, ncev, -1.0))[:n_targets]]
            fits[backbone] = (result, order, time.perf_counter() - t0)
        result, targets, fit_s = fits[backbone]
        config = SynthesisConfig(size_px=128, start=start, steps=steps, n_candidates=2)
        starts = (
            {t: torch.from_numpy(images[int(np.argmax(expected[:, t]))])[None] for t in targets}
            if start == "image"
            else None
        )
        t0 = time.perf_counter()
        out = synthesize(result.encoder, targets, "stretch", config, stats, start_images=starts)
        synth_s = time.perf_counter() - t0
        synthetic = np.stack([decode_png(o.png).numpy()[0] for o in out])
        driven = pop.expected_counts(pop.rates(list(synthetic), 0), 0)
        ratios = np.array([driven[i, t] / natural_max[t] for i, t in enumerate(targets)])
        rows.append(
            {
                "backbone": backbone,
                "start": start,
                "steps": steps,
                "median_ncev_targets": round(float(np.median(result.metrics.ncev[targets])), 3),
                "median_true_ratio": round(float(np.median(ratios)), 3),
                "fraction_above_1": round(float(np.mean(ratios > 1)), 3),
                "fit_s": round(fit_s, 1),
                "synthesis_s": round(synth_s, 1),
            }
        )

    header = (
        f"{'backbone':<8} {'start':<6} {'steps':>5} {'NC-EV':>6} {'true ratio':>10} "
        f"{'> 1':>5} {'fit s':>6} {'synth s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['backbone']:<8} {r['start']:<6} {r['steps']:>5} {r['median_ncev_targets']:>6} "
            f"{r['median_true_ratio']:>10} {r['fraction_above_1']:>5} {r['fit_s']:>6} "
            f"{r['synthesis_s']:>7}"
        )
    print(
        f"simulator ceiling (saturation / best natural), median over all sites: "
        f"{float(np.median(ceiling)):.2f}"
    )
    print(
        json.dumps(
            {
                "rows": rows,
                "ceiling_median": round(float(np.median(ceiling)), 3),
                "n_images": n_images,
                "n_targets": n_targets,
            }
        )
    )


if __name__ == "__main__":
    main()
