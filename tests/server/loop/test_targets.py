"""Target choice of the synthesize job and its parameter checks."""

from __future__ import annotations

import pytest

from server.db.models import NeuronModel
from server.jobs.queue import JobError
from server.loop.synthjob import SynthParams, choose_targets


def _model() -> NeuronModel:
    sites = [
        {"site_id": 1, "reliable": True, "unstable": False, "ncev": 0.5},
        {"site_id": 2, "reliable": True, "unstable": False, "ncev": 0.9},
        {"site_id": 3, "reliable": False, "unstable": False, "ncev": 0.95},  # unreliable
        {"site_id": 4, "reliable": True, "unstable": True, "ncev": 0.8},  # unstable
        {"site_id": 5, "reliable": True, "unstable": False, "ncev": 0.2},  # poorly predicted
        {"site_id": 6, "reliable": True, "unstable": False, "ncev": 0.7},
    ]
    return NeuronModel(id=7, site_ids=[1, 2, 3, 5, 6], metrics={"sites": sites})


def test_default_targets_are_reliable_stable_well_predicted_best_first() -> None:
    model = _model()
    assert choose_targets(model, SynthParams()) == [2, 6, 1]
    assert choose_targets(model, SynthParams(max_targets=2)) == [2, 6]
    assert choose_targets(model, SynthParams(min_ncev=0.1)) == [2, 6, 1, 5]
    with pytest.raises(JobError, match="no reliable, stable site"):
        choose_targets(model, SynthParams(min_ncev=0.99))


def test_explicit_targets_must_be_model_sites() -> None:
    assert choose_targets(_model(), SynthParams(targets=(5, 3))) == [5, 3]
    with pytest.raises(JobError, match=r"targets \[4\] are not sites of model 7"):
        choose_targets(_model(), SynthParams(targets=(4,)))


def test_parameters_are_checked() -> None:
    with pytest.raises(JobError, match="unknown synthesize parameters"):
        SynthParams.from_dict({"stepz": 3})
    with pytest.raises(JobError, match="objectives must be among"):
        SynthParams.from_dict({"objectives": ["suppress"]})
    params = SynthParams.from_dict({"targets": [3, 1], "loop": True, "trigger_session_id": 4})
    assert params.targets == (3, 1) and params.extra == {"loop": True, "trigger_session_id": 4}
