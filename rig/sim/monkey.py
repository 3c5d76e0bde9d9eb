"""The virtual monkey on the acquisition clock: spikes, event words and photodiode edges per flip.

``VirtualMonkey.respond`` turns one flip (its sample on the acquisition clock, its event word,
the image it shows) into the events a rig would record: the word on ``WORD_LINE`` at the flip,
the photodiode's rising edge a jittered lag later (the physical onset) and its falling edge when
the image goes off, and the evoked spikes of every site from onset + latency for
``response_ms``, with trial-to-trial gain noise and Poisson counts. ``background`` gives the
spontaneous spikes of an interval. ``FixationModel`` draws when fixation breaks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rig.protocol import EVENT_DTYPE, SPIKE_DTYPE
from rig.sim.population import PopulationConfig, V4Population
from rig.sources.base import DEFAULT_SAMPLE_RATE_HZ, PHOTODIODE_LINE, WORD_LINE

ImageLoader = Callable[[str], np.ndarray]  # stimulus id -> (H, W) float32 in [0, 1]


@dataclass(frozen=True)
class MonkeyConfig:
    population: PopulationConfig = field(default_factory=PopulationConfig)
    day: int = 0
    seed: int = 0  # trial noise, spike times, photodiode jitter
    sample_rate_hz: float = DEFAULT_SAMPLE_RATE_HZ
    photodiode_lag_ms: float = 12.0  # mean lag of the screen behind the event word
    photodiode_jitter_ms: float = 4.0  # sd of the lag
    photodiode_lag_range_ms: tuple[float, float] = (2.0, 45.0)
    image_on_ms: float = 100.0
    word_pulse_ms: float = 5.0  # the word lines return to 0 after this
    word_drop_prob: float = 0.0  # a word the acquisition system misses
    channel_of_site: tuple[int, ...] | None = None  # site -> acquisition channel; None: identity
    image_cache: int = 4096  # stimulus responses kept


@dataclass(frozen=True)
class FixationModel:
    """Fixation breaks as a constant hazard while the monkey should fixate."""

    break_rate_per_s: float = 0.1

    def break_time(self, rng: np.random.Generator, duration_s: float) -> float | None:
        """Seconds after fixation starts at which it breaks, or None if it holds for duration_s."""
        if self.break_rate_per_s <= 0:
            return None
        t = float(rng.exponential(1.0 / self.break_rate_per_s))
        return t if t < duration_s else None


class VirtualMonkey:
    def __init__(self, config: MonkeyConfig, image_loader: ImageLoader) -> None:
        self.config = config
        self.population = V4Population(config.population)
        self.image_loader = image_loader
        self.n_sites = config.population.n_sites
        self._rng = np.random.default_rng([config.seed, config.day, 31337])
        self._rates: OrderedDict[str, np.ndarray] = OrderedDict()
        self.baseline_hz, _, self.alive = self.population.day_state(config.day)
        if config.channel_of_site is None:
            self.channel_of_site = np.arange(self.n_sites, dtype=np.uint16)
        else:
            assert len(config.channel_of_site) == self.n_sites, (
                "channel_of_site needs one channel per site"
            )
            self.channel_of_site = np.asarray(config.channel_of_site, np.uint16)
        rate = config.sample_rate_hz
        self._latency = np.round(self.population.latency_ms * rate / 1000).astype(
            np.int64
        )  # (sites,)
        self._response = round(config.population.response_ms * rate / 1000)

    def samples(self, ms: float) -> int:
        return round(ms * self.config.sample_rate_hz / 1000)

    def rates_for(self, stimulus_id: str) -> np.ndarray:
        """(sites,) evoked rate in spikes/s for one image on this day (cached)."""
        rates = self._rates.get(stimulus_id)
        if rates is None:
            image = self.image_loader(stimulus_id)
            rates = self.population.rates([image], self.config.day)[0]
            self._rates[stimulus_id] = rates
            if len(self._rates) > self.config.image_cache:
                self._rates.popitem(last=False)
        else:
            self._rates.move_to_end(stimulus_id)
        return rates

    def respond(
        self, flip_sample: int, event_word: int, stimulus_id: str
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(evoked spikes SPIKE_DTYPE, events EVENT_DTYPE, onset sample) for one flip."""
        c = self.config
        rng = self._rng
        lag_ms = float(
            np.clip(
                rng.normal(c.photodiode_lag_ms, c.photodiode_jitter_ms), *c.photodiode_lag_range_ms
            )
        )
        onset = flip_sample + self.samples(lag_ms)
        rows = []
        if rng.random() >= c.word_drop_prob:
            rows += [
                (flip_sample, WORD_LINE, 1, event_word),
                (flip_sample + self.samples(c.word_pulse_ms), WORD_LINE, 0, 0),
            ]
        rows += [
            (onset, PHOTODIODE_LINE, 1, 0),
            (onset + self.samples(c.image_on_ms), PHOTODIODE_LINE, 0, 0),
        ]
        events = np.array(sorted(rows), EVENT_DTYPE)
        rates = self.rates_for(stimulus_id)
        gain = self.population.trial_gains(rng, 1)[0]  # (sites,)
        extra_hz = np.maximum(rates - self.baseline_hz, 0.0) * gain * self.alive
        counts = rng.poisson(extra_hz * self._response / c.sample_rate_hz)  # (sites,)
        site = np.repeat(np.arange(self.n_sites), counts)
        start = onset + self._latency[site]
        samples = start + rng.integers(0, self._response, site.size)
        spikes = np.zeros(site.size, SPIKE_DTYPE)
        order = np.argsort(samples, kind="stable")
        spikes["sample"] = samples[order]
        spikes["chan"] = self.channel_of_site[site[order]]
        return spikes, events, onset

    def background(self, first_sample: int, last_sample: int) -> np.ndarray:
        """Spontaneous spikes of every site in [first_sample, last_sample), sorted."""
        dt_s = (last_sample - first_sample) / self.config.sample_rate_hz
        counts = self._rng.poisson(self.baseline_hz * dt_s)
        site = np.repeat(np.arange(self.n_sites), counts)
        samples = self._rng.integers(first_sample, last_sample, site.size)
        order = np.argsort(samples, kind="stable")
        spikes = np.zeros(site.size, SPIKE_DTYPE)
        spikes["sample"] = samples[order]
        spikes["chan"] = self.channel_of_site[site[order]]
        return spikes


def dict_loader(images: dict[str, np.ndarray]) -> ImageLoader:
    """An image loader over a dict (tests, the demo)."""

    def load(stimulus_id: str) -> np.ndarray:
        try:
            return images[stimulus_id]
        except KeyError:
            raise KeyError(
                f"no image for stimulus {stimulus_id}; the loader knows {len(images)} images"
            ) from None

    return load


def stimulus_id_of(image: np.ndarray) -> str:
    """A stable id for an array image (tests; the server uses the PNG's sha256)."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()
