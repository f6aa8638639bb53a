"""Training objectives: each is a callable `(model, x, y) -> (loss, stats)`. Documented in docs/defenses.md."""

from robust_cli.defenses.adversarial import AdversarialTraining
from robust_cli.defenses.awp import AdversarialWeightPerturbation
from robust_cli.defenses.gradient import GradientNormPenalty
from robust_cli.defenses.invariance import FastTangentProp, LossIBP, PredictionIBP, TangentProp
from robust_cli.defenses.lipschitz import LipschitzPenalty, Tulip
from robust_cli.defenses.mart import MART
from robust_cli.defenses.noise import GaussianAugmentation
from robust_cli.defenses.simprop import SimultaneousPropagation
from robust_cli.defenses.standard import CrossEntropy
from robust_cli.defenses.trades import TRADES

__all__ = [
    "CrossEntropy",
    "AdversarialTraining",
    "TRADES",
    "MART",
    "AdversarialWeightPerturbation",
    "GradientNormPenalty",
    "LipschitzPenalty",
    "Tulip",
    "LossIBP",
    "PredictionIBP",
    "TangentProp",
    "FastTangentProp",
    "SimultaneousPropagation",
    "GaussianAugmentation",
]
