#!/usr/bin/env python
"""GPU throughput of robust's engine, one table (scripts/gpu_check.sh runs it; no downloads).

Rows:
- train: images/s of one SGD step (forward, backward, update) for fc200_200_10 and c_32 on MNIST-shaped
  28x28 batches and ResNet-18 on 32x32x3, in fp32 / bf16 / bf16 + torch.compile;
- pgd10: PGD-10 images/s on ResNet-18 32x32 (Linf 8/255, step 2/255, random start) at the batch batch_size=auto
  finds, ours vs torchattacks' PGD at the same settings, and our time over the floor 10 x (forward + input-gradient
  backward) at the same precision;
- autoattack: our autoattack (standard) images/s on ResNet-18 32x32 (untrained weights, labels = its own
  predictions: the cascade stops once everything is broken, so a robust model costs more);
- persistence: classifications per second of persistence sampling on c_32;
- peak memory of each (torch.cuda.max_memory_allocated).
With --mnist-root the MNIST rows use real images (first batch of the training set); otherwise uniform noise of the
same shape (throughput does not depend on the pixels). `--device cpu --quick` runs everything tiny (tests).

    .venv/bin/python scripts/bench_gpu.py [--device cuda] [--mnist-root DIR] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from robust_cli.attacks import PGD, AutoAttack  # noqa: E402
from robust_cli.core.data import DatasetMeta  # noqa: E402
from robust_cli.core.engine import BatchSize, Engine, fit_batch  # noqa: E402

MODELS = {  # name -> (model YAML, input shape)
    "fc200_200_10": ("fc200_200_10", (1, 28, 28)),
    "c_32": ("c_32", (1, 28, 28)),
    "resnet18": ("resnet18", (3, 32, 32)),
}


def build(name, device):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from robust_cli.core.models import Classifier

    yaml, shape = MODELS[name]
    spec = OmegaConf.to_container(OmegaConf.load(ROOT / "robust_cli" / "conf" / "model" / f"{yaml}.yaml"), resolve=True)
    if "defaults" in spec:  # c_32 = cnn.yaml + channels
        base = OmegaConf.to_container(OmegaConf.load(ROOT / "robust_cli" / "conf" / "model" / "cnn.yaml"), resolve=True)
        spec = {**base, **{k: v for k, v in spec.items() if k != "defaults"}}
    torch.manual_seed(0)
    net = instantiate(spec, input_shape=shape, num_classes=10)
    meta = DatasetMeta(name, shape, 10)
    return Classifier(net, 10).to(device), shape, meta


def images(shape, n, device, mnist_root=None):
    if mnist_root and shape == (1, 28, 28):
        from robust_cli.core.data import IdxImages

        ds = IdxImages("MNIST", "MNIST", name="mnist", shape=shape, num_classes=10)
        x, y, _, _ = ds._load(mnist_root, False)
        reps = -(-n // len(x))
        return x.repeat(reps, 1, 1, 1)[:n].to(device), y.repeat(reps)[:n].to(device)
    g = torch.Generator().manual_seed(0)
    return torch.rand((n, *shape), generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat):
    """(seconds per call: the best of `repeat`, peak memory in MiB); one warm-up call first (compilation, autotune)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return best, peak


def train_rows(args, device):
    rows = []
    batch = 32 if args.quick else 256
    steps = 2 if args.quick else 20
    settings = [("fp32", False), ("bf16", False), ("bf16", True)]
    for name in MODELS:
        model, shape, _ = build(name, device)
        x, y = images(shape, batch * steps, device, args.mnist_root)
        for precision, compiled in settings:
            if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                continue
            engine = Engine.create(device, precision, compiled, "auto", warn=lambda m: print(f"  note: {m}", file=sys.stderr))
            model.train()
            fast = engine.fast(model)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def epoch():
                for s in range(steps):
                    xb, yb = x[s * batch : (s + 1) * batch], y[s * batch : (s + 1) * batch]
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(fast(xb), yb).backward()
                    opt.step()

            seconds, peak = timed(epoch, device, 1 if args.quick else 3)
            label = precision + (" + compile" if compiled else "")
            rows.append(
                {"what": "train", "model": name, "setting": label, "batch": batch, "value": batch * steps / seconds, "unit": "images/s", "peak_MiB": peak}
            )
            print(f"train {name:13s} {label:15s} {batch * steps / seconds:12.0f} images/s", file=sys.stderr)
    return rows


def floor(model, x, y, steps):
    for _ in range(steps):
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)


def attack_rows(args, device):
    rows = []
    model, shape, _ = build("resnet18", device)
    model.eval()
    n_max = 64 if args.quick else 16384
    x, _ = images(shape, n_max, device)
    with torch.no_grad():
        y = torch.cat([model(x[i : i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    eps, alpha = 8 / 255, 2 / 255
    precisions = ["fp32"] + (["bf16"] if device.type != "cuda" or torch.cuda.is_bf16_supported() else [])
    for precision in precisions:
        engine = Engine.create(device, precision, False, "auto")
        fast = engine.fast(model)
        ours = PGD(norm="linf", steps=10, step_size=alpha)
        batch = BatchSize("auto", "batch_size", device, limit=n_max, start={"cuda": 8192, "cpu": 32})

        def probe(bs):  # the size auto finds: one PGD-10 batch that fits
            ours(fast, x[:bs], y[:bs], eps)
            sync(device)
            return bs

        bs = fit_batch(probe, batch)
        xb, yb = x[:bs], y[:bs]
        seconds, peak = timed(lambda: ours(fast, xb, yb, eps), device, 1 if args.quick else 3)
        floor_s, _ = timed(lambda: floor(fast, xb, yb, 10), device, 1 if args.quick else 3)
        rows.append(
            {
                "what": "pgd10",
                "model": "resnet18",
                "setting": f"ours {precision}",
                "batch": bs,
                "value": bs / seconds,
                "unit": "images/s",
                "peak_MiB": peak,
                "over_floor": seconds / floor_s,
            }
        )
        print(f"pgd10 ours {precision}: {bs / seconds:.0f} images/s at batch {bs}, {seconds / floor_s:.2f}x the floor", file=sys.stderr)
        try:
            import torchattacks
        except ImportError:
            print("  torchattacks is not installed (pip install 'robust[test]'): no comparison row", file=sys.stderr)
            continue
        theirs = torchattacks.PGD(fast, eps=eps, alpha=alpha, steps=10, random_start=True)
        t_seconds, t_peak = timed(lambda: theirs(xb, yb), device, 1 if args.quick else 3)
        rows.append(
            {
                "what": "pgd10",
                "model": "resnet18",
                "setting": f"torchattacks {precision}",
                "batch": bs,
                "value": bs / t_seconds,
                "unit": "images/s",
                "peak_MiB": t_peak,
                "over_floor": t_seconds / floor_s,
                "ours_speedup": t_seconds / seconds,
            }
        )
        print(f"pgd10 torchattacks {precision}: {bs / t_seconds:.0f} images/s; ours at {t_seconds / seconds:.2f}x their speed", file=sys.stderr)
    # the ensemble, at the precision auto picks
    engine = Engine.create(device, "auto", False, "auto")
    fast = engine.fast(model)
    n = 32 if args.quick else 1024
    ensemble = AutoAttack(version="standard", norm="linf", n_iter=5 if args.quick else 100, n_queries=20 if args.quick else 5000)
    chunk = min(n, 32 if args.quick else 512)
    seconds, peak = timed(lambda: [ensemble(fast, x[i : i + chunk], y[i : i + chunk], eps) for i in range(0, n, chunk)], device, 1)
    rows.append(
        {
            "what": "autoattack",
            "model": "resnet18",
            "setting": f"standard {engine.precision}",
            "batch": chunk,
            "value": n / seconds,
            "unit": "images/s",
            "peak_MiB": peak,
        }
    )
    print(f"autoattack: {n / seconds:.0f} images/s", file=sys.stderr)
    return rows


def persistence_rows(args, device):
    from robust_cli.analysis.persistence import persistence

    model, shape, _ = build("c_32", device)
    model.eval()
    engine = Engine.create(device, "auto", False, "auto")
    fast = engine.fast(model)
    x, _ = images(shape, 4 if args.quick else 64, device, args.mnist_root)
    batch = BatchSize("auto", "persistence.batch_size", device, start={"cuda": 65536, "cpu": 1024})
    result = {}

    def run():
        result["p"] = persistence(fast, x, 0.7, method="fast", seed=0, batch_size=batch)

    seconds, peak = timed(run, device, 1)
    evaluations = int(result["p"].evaluations.sum())
    print(f"persistence c_32: {evaluations / seconds:.0f} classifications/s", file=sys.stderr)
    return [
        {
            "what": "persistence",
            "model": "c_32",
            "setting": f"fast {engine.precision}",
            "batch": batch.size,
            "value": evaluations / seconds,
            "unit": "classifications/s",
            "peak_MiB": peak,
        }
    ]


def table(rows, device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"device: {name}, torch {torch.__version__}",
        "",
        "| what | model | setting | batch | throughput | peak MiB | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        note = []
        if "over_floor" in r:
            note.append(f"{r['over_floor']:.2f}x floor")
        if "ours_speedup" in r:
            note.append(f"ours at {r['ours_speedup']:.2f}x their speed")
        lines.append(f"| {r['what']} | {r['model']} | {r['setting']} | {r['batch']} | {r['value']:.0f} {r['unit']} | {r['peak_MiB']:.0f} | {', '.join(note)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mnist-root", default=None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs (tests, CPU)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (--device cpu --quick checks that the script runs)")
        return 0
    rows = train_rows(args, device) + attack_rows(args, device) + persistence_rows(args, device)
    print(table(rows, device))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
