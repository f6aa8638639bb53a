"""Attacks: one class per attack, one calling convention (see `base`).

budgeted: `attack(model, x, y, eps) -> x_adv`; minimal: `attack(model, x, y) -> x_adv`.
"""

from robust_cli.attacks.apgd import APGD, APGDT
from robust_cli.attacks.base import Attack, model_mode, vote_labels
from robust_cli.attacks.cw import CW
from robust_cli.attacks.deepfool import DeepFool
from robust_cli.attacks.ensemble import AutoAttack, MinimalEnsemble, cascade
from robust_cli.attacks.fab import FAB, FABT
from robust_cli.attacks.gradient import BIM, FGM, FGSM, IGSM, MIFGSM, PGD, RFGSM, Gradient
from robust_cli.attacks.jsma import JSMA
from robust_cli.attacks.lbfgs import LBFGS
from robust_cli.attacks.noise import Noise
from robust_cli.attacks.sparse_rs import SparseRS
from robust_cli.attacks.square import Square

__all__ = [
    "Attack",
    "model_mode",
    "FGSM",
    "FGM",
    "Gradient",
    "BIM",
    "IGSM",
    "PGD",
    "MIFGSM",
    "RFGSM",
    "DeepFool",
    "CW",
    "LBFGS",
    "JSMA",
    "Noise",
    "APGD",
    "APGDT",
    "FAB",
    "FABT",
    "Square",
    "SparseRS",
    "AutoAttack",
    "MinimalEnsemble",
    "cascade",
    "vote_labels",
]
