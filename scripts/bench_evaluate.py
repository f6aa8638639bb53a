#!/usr/bin/env python
"""Our AutoAttack (standard) vs torchattacks' AutoAttack, same model, images, eps, n_iter and queries, side by side;
with --versus fab_l1, our FAB-T in l1 vs Croce & Hein's own (pyautoattack's FABAttack_PT, targeted, 9 targets).

Prints, per round and method: seconds, model evaluations (forward examples and backward examples, counted by hooks)
and robust accuracy; then min and median seconds and the speed ratio. Rounds interleave the two methods (the
machine may be shared); run at --threads 1 for a stable ratio.

    .venv/bin/python scripts/bench_evaluate.py --checkpoint outputs/checkpoints/<key>/model.pt [--model fc200_200_10]
        [--n 1000] [--eps 0.1] [--rounds 2] [--threads 1] [--mnist-root DIR] [--versus autoattack|fab_l1]
    (fab_l1: --eps is the l1 budget, e.g. 5)
--precision bf16 runs our side as `robust attack precision=bf16` does (autocast inside the engine's FastModel; the
reported robust accuracy is always the fp32 model's); --their-precision bf16 hands the peer the same autocast wrapper.
Without --checkpoint it trains fc200_200_10 on MNIST for 3 epochs first (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_attack import DEFAULT_MNIST, load  # noqa: E402

from robust_cli.attacks import FABT, AutoAttack  # noqa: E402
from robust_cli.core.engine import Engine  # noqa: E402


def train_default(model_name, mnist_root):
    """3 epochs of the default recipe through the CLI; returns the checkpoint path."""
    import subprocess

    out = ROOT / "outputs"
    args = [
        sys.executable,
        "-m",
        "robust_cli",
        "train",
        f"model={model_name}",
        "dataset=mnist",
        f"data.root={mnist_root}",
        "data.download=false",
        "train.epochs=3",
        f"outputs_root={out}",
    ]
    subprocess.run(args, check=True, cwd=ROOT)
    return sorted((out / "checkpoints").glob(f"{model_name}-mnist-none-s0-*/model.pt"), key=lambda p: p.stat().st_mtime)[-1]


class Counter:
    """Examples through forward and backward passes of the model."""

    def __init__(self, model):
        self.forward = self.backward = 0
        model.register_forward_hook(lambda m, i, o: self._fwd(i[0]))
        model.register_full_backward_hook(lambda m, gi, go: self._bwd(go[0]))

    def _fwd(self, x):
        self.forward += len(x)

    def _bwd(self, g):
        self.backward += len(g)

    def reset(self):
        self.forward = self.backward = 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fc200_200_10")
    ap.add_argument("--checkpoint")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--n-queries", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--mnist-root", default=DEFAULT_MNIST)
    ap.add_argument("--versus", choices=("autoattack", "fab_l1"), default="autoattack")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="ours (default fp32, as on any CPU with precision=auto)")
    ap.add_argument("--their-precision", choices=("fp32", "bf16"), default="fp32", help="the peer's model: fp32, or our autocast wrapper")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    checkpoint = args.checkpoint or train_default(args.model, args.mnist_root)
    model, data = load(args.model, args.mnist_root, checkpoint, torch.device("cpu"))
    x, y = data.test_x[: args.n], data.test_y[: args.n]
    counter = Counter(model)
    mine = Engine.create(torch.device("cpu"), args.precision).fast(model)  # the model itself at fp32
    peer_model = Engine.create(torch.device("cpu"), args.their_precision).fast(model)

    batches = lambda attack: torch.cat([attack(x[s : s + args.batch_size], y[s : s + args.batch_size]) for s in range(0, len(x), args.batch_size)])
    if args.versus == "autoattack":
        import torchattacks

        peer = "torchattacks"

        def ours():
            aa = AutoAttack(n_queries=args.n_queries)
            return batches(lambda xb, yb: aa(mine, xb, yb, args.eps))

        def theirs():
            aa = torchattacks.AutoAttack(peer_model, eps=args.eps, n_classes=10, seed=0)
            _set_torchattacks(aa, args.n_queries)
            return batches(aa)
    else:
        from pyautoattack.fab_pt import FABAttack_PT

        peer = "pyautoattack"

        def ours():
            fab = FABT(norm="l1", n_iter=100)
            return batches(lambda xb, yb: fab(mine, xb, yb, args.eps))

        def theirs():
            fab = FABAttack_PT(peer_model, norm="L1", n_iter=100, eps=args.eps, seed=0, device="cpu", targeted=True, n_target_classes=9)
            return batches(fab.perturb)

    results = {"robust": [], peer: []}
    for r in range(args.rounds):
        for name, fn in (("robust", ours), (peer, theirs)) if r % 2 == 0 else ((peer, theirs), ("robust", ours)):
            torch.manual_seed(r)
            counter.reset()
            start = time.perf_counter()
            adv = fn()
            seconds = time.perf_counter() - start
            with torch.no_grad():
                acc = float((model(adv).argmax(1) == y).double().mean())
            results[name].append((seconds, counter.forward, counter.backward, acc))
            print(
                f"round {r} {name:12s} {seconds:8.1f} s  forward {counter.forward:>10,}  backward {counter.backward:>10,}  robust accuracy {acc:.4f}",
                flush=True,
            )
    setting = (
        f"linf eps={args.eps}, n_iter=100, square queries={args.n_queries}"
        if args.versus == "autoattack"
        else f"FAB-T l1 eps={args.eps}, n_iter=100, 9 targets"
    )
    print(f"\n{args.model}, n={len(y)}, {setting}, threads={args.threads}, precision ours {args.precision} / theirs {args.their_precision}")
    for name, rows in results.items():
        secs, accs = [r[0] for r in rows], [r[3] for r in rows]
        print(
            f"{name:12s} min {min(secs):7.1f} s  median {statistics.median(secs):7.1f} s  robust accuracy "
            f"{min(accs):.4f}-{max(accs):.4f} (median {statistics.median(accs):.4f})  forward {rows[0][1]:,}  backward {rows[0][2]:,}"
        )
    ratio_min = min(r[0] for r in results[peer]) / min(r[0] for r in results["robust"])
    ratio_med = statistics.median(r[0] for r in results[peer]) / statistics.median(r[0] for r in results["robust"])
    print(f"speed ratio {peer} / robust: min {ratio_min:.2f}x, median {ratio_med:.2f}x" + (" (target >= 1.5)" if args.versus == "autoattack" else ""))


def _set_torchattacks(aa, n_queries):
    """torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) at the paper's settings: it ships 10
    steps for APGD and FAB; set 100, and Square's queries."""
    for attack in aa._autoattack.attacks:
        if type(attack).__name__ == "Square":
            attack.n_queries = n_queries
        else:
            attack.steps = 100


if __name__ == "__main__":
    main()
