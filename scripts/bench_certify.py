#!/usr/bin/env python
"""Seconds per point of Cohen's CERTIFY at n = 100,000 draws (n0 = 100) on MNIST fc200_200_10 and c_32, and the
classifications Bell's fast persistence saves by reusing CERTIFY's draws (the sandwich's `persistence=true`).

    .venv/bin/python scripts/bench_certify.py [--mnist-root DIR] [--points 4] [--n 100000] [--device auto] [--threads 1]
        [--checkpoint MODEL=PATH ...] [--persistence-points 32]
Without a checkpoint the weights are random (the cost of CERTIFY does not depend on them; persistence's does, so
give a trained model, ideally trained with defense=gaussian_aug at the certification sigma). Sigma 0.25, gamma 0.7.
Cohen et al. report about 150 s per ImageNet image for a ResNet-50 at n = 100,000 on a 2019 GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_attack import DEFAULT_MNIST, load  # noqa: E402

from robust_cli.analysis.certify import certify  # noqa: E402
from robust_cli.analysis.persistence import fast_persistence  # noqa: E402
from robust_cli.commands.certify import PERSISTENCE_POOL  # noqa: E402
from robust_cli.core.engine import resolve_device  # noqa: E402

SIGMA, GAMMA = 0.25, 0.7
SHARED_SIGMAS = [0.25, 0.5, 1.0]  # Cohen et al.'s noise levels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-root", default=DEFAULT_MNIST)
    parser.add_argument("--models", nargs="+", default=["fc200_200_10", "c_32"])
    parser.add_argument("--checkpoint", nargs="*", default=[], help="MODEL=PATH of a trained model")
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--persistence-points", type=int, default=32)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if any("=" not in item for item in args.checkpoint):
        parser.error("--checkpoint takes MODEL=PATH, e.g. --checkpoint fc200_200_10=outputs/checkpoints/KEY/model.pt")
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    print(f"CERTIFY, n0=100, n={args.n}, sigma {SIGMA}, {args.points} MNIST test points, device {device}, threads {args.threads}")
    print(f"{'model':<14} {'weights':<8} {'s/point min':>12} {'s/point median':>15} {'evaluations/s':>14}")
    shared_rows = []
    for name in args.models:
        model, data = load(name, args.mnist_root, checkpoints.get(name), device)
        x = data.test_x[: args.points].to(device)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            cert = certify(model, x, SIGMA, n0=100, n=args.n, batch_size=args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / args.points)
        rate = int(cert.evaluations.sum()) / args.points / min(times)
        weights = "trained" if name in checkpoints else "random"
        print(f"{name:<14} {weights:<8} {min(times):>12.2f} {statistics.median(times):>15.2f} {rate:>14,.0f}")
        if name in checkpoints:
            shared_rows.append((name, sharing(model, data.test_x[: args.persistence_points].to(device), args)))
    if shared_rows:
        print(f"\nfast persistence (gamma {GAMMA}) after CERTIFY on the same draws (n={args.n}), per point: classifications")
        print(
            f"{'model':<14} {'certify sigmas':<16} {'points':>6} {'median sigma*':>13} {'alone':>8} {'reusing':>8} {'saved':>6} "
            f"{'max |sigma* change|':>20} {'of certify':>10}"
        )
        for name, rows in shared_rows:
            for sigmas, points, median, alone, reusing, change in rows:
                certify_cost = len(sigmas) * (100 + args.n)
                print(
                    f"{name:<14} {','.join(f'{s:g}' for s in sigmas):<16} {points:>6} {median:>13.3f} {alone:>8,.0f} {reusing:>8,.0f} "
                    f"{1 - reusing / alone:>6.1%} {change:>20.2%} {alone / certify_cost:>10.2%}"
                )


def sharing(model, x, args):
    """Persistence's classifications per point alone and reusing CERTIFY's first draws (same seed and indices), for
    CERTIFY at sigma 0.25 alone and at Cohen et al.'s 0.25, 0.5, 1.0."""
    draws = {s: certify(model, x, s, n0=100, n=args.n, batch_size=args.batch_size, keep=PERSISTENCE_POOL).draws for s in SHARED_SIGMAS}
    alone = fast_persistence(model, x, GAMMA, n_samples=PERSISTENCE_POOL, batch_size=args.batch_size)
    finite = torch.isfinite(alone.sigma) & (alone.sigma > 0)
    rows = []
    for sigmas in ([SIGMA], SHARED_SIGMAS):
        reusing = fast_persistence(
            model, x, GAMMA, n_samples=PERSISTENCE_POOL, batch_size=args.batch_size, shared=[[(s, draws[s][i]) for s in sigmas] for i in range(len(x))]
        )
        change = float((reusing.sigma[finite] / alone.sigma[finite] - 1).abs().max()) if finite.any() else float("nan")
        rows.append(
            (
                sigmas,
                len(x),
                float(alone.sigma[finite].median()) if finite.any() else float("nan"),
                float(alone.evaluations.double().mean()),
                float(reusing.evaluations.double().mean()),
                change,
            )
        )
    return rows


if __name__ == "__main__":
    main()
