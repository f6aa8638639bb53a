"""Ensembles: a list of attacks and one short function that combines them.

AutoAttack (Croce & Hein 2020): an example is robust only if every attack in the list fails on it. The cascade
runs each attack only on the examples all earlier ones failed on, so the result is the per-example worst case at
the cost of the survivors, and it says which attack broke each example first (`broken_by`).
MinimalEnsemble: every minimal attack runs on every example and the smallest misclassifying perturbation is kept
(`broken_by`: the member that found it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.apgd import APGD, APGDT
from robust_cli.attacks.base import Attack, vote_labels
from robust_cli.attacks.fab import FAB, FABT
from robust_cli.attacks.square import Square
from robust_cli.core.engine import exact
from robust_cli.core.errors import UserError

VERSIONS = ("standard", "plus", "rand", "custom")
ENSEMBLES = ("autoattack", "minimal_ensemble")
ATTACK_CONF = Path(__file__).resolve().parents[1] / "conf" / "attack"


def cascade(members, model, x, y, eps, judge):
    """(x_adv, broken_by): member i runs on the examples members 0..i-1 left robust; broken_by[k] is the index of
    the first member that fooled example k (-1: robust, or misclassified before any attack)."""
    x_adv = x.clone()
    broken_by = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    robust = judge(x, y) == y
    for i, attack in enumerate(members):
        idx = robust.nonzero().squeeze(1)
        if len(idx) == 0:
            break
        xa = attack(model, x[idx], y[idx], norms.per_example_slice(eps, idx))
        fooled = judge(xa, y[idx]) != y[idx]
        x_adv[idx[fooled]] = xa[fooled]
        broken_by[idx[fooled]] = i
        robust[idx[fooled]] = False
    return x_adv, broken_by


def standard_members(version, norm, n_iter, n_queries, n_target_classes, eot_iter, common):
    # AutoAttack's p_init 0.8. Its code keeps the halving checkpoints at fixed iterations; rescaled to n_queries
    # (torchattacks' choice) is stronger here: MNIST fc200, 300 digits, linf 0.1, 2 seeds: 0.287 / 0.287 robust
    # accuracy vs 0.350 / 0.333 fixed (0.290 / 0.313 with the standalone p_init 0.05)
    square = {"norm": norm, "n_queries": n_queries, "p_init": 0.8, **common}
    if version == "standard" and norm == "l1":  # AutoAttack's l1 standard: APGD-CE x5 restarts, APGD-T over 5 targets
        return [
            APGD(norm=norm, n_iter=n_iter, loss="ce", restarts=5, **common),
            APGDT(norm=norm, n_iter=n_iter, n_target_classes=min(n_target_classes, 5), **common),
            FABT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
            Square(**square),
        ]
    if version == "standard":
        return [
            APGD(norm=norm, n_iter=n_iter, loss="ce", **common),
            APGDT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
            FABT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
            Square(**square),
        ]
    if version == "plus":  # AutoAttack's plus: 5 restarts, the untargeted DLR loss and untargeted FAB, then the targeted ones
        return [
            APGD(norm=norm, n_iter=n_iter, loss="ce", restarts=5, **common),
            APGD(norm=norm, n_iter=n_iter, loss="dlr", restarts=5, **common),
            FAB(norm=norm, n_iter=n_iter, restarts=5, **common),
            Square(**square),
            APGDT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
            FABT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
        ]
    if version == "rand":  # expectation over transformation for randomised models
        common = {**common, "eot_iter": eot_iter}
        return [APGD(norm=norm, n_iter=n_iter, loss="ce", **common), APGD(norm=norm, n_iter=n_iter, loss="dlr", **common)]
    raise UserError(f"autoattack version must be one of {', '.join(VERSIONS)}, got {version!r}")


def custom_member(name, norm, common, kind="budgeted"):
    """An attack YAML of conf/attack by name, instantiated with the ensemble's norm, box and randomness settings
    (kind="minimal": as a minimal attack; FAB is either)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = ATTACK_CONF / f"{name}.yaml"
    if not path.is_file() or name in ENSEMBLES:
        options = sorted(p.stem for p in ATTACK_CONF.glob("*.yaml") if p.stem not in ENSEMBLES)
        raise UserError(f"attack.attacks: no attack named {name!r}; pick from {', '.join(options)}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if "norm" in spec:
        spec["norm"] = norm
    if "minimal" in spec:
        spec["minimal"] = kind == "minimal"
    member = instantiate({**spec, **common})
    if member.kind != kind:
        other = "budgeted attacks (fab_t is both)" if kind == "budgeted" else "minimal attacks (deepfool, cw, fab, fab_t, lbfgs)"
        raise UserError(f"attack.attacks: {name} is a {member.kind} attack; this ensemble takes {other}")
    if member.norm != norm:
        raise UserError(f"attack.attacks: {name} measures {member.norm}, the ensemble {norm}")
    return member


class AutoAttack(Attack):
    """The cascade over `version`'s attacks: standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand (EoT), custom."""

    iterative = True

    def __init__(
        self,
        version: str = "standard",
        norm: str = "linf",
        attacks=None,
        n_iter: int = 100,
        n_queries: int = 5000,
        n_target_classes: int = 9,
        eot_iter: int = 20,
        report_each: bool = False,
        **kwargs,
    ):
        super().__init__(**{k: v for k, v in kwargs.items() if k != "eot_iter"})
        self.norm = norms.check_norm(norm, norms.L1_NORMS)
        self.version = version
        self.report_each = bool(report_each)
        common = {"bounds": self.bounds, "model_mode": self.model_mode, "eval_draws": self.eval_draws, "vote": self.vote}
        if version == "custom":
            if not attacks:
                raise UserError("autoattack version=custom needs a list of attack names, e.g. 'attack.attacks=[apgd,apgd_t,square]'")
            self.members = [custom_member(str(a), self.norm, common) for a in attacks]
        else:
            if attacks:
                raise UserError(f"attack.attacks is only for version=custom (version={version} has its own list)")
            self.members = standard_members(version, self.norm, n_iter, n_queries, n_target_classes, eot_iter, common)
        self.last_broken_by = None  # per example of the last batch: index of the member that broke it first, -1 none

    @property
    def name(self) -> str:
        return f"autoattack_{self.version}"

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def judge(self, model, x, y):
        # the fp32 model decides who is still robust: a reduced-precision success must not take an example out of
        # the cascade (the later members would never try it, and the fp32 re-check would count it robust)
        return vote_labels(exact(model), x, y, self.eval_draws, self.vote)

    def perturb(self, model, x, y, eps, target):
        if target is not None:
            raise UserError("autoattack is untargeted (APGD-T and FAB-T pick their own targets): drop attack.targeted")
        x_adv, self.last_broken_by = cascade(self.members, model, x, y, eps, lambda z, yz: self.judge(model, z, yz))
        return x_adv

    @property
    def notes(self) -> list[str]:
        return [n for m in self.members for n in m.notes]


def smallest(members, model, x, y, judge):
    """(x_adv, found_by): per example the smallest L2 perturbation, among the members' results, that `judge` finds
    misclassified (x itself and -1 where none is)."""
    x_adv, found_by = x.clone(), torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    best = torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
    for i, attack in enumerate(members):
        xa = attack(model, x, y)
        size = (xa - x).flatten(1).double().norm(dim=1)
        better = (judge(xa, y) != y) & (size < best)
        x_adv[better], best[better], found_by[better] = xa[better], size[better], i
    return x_adv, found_by


class MinimalEnsemble(Attack):
    """The per-example smallest L2 adversarial perturbation over minimal attacks (default DeepFool, CW, FAB, L-BFGS).
    A distance no member beats: below every member's for each example, by construction."""

    kind = "minimal"
    norm = "l2"
    iterative = True

    def __init__(self, attacks=("deepfool", "cw", "fab", "lbfgs"), **kwargs):
        super().__init__(**kwargs)
        if self.targeted is not None:
            raise UserError("minimal_ensemble is untargeted (L-BFGS picks its own targets): drop attack.targeted")
        if not attacks:
            raise UserError("minimal_ensemble needs a list of minimal attacks, e.g. 'attack.attacks=[deepfool,cw,fab]'")
        common = {"bounds": self.bounds, "model_mode": self.model_mode, "eval_draws": self.eval_draws, "vote": self.vote}
        self.members = [custom_member(str(a), self.norm, common, kind="minimal") for a in attacks]
        self.last_broken_by = None  # per example of the last batch: index of the member whose result was kept, -1 none

    @property
    def name(self) -> str:
        return "minimal_ensemble"

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def perturb(self, model, x, y, eps, target):
        judge = lambda z, yz: vote_labels(exact(model), z, yz, self.eval_draws, self.vote)
        x_adv, self.last_broken_by = smallest(self.members, model, x, y, judge)
        return x_adv

    @property
    def notes(self) -> list[str]:
        return [n for m in self.members for n in m.notes]
