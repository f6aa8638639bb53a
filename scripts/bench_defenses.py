"""Seconds per training step of every defense relative to `none` (same model, same batch, one run).

    .venv/bin/python scripts/bench_defenses.py                       # fc200_200_10 on MNIST-shaped batches, CPU
    .venv/bin/python scripts/bench_defenses.py --model lenet --device cuda --steps 50

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
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robust_cli.data import DatasetMeta
from robust_cli.models import build_model

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
    parser.add_argument("--defenses", default="none,grad_norm_fd,grad_norm,fgsm_at,l2_at,fast_at,pgd_at,tulip,loss_ibp,"
                        "prediction_ibp,fast_tangent_prop,tangent_prop,lipschitz,simprop,gaussian_aug")
    parser.add_argument("--set", action="append", default=[], help="defense override for every row, e.g. attack.steps=5")
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
        model = build_model(cfg, meta).to(device).train()
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
    print(f"model={args.model}{'+tanh' if args.head == 'tanh' else ''} shape={shape} batch={args.batch} device={device} "
          f"threads={args.threads} median of {args.rounds} x {args.steps} interleaved steps")
    print(f"{'defense':<18}{'ms/step':>10}{'x none':>9}{'target':>9}")
    for name, seconds, target in rows:
        ratio = f"{seconds / base:.2f}" if base else "-"
        label = "" if target is None else (f"~{target}" if name == "pgd_at" else f"<={target}")
        print(f"{name:<18}{seconds * 1e3:>10.2f}{ratio:>9}{label:>9}")


if __name__ == "__main__":
    main()
