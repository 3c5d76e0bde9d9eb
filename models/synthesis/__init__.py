"""Stimulus synthesis: images predicted to drive (stretch) or isolate (one-hot) target sites.

Entry point: ``synthesize(encoder, targets, objective, config, natural_stats, ...)``.
Method: Bashivan, Kar & DiCarlo (2019), with robustness practice from later work
(jitter, gradient blur, ensembles, luminance/contrast matching).
"""

from models.synthesis.config import SynthesisConfig
from models.synthesis.objectives import (
    Objective,
    Responses,
    ensemble,
    one_hot,
    pattern,
    stretch,
    suppress,
)
from models.synthesis.protocol import EncoderLike
from models.synthesis.run import SynthesizedImage, decode_png, encode_png, synthesize

__all__ = [
    "EncoderLike",
    "Objective",
    "Responses",
    "SynthesisConfig",
    "SynthesizedImage",
    "decode_png",
    "encode_png",
    "ensemble",
    "one_hot",
    "pattern",
    "stretch",
    "suppress",
    "synthesize",
]
