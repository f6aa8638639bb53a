"""Benchmark: `fast` vs Bell's `bracketing` persistence on MNIST FC200-200-10, against a high-precision reference.

    .venv/bin/python scripts/bench_persistence.py --data-root /work/shared/data/mnist [--points 100] [--out DIR]

Points: `--points` correctly classified test images (seeded choice) and their L-BFGS adversarial examples (the
configured `attack=lbfgs`, targets random). The checkpoint comes from the registry (trained first if missing).
Reference: for each point, `--ref-samples` common antithetic draws evaluated at sigmas around the two methods'
answers until two of them bracket gamma, the persistence read off by linear interpolation in log sigma between
them (the estimated stability curve is a step function of height 1/ref-samples, so this is bisection to its
sampling precision). Each method is timed (torch.cuda.synchronize before reading the clock on a GPU) and scored
by its relative error |sigma - sigma_ref| / sigma_ref. Writes bench_persistence.csv (one row per point and method)
and prints the table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from robust_cli.analysis.persistence import PAGE, _Sampler, bracketing, fast_persistence


def load(args):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from robust_cli.cli import CONF_DIR
    from robust_cli.commands import build
    from robust_cli.core import store
    from robust_cli.core.engine import resolve_device
    from robust_cli.evaluation.evaluate import choose_targets, predict, run_attack

    overrides = [
        f"model={args.model}",
        "dataset=mnist",
        f"data.root={args.data_root}",
        "data.download=false",
        "attack=lbfgs",
        f"outputs_root={args.outputs_root}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="bench"):
        cfg = compose(config_name="persistence", overrides=overrides)
    with open_dict(cfg):  # the CLI records the chosen options; the checkpoint key uses them
        cfg.choices = {"model": args.model, "dataset": "mnist", "defense": "none"}
    device = resolve_device(args.device)
    ctx = store.RunContext(Path(tempfile.mkdtemp()), device, {}, build.described(cfg))
    model, data, _ = build.trained_model(cfg, ctx)
    pred = predict(model, data.test_x, device=device)
    gen = torch.Generator().manual_seed(args.seed)
    correct = (pred == data.test_y).nonzero().squeeze(1)
    chosen = correct[torch.randperm(len(correct), generator=gen)[: 2 * args.points]]
    x, y = data.test_x[chosen], data.test_y[chosen]
    attack = instantiate(cfg.attack)
    torch.manual_seed(args.seed)
    target = choose_targets(attack, model, x, y, device=device)
    x_adv = run_attack(model, attack, x, y, target=target, device=device)
    ok = predict(model, x_adv, device=device) == target
    nat = x[: args.points]
    adv = x_adv[ok][: args.points]
    dist = ((adv - x[ok][: args.points]).flatten(1).norm(dim=1) / math.sqrt(x[0].numel())).mean().item()
    print(
        f"model {args.model}: test accuracy {(pred == data.test_y).double().mean().item():.4f}; "
        f"{len(adv)} adversarial of {int(ok.numel())} attacked (success {ok.double().mean().item():.2f}), mean distortion {dist:.4f}"
    )
    return model, device, torch.cat([nat, adv]).to(device), ["natural"] * len(nat) + ["adversarial"] * len(adv), cfg


def reference(model, x, gamma, guesses, n_ref, seed, step=1.04):
    """sigma where the stability estimated on n_ref common antithetic draws crosses gamma (see module doc)."""
    out = []
    for i in range(len(x)):
        sampler = _Sampler(model, x[i : i + 1], antithetic=True, seed=seed, index_offset=i, batch_size=4096)
        label = sampler.center_labels()[0]
        z = sampler.rays(0, range(-(-n_ref // PAGE)))  # the same draws at every sigma

        def stab(sigma):
            with torch.no_grad():
                hits = sum(int((model(x[i : i + 1].flatten(1).add(sigma * zc).view(-1, *x.shape[1:])).argmax(1) == label).sum()) for zc in z.split(4096))
            return hits / n_ref

        lo = hi = guesses[i]
        s_lo = s_hi = stab(lo)
        while s_lo < gamma:  # walk down until stable on the reference draws
            hi, s_hi, lo = lo, s_lo, lo / step
            s_lo = stab(lo)
        if hi == lo:
            hi, s_hi = lo * step, stab(lo * step)
        while s_hi >= gamma:  # walk up until unstable
            lo, s_lo, hi = hi, s_hi, hi * step
            s_hi = stab(hi)
        t = (s_lo - gamma) / (s_lo - s_hi)  # linear in log sigma between the bracketing pair
        out.append(lo * (hi / lo) ** t)
    return torch.tensor(out, dtype=torch.float64)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--outputs-root", default="outputs")
    p.add_argument("--model", default="fc200_200_10")
    p.add_argument("--points", type=int, default=100, help="natural points, and as many adversarial ones")
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--ref-samples", type=int, default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=".")
    p.add_argument("--fast", action="append", default=[], help="extra fast variant as key=value,key=value (repeatable)")
    p.add_argument("overrides", nargs="*", help="hydra overrides, e.g. attack.c_search=minimal")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, device, x, kinds, cfg = load(args)
    from robust_cli.commands.persistence import persistence_options

    cli = persistence_options(cfg) | {"seed": 2}  # the CLI's defaults (persistence.yaml), as `robust persistence` runs them

    methods = {
        "bracketing (n=1000, precision=0.01)": lambda: bracketing(model, x, args.gamma, n_samples=1000, precision=0.01, seed=1),
        "fast (CLI defaults)": lambda: fast_persistence(model, x, args.gamma, **cli),
    }
    for spec in args.fast:
        opts = {k: (v == "true" if v in ("true", "false") else float(v) if "." in v else int(v)) for k, v in (kv.split("=") for kv in spec.split(","))}
        methods[f"fast ({spec})"] = lambda opts=opts: fast_persistence(model, x, args.gamma, **(cli | opts))
    results = {}
    for name, run in methods.items():
        results[name], seconds = timed(run)
        results[name].seconds = seconds
        print(f"{name}: {seconds:.1f} s")
    first = list(results.values())
    guesses = torch.stack([r.sigma for r in first[:2]]).clamp(1e-3, 1e2).log().mean(0).exp()
    finite = torch.isfinite(first[0].sigma) & torch.isfinite(first[1].sigma) & (first[0].sigma > 0) & (first[1].sigma > 0)
    ref = torch.full((len(x),), math.nan, dtype=torch.float64)
    (ref_vals, ref_seconds) = timed(lambda: reference(model, x[finite], args.gamma, guesses[finite].tolist(), args.ref_samples, seed=3))
    ref[finite] = ref_vals
    print(f"reference ({args.ref_samples} antithetic draws per sigma): {ref_seconds:.1f} s")

    rows, table = [], []
    for name, r in results.items():
        err = (r.sigma - ref).abs() / ref
        for i in range(len(x)):
            rows.append(
                {
                    "method": name,
                    "index": i,
                    "kind": kinds[i],
                    "sigma": r.sigma[i].item(),
                    "reference": ref[i].item(),
                    "rel_error": err[i].item(),
                    "ci_low": r.ci_low[i].item(),
                    "ci_high": r.ci_high[i].item(),
                    "evaluations": int(r.evaluations[i]),
                }
            )
        covered = ((r.ci_low <= ref) & (ref <= r.ci_high))[finite].double().mean().item()
        table.append(
            {
                "method": name,
                "evals/point": r.evaluations.double().mean().item(),
                "seconds": r.seconds,
                "median rel err": err[finite].median().item(),
                "mean rel err": err[finite].mean().item(),
                "p90 rel err": err[finite].quantile(0.9).item(),
                "CI coverage": covered,
                "mean nat": r.sigma[[k == "natural" for k in kinds]].mean().item(),
                "mean adv": r.sigma[[k == "adversarial" for k in kinds]].mean().item(),
            }
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "bench_persistence.csv", index=False)
    frame = pd.DataFrame(table).set_index("method")
    base = frame.iloc[0]
    frame["evals ratio"] = base["evals/point"] / frame["evals/point"]
    frame["time ratio"] = base["seconds"] / frame["seconds"]
    pd.set_option("display.width", 200)
    print(
        f"\n{int(finite.sum())} points with a finite reference (mean {ref[finite].mean().item():.4f}); "
        f"{PAGE}-ray pages; device {device}, {args.threads} thread(s)"
    )
    print(frame.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
