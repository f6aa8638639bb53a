"""Benchmark the discrete path kernel: seconds to represent 1000 test points with the kernel machine of a net trained
100 forward-Euler steps on 1000 points, naive per-sample loops (reference_predict: one autograd call per sample,
class and weight state, explicit kernel values) vs the batched implementation (DiscretePathKernel.predict: one VJP
per step over the training set, one JVP of the query batch per quadrature node), and the memory each needs.

    .venv/bin/python scripts/bench_kernel.py                      # Bell's 2-D set, two-layer ReLU (hidden 100)
    .venv/bin/python scripts/bench_kernel.py --naive-steps 5      # naive timed on 5 steps, extrapolated to all

The naive loop is linear in the number of steps (every step costs the same work), so it is timed on --naive-steps
steps and scaled; its output on those steps is checked against the batched one on the same truncated path.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from robust_cli.analysis.kernel import DiscretePathKernel, reference_predict
from robust_cli.analysis.training_path import train_path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def gaussians(n_per_class, gen, dtype):
    means = torch.tensor([[1.0, 4.0], [4.0, 1.0]], dtype=dtype)
    y = torch.arange(2).repeat_interleave(n_per_class)
    return means[y] + torch.randn(len(y), 2, generator=gen, dtype=dtype), y


def truncated(path, steps):
    return replace(path, weights=path.weights[: steps + 1], coefficients=path.coefficients[:steps])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1000, help="training points (half per class)")
    ap.add_argument("--test", type=int, default=1000, help="test points represented")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step-size", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--quadrature", type=int, default=4, help="Gauss-Legendre nodes per step")
    ap.add_argument("--naive-steps", type=int, default=3, help="steps the naive loop is timed on (then scaled)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), torch.float64
    gen = torch.Generator().manual_seed(0)
    x, y = gaussians(args.train // 2, gen, dtype)
    test_x, _ = gaussians(args.test // 2, gen, dtype)
    x, y, test_x = x.to(device), y.to(device), test_x.to(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 2)).to(device, dtype)

    base = rss_mib()
    t0 = clock(device)
    path = train_path(model, x, y, args.steps, args.step_size, output="probabilities")
    t_train = clock(device) - t0
    d = path.weights.shape[1]
    print(
        f"setup: {args.train} training points, {args.test} test points, {args.steps} steps, d = {d} weights, "
        f"{args.quadrature} Gauss-Legendre nodes/step, float64, {args.threads} threads, {device}"
    )
    print(
        f"training (recorded):  {t_train:8.2f} s   path in memory {path.nbytes / 2**20:.1f} MiB "
        f"((N+1) d weights + N M K coefficients)   train accuracy {float(path.accuracies[-1]):.4f}"
    )

    net_out = DiscretePathKernel(path).network_output(test_x)
    results = {}
    for label, tol in (("batched, fixed rule", None), ("batched, adaptive 1e-9", 1e-9)):
        kernel = DiscretePathKernel(path, quadrature_points=args.quadrature, tolerance=tol)
        t0 = clock(device)
        out = kernel.predict(test_x)
        seconds = clock(device) - t0
        results[label] = seconds
        print(
            f"{label:<24} {seconds:8.2f} s   max |network - kernel| = {float((out - net_out).abs().max()):.2e}   "
            f"peak RSS {rss_mib():.0f} MiB (process start {base:.0f})"
        )

    short = truncated(path, args.naive_steps)
    fast_short = DiscretePathKernel(short, quadrature_points=args.quadrature, variant="continuous")
    t0 = clock(device)
    fast = fast_short.predict(test_x)
    fast_seconds = clock(device) - t0
    before = rss_mib()
    t0 = clock(device)
    slow = reference_predict(short, test_x, quadrature_points=args.quadrature)
    slow_seconds = clock(device) - t0
    naive_total = slow_seconds * args.steps / args.naive_steps
    per_step_jacobians = (args.train + args.test) * 2 * d * 8 / 2**20
    print(
        f"naive per-sample loop    {slow_seconds:8.2f} s on {args.naive_steps} steps -> {naive_total:.1f} s for {args.steps} "
        f"(scaled; batched on the same {args.naive_steps} steps: {fast_seconds:.2f} s, outputs differ by "
        f"{float((fast - slow).abs().max()):.1e})   explicit Jacobians {per_step_jacobians:.1f} MiB per step, "
        f"peak RSS {max(before, rss_mib()):.0f} MiB"
    )
    for label, seconds in results.items():
        print(f"speed-up, {label}: {naive_total / seconds:.0f}x")


if __name__ == "__main__":
    main()
