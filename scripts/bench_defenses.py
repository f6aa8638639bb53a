"""Seconds per training step of every defense relative to `none` (same model, same batch, one run).

    .venv/bin/python scripts/bench_defenses.py                       # fc200_200_10 on MNIST-shaped batches, CPU
    .venv/bin/python scripts/bench_defenses.py --model lenet --device cuda --steps 50
    .venv/bin/python scripts/bench_defenses.py --defenses none --objectives trades,mart,pgd_at   # only the floor table

A second table times the adversarial objectives (TRADES, MART, PGD-AT, each also with AWP) against their floor,
measured in the same interleaved rounds: the passes the algorithm cannot avoid, written as plainly as possible --
k inner steps of one forward and one input-gradient backward each, then the outer forward on x' (PGD-AT) or on x and
x' (TRADES, MART) with one backward to the weights and the optimizer step. Targets: at most 1.15x the floor, and AWP
at most +15 % over its base objective (Wu et al. report about +10 %: one more forward/backward of the outer loss).

A step is what the training loop does: zero_grad, `loss, stats = defense(model, x, y)`, backward, optimizer step.
Each defense is instantiated from its YAML in robust_cli/conf/defense (the shipped defaults, with overrides from
--set). The defenses are timed in interleaved rounds (so load drift on a shared machine hits all alike) and each
reports the median step; CUDA is synchronised before reading the clock.
The data are random [0, 1] tensors of the dataset's shape: timing does not depend on the pixel values.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robust_cli.commands import build
from robust_cli.core.data import DatasetMeta

CONF = Path(__file__).resolve().parents[1] / "robust_cli" / "conf"
TARGETS = {  # the targets (x none); pgd_at is filled in as (steps + 1)
    "grad_norm_fd": 2.0,
    "grad_norm": 3.5,
    "fgsm_at": 2.2,
    "prediction_ibp": 3.0,
    "tulip": 3.5,
}
VARIANTS = {"grad_norm_fd": ("grad_norm", ["method=fd"])}  # extra rows: name -> (yaml, overrides)


def defense_config(name, overrides):
    yaml, extra = VARIANTS.get(name, (name, []))
    cfg = OmegaConf.load(CONF / "defense" / f"{yaml}.yaml")
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(extra + overrides))


def one_step(model, defense, optimizer, x, y, device):
    """Seconds for one training-loop step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss, _ = defense(model, x, y)
    (loss + model.regularization()).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def floor_step(model, optimizer, x, y, steps, outer_on_clean, device):
    """Seconds for the passes an adversarial objective needs at least (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (x_adv.detach() + 0.01 * grad.sign()).clamp_(0, 1)
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x_adv), y)
    if outer_on_clean:
        loss = loss + F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def awp_step(model, defense, optimizer, x, y, device):
    """one_step plus the loop's hook that takes AWP's perturbation off after the update."""
    seconds = one_step(model, defense, optimizer, x, y, device)
    start = time.perf_counter()
    defense.after_step()
    return seconds + time.perf_counter() - start


def objectives_table(args, cfg, meta, x, y, device, steps_per_epoch):
    """The adversarial objectives against their floors and AWP against its base, timed in interleaved rounds."""
    awp_gamma = {"trades": 5e-3, "mart": 5e-3, "pgd_at": 1e-2}
    rows = []  # (label, step function, floor label or base label)
    for name in args.objectives.split(","):
        inner = int(args.inner_steps)
        overrides = ["attack.steps=" + str(inner)] if name == "pgd_at" else ["steps=" + str(inner)]
        for awp in (False, True):
            dcfg = defense_config(name, overrides + ([f"awp.gamma={awp_gamma[name]}"] if awp else []))
            torch.manual_seed(0)
            model = build.make_model(cfg, meta).to(device).train()
            defense, optimizer = instantiate(dcfg), torch.optim.SGD(model.parameters(), lr=1e-3)
            label = f"{name}+awp" if awp else name
            rows.append((label, lambda m=model, d=defense, o=optimizer: awp_step(m, d, o, x, y, device), name if awp else f"floor_{name}"))
        torch.manual_seed(0)
        model = build.make_model(cfg, meta).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        rows.append((f"floor_{name}", lambda m=model, o=optimizer, c=name != "pgd_at": floor_step(m, o, x, y, inner, c, device), None))
    times = {label: [] for label, *_ in rows}
    for round_ in range(args.warmup + args.rounds):
        for label, step, _ in rows:
            seconds = [step() for _ in range(args.steps)]
            if round_ >= args.warmup:
                times[label] += seconds
    median = {label: statistics.median(t) for label, t in times.items()}
    low = {label: min(t) for label, t in times.items()}
    print(
        f"\nadversarial objectives, {args.inner_steps} inner steps: median (min) ms per step, seconds per epoch of "
        f"{steps_per_epoch} steps, ratio to the floor (objectives) or to the base objective (AWP)"
    )
    print(f"{'objective':<14}{'ms/step':>10}{'(min)':>9}{'s/epoch':>9}{'vs':>14}{'median':>8}{'min':>7}{'target':>8}")
    for label, _, reference in rows:
        if reference is None:
            print(f"{label:<14}{median[label] * 1e3:>10.2f}{low[label] * 1e3:>9.2f}{median[label] * steps_per_epoch:>9.1f}")
            continue
        target = "<=1.15"  # the floor target, and +15 % for AWP over its base
        print(
            f"{label:<14}{median[label] * 1e3:>10.2f}{low[label] * 1e3:>9.2f}{median[label] * steps_per_epoch:>9.1f}"
            f"{reference:>14}{median[label] / median[reference]:>8.2f}{low[label] / low[reference]:>7.2f}{target:>8}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fc200_200_10", help="a conf/model YAML name")
    parser.add_argument("--shape", default="1,28,28", help="input shape C,H,W (MNIST by default)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="steps per defense per round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (each runs every defense)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the dev machine is shared)")
    parser.add_argument("--head", default="none", help="model.head: none | tanh")
    parser.add_argument(
        "--defenses",
        default="none,grad_norm_fd,grad_norm,fgsm_at,l2_at,fast_at,pgd_at,tulip,loss_ibp,"
        "prediction_ibp,fast_tangent_prop,tangent_prop,lipschitz,simprop,gaussian_aug",
    )
    parser.add_argument("--set", action="append", default=[], help="defense override for every row, e.g. attack.steps=5")
    parser.add_argument(
        "--objectives",
        default="trades,mart,pgd_at",
        help="adversarial objectives timed against their floor (and with AWP against themselves); empty: skip that table",
    )
    parser.add_argument("--inner-steps", type=int, default=10, help="inner maximisation steps of the objectives")
    parser.add_argument("--train-size", type=int, default=60000, help="examples per epoch, for the seconds-per-epoch column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    meta = DatasetMeta(name="bench", shape=shape, num_classes=args.classes, class_names=[str(i) for i in range(args.classes)])
    cfg = OmegaConf.create({"model": {**OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{args.model}.yaml")), "head": args.head}})
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((args.batch, *shape), generator=gen).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)

    # interleaved rounds: on a shared machine the load drifts, and every defense should see the same drift
    setups = []
    for name in args.defenses.split(","):
        torch.manual_seed(0)
        model = build.make_model(cfg, meta).to(device).train()
        dcfg = defense_config(name, [s for s in args.set if name != "none"])
        setups.append((name, dcfg, model, instantiate(dcfg), torch.optim.SGD(model.parameters(), lr=1e-3)))
    times = {name: [] for name, *_ in setups}
    for round_ in range(args.warmup + args.rounds):
        for name, _, model, defense, optimizer in setups:
            seconds = [one_step(model, defense, optimizer, x, y, device) for _ in range(args.steps)]
            if round_ >= args.warmup:
                times[name] += seconds
    rows = []
    for name, dcfg, *_ in setups:
        target = dcfg.attack.steps + 1 if name == "pgd_at" else TARGETS.get(name)
        rows.append((name, statistics.median(times[name]), target))

    base = rows[0][1] if rows[0][0] == "none" else None
    print(
        f"model={args.model}{'+tanh' if args.head == 'tanh' else ''} shape={shape} batch={args.batch} device={device} "
        f"threads={args.threads} median of {args.rounds} x {args.steps} interleaved steps"
    )
    print(f"{'defense':<18}{'ms/step':>10}{'x none':>9}{'target':>9}")
    for name, seconds, target in rows:
        ratio = f"{seconds / base:.2f}" if base else "-"
        label = "" if target is None else (f"~{target}" if name == "pgd_at" else f"<={target}")
        print(f"{name:<18}{seconds * 1e3:>10.2f}{ratio:>9}{label:>9}")
    if args.objectives:
        objectives_table(args, cfg, meta, x, y, device, -(-args.train_size // args.batch))


if __name__ == "__main__":
    main()
