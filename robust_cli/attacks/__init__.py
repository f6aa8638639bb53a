"""Attacks: one class per attack, one calling convention (see `base`).

budgeted: `attack(model, x, y, eps) -> x_adv`; minimal: `attack(model, x, y) -> x_adv`.
"""
from robust_cli.attacks.base import Attack, model_mode
from robust_cli.attacks.cw import CW
from robust_cli.attacks.deepfool import DeepFool
from robust_cli.attacks.gradient import BIM, FGM, FGSM, MIFGSM, PGD, RFGSM, Gradient
from robust_cli.attacks.jsma import JSMA
from robust_cli.attacks.lbfgs import LBFGS
from robust_cli.attacks.noise import Noise

__all__ = ["Attack", "model_mode", "FGSM", "FGM", "Gradient", "BIM", "PGD", "MIFGSM", "RFGSM", "DeepFool", "CW",
           "LBFGS", "JSMA", "Noise"]
