"""`popcontrol demo --fast` end to end: a real server, rig daemon, virtual monkey, presenter and
worker over loopback, three simulated days, evaluated after every day that showed synthetic images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUMMARY_KEYS = {
    "day",
    "sites",
    "valid_presentations",
    "median_noise_corrected_ev",
    "stretch_success_fraction",
    "median_stretch_ratio",
    "onehot_improved_fraction",
    "overprediction",
}


@pytest.mark.slow
def test_demo_fast_runs_the_closed_loop_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("POPCONTROL_") or k == "POPCONTROL_CI"
    }
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", "--fast", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "median stretch ratio" in result.stdout  # the per-day table was printed

    summary = json.loads((out / "summary.json").read_text())
    days = summary["days"]
    assert [d["day"] for d in days] == [1, 2, 3]
    for d in days:
        assert set(d) >= SUMMARY_KEYS, f"missing keys in {d}"
        assert d["sites"] > 0 and d["valid_presentations"] > 0
        assert d["median_noise_corrected_ev"] is not None
    assert days[0]["median_stretch_ratio"] is None  # day 1 shows no synthetic images
    report = (out / "report.html").read_text()
    assert report.count("<svg") >= 3 and "data:image/png;base64," in report

    for d in days[1:]:  # every later day showed synthetic images and was evaluated
        assert d["n_targets"] >= 1, f"day {d['day']} evaluated no target: {d}"
        assert d["median_stretch_ratio"] is not None and d["median_stretch_ratio"] > 0
        assert 0.0 <= d["stretch_success_fraction"] <= 1.0
        assert d["onehot_improved_fraction"] is not None and d["overprediction"] is not None
    # The model explains part of the simulated sites' reliable variance, not all of it: the
    # simulator's sites normalise, threshold and saturate; the V1-like backbone does none of it.
    assert 0.05 < days[-1]["median_noise_corrected_ev"] < 0.95
    # Control, the criterion: by the last day the measured stretch ratio exceeds 1 for
    # most target sites, i.e. for more than half of them (success fraction > 0.5). Noise-free,
    # every target's synthetic image beats the best of all natural images by 1.0-1.5x
    # (bench/control.py); measured through 20 noisy repetitions, six runs of the fast demo
    # (seeds 0-3) ended at 75-100 % of targets, so 0.5 is the threshold the issue asks for and not
    # one tuned to a single lucky run.
    last = days[-1]
    assert last["n_targets"] >= 4, last  # a fraction of fewer targets would say little
    assert last["stretch_success_fraction"] > 0.5, last
    assert last["median_stretch_ratio"] > 1.0, last
