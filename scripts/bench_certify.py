#!/usr/bin/env python
"""Seconds per point of Cohen's CERTIFY at n = 100,000 draws (n0 = 100) on MNIST fc200_200_10 and c_32.

    .venv/bin/python scripts/bench_certify.py [--mnist-root DIR] [--points 4] [--n 100000] [--device auto] [--threads 1]
Weights are random (the cost does not depend on them); sigma 0.25. Cohen et al. report about 150 s per ImageNet
image for a ResNet-50 at n = 100,000 on a 2019 GPU.
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

from robust_cli.certify import certify  # noqa: E402
from robust_cli.cli import resolve_device  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-root", default=DEFAULT_MNIST)
    parser.add_argument("--models", nargs="+", default=["fc200_200_10", "c_32"])
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"CERTIFY, n0=100, n={args.n}, sigma 0.25, {args.points} MNIST test points, device {device}, threads {args.threads}")
    print(f"{'model':<14} {'s/point min':>12} {'s/point median':>15} {'evaluations/s':>14}")
    for name in args.models:
        model, data = load(name, args.mnist_root, None, device)
        x = data.test_x[: args.points].to(device)
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            cert = certify(model, x, 0.25, n0=100, n=args.n, batch_size=args.batch_size)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / args.points)
        rate = int(cert.evaluations.sum()) / args.points / min(times)
        print(f"{name:<14} {min(times):>12.2f} {statistics.median(times):>15.2f} {rate:>14,.0f}")


if __name__ == "__main__":
    main()
