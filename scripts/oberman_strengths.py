"""Oberman's ordering on MNIST against the objectives' strengths: median DeepFool L2 distance vs strength.

    .venv/bin/python scripts/oberman_strengths.py --data-root DIR_WITH_MNIST [--out DIR] [--outputs-root DIR]
    .venv/bin/python scripts/oberman_strengths.py --collect-only SWEEP_DIR ...   (plot sweeps already run)

The source (Oberman, Finlay & Calder, CIFAR-10 ResNeXt) orders the median minimal distance J0 < J1 < J2 < J2-Lip
at one strength per objective that it does not state for MNIST. This runs `robust attack --multirun
experiment=oberman_table scale=cpu` (LeNet, 10,000 MNIST images, 5 epochs, DeepFool on 1,000 test points) once per
objective with its strength swept: J1 the FGSM step (Linf eps), J2 the L2 step, J2-Lip the tulip step (its
Lipschitz weight 0.1, tanh head and weight decay as in the preset); J0 once. It writes oberman_strengths.csv
(objective, strength, median L2 distance (with --seeds N: the mean of the N per-seed medians, and their standard
deviation), % error at L2 eps 0.1, clean % error) and oberman_strengths.png (median distance vs strength, one line
per objective, J0 dashed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

STRENGTHS = {"j1": [0.025, 0.05, 0.1, 0.2], "j2": [0.5, 1.0, 2.0, 3.0], "j2_lip": [0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]}
NAMES = {"none": "J0", "fgsm_at": "J1 (FGSM AT, Linf eps)", "l2_at": "J2 (L2 AT, L2 eps)", "tulip": "J2-Lip (tulip, L2 eps)"}


def run_sweeps(args) -> list[Path]:
    robust = Path(sys.executable).with_name("robust")
    common = ["experiment=oberman_table", "scale=cpu", f"data.root={args.data_root}", "data.download=false", f"outputs_root={args.outputs_root}"]
    sweeps = []
    for objective, strengths in [("j0", None), *STRENGTHS.items()]:
        sweep = Path(args.out) / "sweeps" / objective
        axis = [f"defense.eps={','.join(map(str, strengths))}"] if strengths else []
        seeds = [f"seed={','.join(str(s) for s in range(args.seeds))}"]
        subprocess.run(
            [str(robust), "attack", "--multirun", *common, f"experiment/oberman_objective={objective}", *axis, *seeds, f"hydra.sweep.dir={sweep}"], check=True
        )
        sweeps.append(sweep)
    return sweeps


def summarise(sweeps) -> pd.DataFrame:
    from robust_cli.results.collect import collect

    c = collect([str(s) for s in sweeps], write=False, figures=False)
    dist, curve = c.frames["distances"], c.frames["curve"]
    strength = lambda f: pd.to_numeric(f["defense.eps"], errors="coerce").fillna(0.0) if "defense.eps" in f else 0.0
    dist = dist.assign(strength=strength(dist))
    curve = curve[curve["norm"] == "l2"].assign(strength=strength(curve))
    rows = []
    for (defense, s), part in dist.groupby(["defense", "strength"]):
        runs = part["run"].unique()
        cv = curve[curve["run"].isin(runs)]
        at = cv[cv["eps"] == 0.1]
        per_run = part.groupby("run")["l2"].median()  # one median per seed; their mean and spread
        rows.append(
            {
                "objective": NAMES.get(defense, defense),
                "defense": defense,
                "strength": s,
                "median_l2": per_run.mean(),
                "median_l2_sd": per_run.std() if len(per_run) > 1 else float("nan"),
                "error_at_0.1": 100 * (1 - at["robust_accuracy"].mean()),
                "clean_error": 100 * (1 - cv["clean_accuracy"].mean()),
                "runs": len(runs),
            }
        )
    return pd.DataFrame(rows).sort_values(["defense", "strength"]).reset_index(drop=True)


def figure(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for defense, part in table[table["defense"] != "none"].groupby("defense"):
        ax.errorbar(part["strength"], part["median_l2"], yerr=part["median_l2_sd"].fillna(0), fmt="o-", capsize=3, label=NAMES.get(defense, defense))
    for value in table.loc[table["defense"] == "none", "median_l2"]:
        ax.axhline(value, color="k", ls="--", lw=1, label="J0 (no defense)")
    ax.set_xscale("log")
    ax.set_xlabel("strength: the objective's eps (J1 Linf, J2 and J2-Lip L2)")
    ax.set_ylabel("median DeepFool L2 distance")
    ax.set_title("Oberman's objectives on MNIST (LeNet, 10,000 images, 5 epochs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--outputs-root", default="outputs")
    p.add_argument("--out", default="oberman_strengths")
    p.add_argument("--collect-only", nargs="+", metavar="SWEEP_DIR", help="plot sweeps already run instead of running them")
    p.add_argument("--seeds", type=int, default=1, help="seeds per strength (seed=0..N-1): median_l2 is then the mean of the per-seed medians")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = summarise(args.collect_only or run_sweeps(args))
    table.to_csv(out / "oberman_strengths.csv", index=False)
    figure(table, out / "oberman_strengths.png")
    pd.set_option("display.width", 160)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"wrote {out / 'oberman_strengths.csv'} and {out / 'oberman_strengths.png'}")


if __name__ == "__main__":
    main()
