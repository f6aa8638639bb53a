"""AutoAttack-style ensembles (Croce & Hein 2020): a list of attacks and one cascade.

An example is robust only if every attack in the list fails on it. The cascade runs each attack only on the examples
all earlier ones failed on, so the result is the per-example worst case at the cost of the survivors, and it says
which attack broke each example first (`broken_by`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.apgd import APGD, APGDT
from robust_cli.attacks.base import Attack, vote_labels
from robust_cli.attacks.fab import FAB, FABT
from robust_cli.attacks.square import Square
from robust_cli.engine import exact
from robust_cli.errors import UserError

VERSIONS = ("standard", "plus", "rand", "custom")
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
    if version == "standard":
        return [APGD(norm=norm, n_iter=n_iter, loss="ce", **common), APGDT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
                FABT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common), Square(norm=norm, n_queries=n_queries, **common)]
    if version == "plus":  # AutoAttack's plus: 5 restarts, the untargeted DLR loss and untargeted FAB, then the targeted ones
        return [APGD(norm=norm, n_iter=n_iter, loss="ce", restarts=5, **common), APGD(norm=norm, n_iter=n_iter, loss="dlr", restarts=5, **common),
                FAB(norm=norm, n_iter=n_iter, restarts=5, **common), Square(norm=norm, n_queries=n_queries, **common),
                APGDT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common),
                FABT(norm=norm, n_iter=n_iter, n_target_classes=n_target_classes, **common)]
    if version == "rand":  # expectation over transformation for randomised models
        common = {**common, "eot_iter": eot_iter}
        return [APGD(norm=norm, n_iter=n_iter, loss="ce", **common), APGD(norm=norm, n_iter=n_iter, loss="dlr", **common)]
    raise UserError(f"autoattack version must be one of {', '.join(VERSIONS)}, got {version!r}")


def custom_member(name, norm, common):
    """An attack YAML of conf/attack by name, instantiated with the ensemble's norm, box and randomness settings."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = ATTACK_CONF / f"{name}.yaml"
    if not path.is_file() or name == "autoattack":
        options = sorted(p.stem for p in ATTACK_CONF.glob("*.yaml") if p.stem != "autoattack")
        raise UserError(f"attack.attacks: no attack named {name!r}; pick from {', '.join(options)}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if "norm" in spec:
        spec["norm"] = norm
    member = instantiate({**spec, **common})
    if member.kind != "budgeted":
        raise UserError(f"attack.attacks: {name} is a minimal attack; an ensemble takes budgeted attacks (fab_t is both)")
    return member


class AutoAttack(Attack):
    """The cascade over `version`'s attacks: standard (APGD-CE, APGD-T, FAB-T, Square), plus, rand (EoT), custom."""

    iterative = True

    def __init__(self, version: str = "standard", norm: str = "linf", attacks=None, n_iter: int = 100, n_queries: int = 5000,
                 n_target_classes: int = 9, eot_iter: int = 20, report_each: bool = False, **kwargs):
        super().__init__(**{k: v for k, v in kwargs.items() if k != "eot_iter"})
        self.norm = norms.check_norm(norm)
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
