"""Boundary points per second: batched bisection (all pairs at once) vs one pair at a time, and the cost of
projecting samples (interpolate vs descent) per boundary point.

    .venv/bin/python scripts/bench_boundary.py [--model fc200_200_10] [--points 50] [--samples 500] [--device cpu]

Uses a randomly initialised model of the zoo on MNIST-shaped inputs (28x28): bisection cost does not depend on
the weights, only on the forward pass and the number of steps (log2(length / tol)).
"""

from __future__ import annotations

import argparse
import time

import torch

from robust_cli.analysis.boundary import boundary_point, project_to_boundary, sample_around


def build(name, device):
    from hydra import compose, initialize_config_dir

    from robust_cli.cli import CONF_DIR
    from robust_cli.commands import build
    from robust_cli.core.data import DatasetMeta

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", "dataset=mnist"])
    meta = DatasetMeta("mnist", (1, 28, 28), 10, mean=(0.1307,), std=(0.3081,))
    torch.manual_seed(0)
    return build.make_model(cfg, meta).to(device).eval()


def clock(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fc200_200_10")
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)  # a shared 2-core box: 2 threads spin-wait under load
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build(args.model, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20 * args.points, 1, 28, 28, generator=gen).to(device)
    with torch.no_grad():
        pred = model(x).argmax(1)
    x1 = x[pred == pred[0]][: args.points]
    x2 = x[pred != pred[0]][: len(x1)]
    x1 = x1[: len(x2)]
    n = len(x1)
    with torch.no_grad():
        model(x1)  # warm-up
    batched_s, batched = clock(lambda: boundary_point(model, x1, x2, args.tol), device)
    single_s, _ = clock(lambda: [boundary_point(model, x1[i : i + 1], x2[i : i + 1], args.tol) for i in range(n)], device)
    print(f"model {args.model}, {n} pairs, tol {args.tol}, device {device}, {args.threads} threads")
    print(f"bisection batched:        {n / batched_s:10.1f} points/s  ({batched_s:.3f} s)")
    print(f"bisection one at a time:  {n / single_s:10.1f} points/s  ({single_s:.3f} s)  -> speed-up {single_s / batched_s:.1f}x")
    samples = sample_around(batched.points[0], args.samples, 0.05, "flat_svd", gen)
    classes = (batched.class_a[0], batched.class_b[0])
    for method in ("interpolate", "descent"):
        seconds, proj = clock(lambda: project_to_boundary(model, samples, x1[0], x2[0], method, args.tol, classes=classes), device)
        print(f"project {args.samples} samples ({method:11s}): {seconds:.3f} s per boundary point, {float(proj.converged.float().mean()):.0%} converged")


if __name__ == "__main__":
    main()
