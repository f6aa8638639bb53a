#!/usr/bin/env python
"""Attack speed on MNIST fc200_200_10 and c_32 (untrained weights are fine for speed; pass checkpoints if you like).

(a) PGD-40 time / (40 x [one forward + torch.autograd.grad of the loss w.r.t. the input only]): the floor of any
    gradient attack, without weight gradients. Target <= 1.10.
(b) robust PGD speed / torchattacks PGD speed, same model, batch, eps, step and steps. Target >= 1.0.
(c) seconds per 1000 examples for every attack YAML (its default parameters; minimal attacks on fewer examples).

Timing: the methods are interleaved over --rounds rounds and the minimum is kept (the machine may be shared);
CUDA is synchronised before every clock read.

    .venv/bin/python scripts/bench_attack.py [--device cuda] [--mnist-root DIR] [--models fc200_200_10 c_32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robust_cli.attacks import PGD  # noqa: E402

DEFAULT_MNIST = "/work/shared/data/mnist"


def compose(model_name: str, mnist_root: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "robust_cli" / "conf"), version_base="1.3"):
        return hydra_compose(config_name="attack", overrides=[f"model={model_name}", "dataset=mnist", f"data.root={mnist_root}", "data.download=false"])


def load(model_name, mnist_root, checkpoint, device):
    from robust_cli.commands import build

    cfg = compose(model_name, mnist_root)
    data = build.make_data(cfg)
    torch.manual_seed(0)
    model = build.make_model(cfg, data.meta)
    if checkpoint:
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    return model.to(device).eval(), data


def clock(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def floor_steps(model, x, y, steps):
    """`steps` x (forward + input-only gradient): what any gradient attack must at least pay."""
    for _ in range(steps):
        xg = x.detach().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)


def bench_pgd(model, x, y, device, rounds, eps=0.3, steps=40):
    import torchattacks

    step = 2.5 * eps / steps
    ours = PGD(norm="linf", steps=steps, step_size=step, random_start=True)
    theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=steps, random_start=True)
    times = {"floor": [], "robust": [], "torchattacks": []}
    floor_steps(model, x, y, 2)  # warm-up (allocator, kernels)
    for _ in range(rounds):
        times["floor"].append(clock(lambda: floor_steps(model, x, y, steps), device))
        times["robust"].append(clock(lambda: ours(model, x, y, eps), device))
        times["torchattacks"].append(clock(lambda: theirs(x, y), device))
    return {k: min(v) for k, v in times.items()}, {k: statistics.median(v) for k, v in times.items()}


def every_attack(model, x, y, device, n_budgeted, n_minimal):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    rows = []
    for path in sorted((ROOT / "robust_cli" / "conf" / "attack").glob("*.yaml")):
        attack = instantiate(OmegaConf.load(path))
        n = n_budgeted if attack.kind == "budgeted" else n_minimal
        xb, yb = x[:n].to(device), y[:n].to(device)
        eps = 0.3 if attack.norm == "linf" else 2.0
        args = (eps,) if attack.kind == "budgeted" else ()
        torch.manual_seed(0)
        seconds = clock(lambda: attack(model, xb, yb, *args), device)
        rows.append((path.stem, attack.kind, n, seconds / n * 1000))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist-root", default=DEFAULT_MNIST, help=f"folder with the four MNIST IDX files (default {DEFAULT_MNIST})")
    p.add_argument("--models", nargs="+", default=["fc200_200_10", "c_32"])
    p.add_argument("--checkpoint", nargs="*", default=[], help="MODEL=PATH: trained weights for a model (optional)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", nargs="*", default=["fc200_200_10=1000", "c_32=128"], help="MODEL=N batch size for (a), (b)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n-budgeted", type=int, default=200, help="examples for (c), budgeted attacks")
    p.add_argument("--n-minimal", type=int, default=20, help="examples for (c), minimal attacks (CW, L-BFGS, ...)")
    p.add_argument("--skip-every", action="store_true", help="skip (c)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    checkpoints = dict(a.split("=", 1) for a in args.checkpoint)
    batches = {k: int(v) for k, v in (a.split("=", 1) for a in args.batch)}
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), torch {torch.__version__}"
    )
    for name in args.models:
        model, data = load(name, args.mnist_root, checkpoints.get(name), device)
        n = batches.get(name, 256)
        x, y = data.test_x[:n].to(device), data.test_y[:n].to(device)
        best, median = bench_pgd(model, x, y, device, args.rounds)
        print(f"\n== {name}, batch {n}, PGD-40 linf eps 0.3 (min of {args.rounds} rounds; median in brackets)")
        print(f"floor 40 x (forward + input grad) {best['floor']:.3f}s [{median['floor']:.3f}]")
        print(f"robust PGD-40                     {best['robust']:.3f}s [{median['robust']:.3f}]")
        print(f"torchattacks PGD-40               {best['torchattacks']:.3f}s [{median['torchattacks']:.3f}]")
        print(f"(a) robust PGD / floor            {best['robust'] / best['floor']:.3f}   (target <= 1.10)")
        print(f"(b) robust speed / torchattacks   {best['torchattacks'] / best['robust']:.3f}   (target >= 1.0)")
        if not args.skip_every:
            print(f"(c) seconds per 1000 examples, default parameters ({name}):")
            for stem, kind, count, per_1000 in every_attack(model, data.test_x, data.test_y, device, args.n_budgeted, args.n_minimal):
                print(f"    {stem:<10} {kind:<9} n={count:<5} {per_1000:10.2f} s/1000")


if __name__ == "__main__":
    main()
