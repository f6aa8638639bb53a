"""Seconds per training epoch for fc200_200_10 and c_32 on MNIST (defense none), printed as a table.

usage: python scripts/bench_train.py [--mnist-root DIR] [--device auto] [--n-train N] [--models fc200_200_10 c_32]
Per-epoch time is measured on `--n-train` examples and scaled to the full 60,000 (the loop is linear in n).
"""

import argparse
import tempfile
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from rich.console import Console
from rich.table import Table

from robust_cli.cli import CONF_DIR
from robust_cli.commands import build
from robust_cli.core.engine import resolve_device
from robust_cli.training.loop import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-root", default="../shared/data/mnist")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-train", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["fc200_200_10", "c_32"])
    args = parser.parse_args()
    device = resolve_device(args.device)
    table = Table(title=f"robust train: seconds per MNIST epoch (60,000 examples, batch {args.batch_size}) on {device}")
    for col in ("model", "parameters", "s/epoch (scaled)", "measured s", "examples"):
        table.add_column(col, justify="right")
    for model in args.models:
        with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[
                    f"model={model}",
                    "dataset=mnist",
                    f"data.root={args.mnist_root}",
                    "data.download=false",
                    f"data.n_train={args.n_train}",
                    "train.epochs=1",
                    f"train.batch_size={args.batch_size}",
                    "train.eval_train=false",
                    "data.n_test=100",
                    f"outputs_root={out}",
                ],
            )
            with open_dict(cfg):
                cfg.choices = {"model": model, "dataset": "mnist", "defense": "none"}
            data = build.make_data(cfg)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train(build.make_training_plan(cfg, device), data, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            params = sum(p.numel() for p in build.make_model(cfg, data.meta).parameters())
        table.add_row(model, f"{params:,}", f"{seconds * 60000 / len(data.train_y):.1f}", f"{seconds:.2f}", f"{len(data.train_y):,}")
    Console().print(table)


if __name__ == "__main__":
    main()
