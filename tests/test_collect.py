"""`robust collect` on synthetic run directories: columns, failures, formats, paper tables, figures, exit codes."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from robust_cli.commands import collect as collect_command
from robust_cli.results.collect import collect, run_columns, to_markdown
from robust_cli.results.paper_tables import preset_block


def make_run(
    root,
    name,
    *,
    command="attack",
    status="completed",
    choices=None,
    seed=0,
    overrides=(),
    csvs=None,
    checkpoint=None,
    headline=None,
    experiment=None,
    config_extra=None,
):
    """A run directory as the CLI writes it: run.json plus CSVs."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    choices = dict(choices or {})
    if experiment:
        choices["experiment"] = experiment
    record = {
        "command": command,
        "status": status,
        "overrides": list(overrides),
        "choices": choices,
        "config": {"seed": seed, **(config_extra or {})},
        "headline": headline or {},
        "warnings": [],
        "error": None if status == "completed" else "boom",
    }
    if checkpoint:
        record["checkpoint"] = str(checkpoint)
    (run / "run.json").write_text(json.dumps(record))
    for kind, rows in (csvs or {}).items():
        pd.DataFrame(rows).to_csv(run / f"{kind}.csv", index=False)
    return run


def curve_rows(acc_by_eps, norm="l2", attack="deepfool", clean=None):
    clean = acc_by_eps[0] if clean is None else clean
    return [{"attack": attack, "norm": norm, "eps": e, "clean_accuracy": clean, "robust_accuracy": a} for e, a in acc_by_eps.items()]


def test_run_columns_take_choices_seed_and_overrides():
    record = {
        "command": "train",
        "status": "completed",
        "choices": {"model": "fc10_4", "defense": "tulip", "dataset": "digits"},
        "config": {"seed": 3},
        "overrides": ["defense=tulip", "seed=3", "data.n_train=200", "+train.lr=0.5", "tag=abc"],
    }
    cols = run_columns(record, "some/run")
    assert cols["defense"] == "tulip" and cols["model"] == "fc10_4" and cols["seed"] == 3
    assert cols["data.n_train"] == 200 and isinstance(cols["data.n_train"], int)
    assert cols["train.lr"] == 0.5 and cols["tag"] == "abc" and cols["run"] == "some/run"


def test_collect_concatenates_with_swept_columns_and_lists_failures(tmp_path):
    sweep = tmp_path / "sweep"
    expected = {}
    for i, (defense, seed) in enumerate([(d, s) for d in ("none", "fgsm_at", "tulip") for s in (0, 1)]):
        accs = {0.0: 0.9, 0.1: 0.5 + 0.1 * i, 0.2: 0.1 + 0.01 * i}
        expected[(defense, seed)] = accs
        make_run(
            sweep,
            f"{i}_m-{defense}-s{seed}",
            choices={"model": "m", "defense": defense},
            seed=seed,
            overrides=[f"defense={defense}", f"seed={seed}"],
            csvs={"curve": curve_rows(accs, norm="linf", attack="pgd")},
        )
    make_run(sweep, "6_m-none-s2", status="user_error", choices={"defense": "none"}, seed=2, overrides=["eps=-1"])
    (sweep / "7_m-none-s3" / ".hydra").mkdir(parents=True)  # a job that died before writing run.json
    (sweep / "7_m-none-s3" / ".hydra" / "config.yaml").write_text("seed: 3\n")

    c = collect([sweep], figures=True)
    curve = pd.read_csv(sweep / "collected" / "curve.csv")
    assert {"defense", "seed", "model", "run"} <= set(curve.columns)
    assert len(curve) == 6 * 3
    for (defense, seed), accs in expected.items():
        part = curve[(curve.defense == defense) & (curve.seed == seed)]
        assert dict(zip(part.eps, part.robust_accuracy)) == pytest.approx(accs)
    failed = pd.read_csv(sweep / "collected" / "failed_runs.csv")
    assert sorted(failed.status) == ["missing", "user_error"]
    assert failed[failed.status == "user_error"].overrides.item() == "eps=-1"
    runs = pd.read_csv(sweep / "collected" / "runs.csv")
    assert len(runs) == 7 and (runs.status == "completed").sum() == 6
    assert (sweep / "collected" / "curves.png").stat().st_size > 1000
    assert c.frames["curve"]["attack"].eq("pgd").all()  # a CSV's own column wins over the config value


def test_train_logs_of_registry_checkpoints_are_collected_once(tmp_path):
    ckpt = tmp_path / "outputs" / "checkpoints" / "m-d-none-s0-abc"
    ckpt.mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2], "test_accuracy": [0.5, 0.7], "seconds": [2.0, 4.0]}).to_csv(ckpt / "train_log.csv", index=False)
    sweep = tmp_path / "sweep"
    for i, eps in enumerate((0.1, 0.2)):  # two attacks on one checkpoint
        make_run(
            sweep,
            f"{i}",
            choices={"defense": "none"},
            overrides=[f"eps={eps}"],
            checkpoint=ckpt / "model.pt",
            csvs={"curve": curve_rows({0.0: 0.9, eps: 0.5}, norm="linf", attack="fgsm")},
        )
    c = collect([sweep], figures=False)
    log = c.frames["train_log"]
    assert list(log.epoch) == [1, 2] and list(log.defense) == ["none", "none"]


def test_formats_agree(tmp_path):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        make_run(
            sweep,
            f"r{seed}",
            command="train",
            choices={"defense": "none"},
            seed=seed,
            csvs={"train_log": [{"epoch": 1, "test_accuracy": 0.5 + seed / 10}, {"epoch": 2, "test_accuracy": 0.6 + seed / 10}]},
        )
    csv = collect([sweep], out=tmp_path / "csv", fmt="csv", figures=False)
    collect([sweep], out=tmp_path / "pq", fmt="parquet", figures=False)
    collect([sweep], out=tmp_path / "md", fmt="markdown-raw", figures=False)
    pq = pd.read_parquet(tmp_path / "pq" / "train_log.parquet")
    pd.testing.assert_frame_equal(pq, pd.read_csv(tmp_path / "csv" / "train_log.csv"), check_dtype=False)
    md = (tmp_path / "md" / "train_log.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(csv.frames["train_log"])
    assert md[0].startswith("| ") and set(md[1]) <= {"|", "-"}
    assert to_markdown(pd.DataFrame({"a": [1.23456789, float("nan")], "b": ["x|y", None]})).splitlines()[2] == "| 1.235 | x\\|y |"


def test_oberman_table_medians_errors_and_references(tmp_path):
    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    medians, errors = {}, {}
    for defense in ("tulip", "none", "l2_at"):  # out of order on purpose
        for seed in (0, 1):
            d = rng.exponential(0.3, size=51)
            d[0], d[1] = 0.0, math.inf  # a misclassified point and a failure both count in the median
            medians.setdefault(defense, []).append(np.median(d))
            acc_01 = float(np.mean(d > 0.1))
            errors.setdefault(defense, []).append(100 * (1 - acc_01))
            make_run(
                sweep,
                f"{defense}-{seed}",
                choices={"defense": defense, "experiment": "oberman_table"},
                seed=seed,
                csvs={
                    "distances": [{"index": i, "l2": v} for i, v in enumerate(d)],
                    "curve": curve_rows({0.0: float(np.mean(d > 0)), 0.1: acc_01, 0.3: float(np.mean(d > 0.3))}),
                },
            )
    c = collect([sweep], figures=True)
    table = c.tables["oberman_table"]
    assert list(table.defense) == ["none", "l2_at", "tulip"]  # J0, J2, J2-Lip order
    source = preset_block("oberman_table")["oberman_table"]["source"]["rows"]
    for _, row in table.iterrows():
        assert row.median_l2 == pytest.approx(np.mean(medians[row.defense]))
        assert row["error_at_0.1"] == pytest.approx(np.mean(errors[row.defense]))
        assert (row.oberman_median_l2, row["oberman_error_at_0.1"]) == tuple(source[row.defense][1:])
    grid = c.tables["oberman_error_vs_eps"]
    assert {"err@0", "err@0.1", "err@0.3"} <= set(grid.columns)
    assert (sweep / "collected" / "table_oberman_table.csv").is_file()


def test_szegedy_table_means_over_seeds_beside_bell(tmp_path):
    sweep = tmp_path / "sweep"
    values = {"fc200_200_10": [(97.0, 0.09, 0.8, 0.3), (96.0, 0.1, 0.6, 0.5)], "fc10_4": [(91.0, 0.12, 0.9, 1.7)]}
    for model, rows in values.items():
        for seed, (acc, dist, nat, adv) in enumerate(rows):
            summary = {"network": model, "test_acc": acc, "avg_distortion": dist, "persistence_nat": nat, "persistence_adv": adv, "n_nat": 10}
            pers = [{"kind": k, "persistence": p, "gamma": 0.7} for k, p in (("natural", nat), ("adversarial", adv)) for _ in range(3)]
            make_run(
                sweep,
                f"{model}-{seed}",
                command="persistence",
                choices={"model": model, "experiment": "szegedy_table"},
                seed=seed,
                csvs={"summary": [summary], "persistence": pers},
            )
    c = collect([sweep])
    t = c.tables["szegedy_table"].set_index("network")
    assert list(t.index) == ["FC10-4", "FC200-200-10"]  # Bell's row order
    assert t.loc["FC200-200-10", "test_acc"] == pytest.approx(96.5)
    assert t.loc["FC200-200-10", "persist_adv"] == pytest.approx(0.4)
    assert t.loc["FC200-200-10", "bell_test_acc"] == 97.61  # Bell (2023) Table 1
    assert bool(t.loc["FC200-200-10", "nat>adv"]) and not bool(t.loc["FC10-4", "nat>adv"])
    assert t.loc["FC200-200-10", "points"] == 20 and t.loc["FC200-200-10", "runs"] == 2
    assert (sweep / "collected" / "persistence.png").stat().st_size > 1000
    names = preset_block("szegedy_table")["szegedy_table"]["names"]
    assert [names[m] for m in ("fc10_0", "fc100_100_10", "c_512")] == ["FC10-0", "FC100-100-10", "C-512"]


def test_ibp_table_seconds_per_epoch_relative_to_none_at_each_size(tmp_path):
    sweep = tmp_path / "sweep"
    for defense, seconds in (("none", 2.0), ("loss_ibp", 3.0)):
        for size, scale in ((100, 1.0), (1000, 10.0)):
            ckpt = tmp_path / "ckpt" / f"{defense}-{size}"
            ckpt.mkdir(parents=True)
            pd.DataFrame({"epoch": [1, 2], "seconds": [scale * seconds, scale * (seconds + 1)]}).to_csv(ckpt / "train_log.csv", index=False)
            for attack, acc in (("fgsm", 0.4), ("noise", 0.8)):
                make_run(
                    sweep,
                    f"{defense}-{size}-{attack}",
                    choices={"defense": defense, "attack": attack, "experiment": "ibp_comparison"},
                    overrides=[f"data.n_train={size}"],
                    checkpoint=ckpt / "model.pt",
                    csvs={"curve": curve_rows({0.0: 0.9, 0.1: acc}, norm="linf", attack=attack)},
                )
    t = collect([sweep], figures=False).tables["ibp_comparison"].set_index(["defense", "data.n_train"])
    assert list(t.index) == [("none", 100), ("none", 1000), ("loss_ibp", 100), ("loss_ibp", 1000)]
    assert t.loc[("loss_ibp", 1000), "seconds_per_epoch"] == pytest.approx(35.0)
    assert t.loc[("loss_ibp", 100), "time_vs_none"] == pytest.approx(3.5 / 2.5)
    assert t.loc[("loss_ibp", 1000), "time_vs_none"] == pytest.approx(3.5 / 2.5)
    assert t.loc[("none", 1000), "time_vs_none"] == pytest.approx(1.0)
    assert t.loc[("none", 100), "test_error"] == pytest.approx(10.0)
    assert t.loc[("none", 100), "err_fgsm@0.1"] == pytest.approx(60.0) and t.loc[("none", 100), "err_noise@0.1"] == pytest.approx(20.0)


def test_collect_command_exit_codes(tmp_path, capsys):
    assert collect_command.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert collect_command.main([str(tmp_path / "empty")]) == 2
    assert "no run directories" in capsys.readouterr().err
    make_run(tmp_path / "sweep", "r0", command="train", choices={"defense": "none"}, csvs={"train_log": [{"epoch": 1, "test_accuracy": 0.5}]})
    assert collect_command.main([str(tmp_path / "sweep"), "--table", "oberman_table"]) == 2  # no data for that table
    assert collect_command.main([str(tmp_path / "sweep"), "--format", "markdown-raw", "--out", str(tmp_path / "o")]) == 0
    assert "train_log.md" in capsys.readouterr().out
    assert (tmp_path / "o" / "train_log.md").is_file()


def test_latex_export_is_booktabs_with_console_numbers_and_escapes(tmp_path):
    from robust_cli.results.collect import to_latex

    sweep = tmp_path / "sweep"
    make_run(sweep, "r0", choices={"defense": "fgsm_at"}, csvs={"curve": curve_rows({0: 0.9, 0.1: 0.523456789}, norm="linf", attack="pgd")})
    collect([sweep], out=tmp_path / "tex", fmt="latex-raw", figures=False)
    tex = (tmp_path / "tex" / "curve.tex").read_text().splitlines()
    assert tex[1].startswith("\\begin{tabular}{") and tex[2] == "\\toprule" and tex[4] == "\\midrule" and tex[-2:] == ["\\bottomrule", "\\end{tabular}"]
    assert "clean\\_accuracy" in tex[3] and "fgsm\\_at" in tex[-3] and "0.5235" in tex[-3]  # escaped; 4 significant digits, as the console
    table = to_latex(pd.DataFrame({"name": ["a&b", "50%"], "value": [1.0, float("nan")]}), "t").splitlines()
    assert table[1] == "\\begin{tabular}{lr}" and table[5] == "a\\&b & 1 \\\\" and table[6] == "50\\% &  \\\\"


def test_robustbench_export_has_the_model_info_fields(tmp_path):
    sweep = tmp_path / "sweep"
    run = make_run(
        sweep,
        "r0",
        choices={"model": "resnet18", "dataset": "cifar10", "defense": "fgsm_rs"},
        csvs={
            "curve": [
                {"attack": "autoattack_standard", "norm": "linf", "eps": e, "n": 1000, "clean_accuracy": 0.8334, "robust_accuracy": a}
                for e, a in ((0.0, 0.8334), (8 / 255, 0.4321))
            ]
        },
    )
    collect([sweep], out=tmp_path / "rb", fmt="robustbench", figures=False)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "rb" / "robustbench").glob("*.json")]
    assert entry["clean_acc"] == "83.34" and entry["autoattack_acc"] == "43.21" and entry["eps"] == "8/255" and entry["threat_model"] == "Linf"
    assert entry["dataset"] == "cifar10" and entry["architecture"] == "resnet18" and entry["number_forward_passes"] == 1 and entry["n_examples"] == 1000
    assert entry["run_dirs"] == [str(run)] and entry["additional_data"] is False and "robust_version" in entry
    assert entry["to_fill"] == ["name", "link", "authors", "venue", "reported"] and all(entry[k] is None for k in ("link", "authors", "venue", "reported"))
    assert entry["warnings"] == ["evaluated on 1000 of the 10,000 test images a leaderboard entry uses: run the evaluation with data.n_test=null"]
    plain = tmp_path / "plain"
    make_run(plain, "r0", csvs={"curve": curve_rows({0: 0.9, 0.1: 0.5}, attack="pgd")})
    code = collect_command.main([str(plain), "--format", "robustbench", "--no-figures"])
    assert code == 2


def test_robustbench_export_is_silent_on_the_full_test_set(tmp_path):
    sweep = tmp_path / "sweep"
    rows = [
        {"attack": "autoattack_standard", "norm": "linf", "eps": e, "n": 10_000, "clean_accuracy": 0.9, "robust_accuracy": a}
        for e, a in ((0.0, 0.9), (8 / 255, 0.5))
    ]
    make_run(sweep, "r0", choices={"model": "wrn_34_10", "dataset": "cifar10", "defense": "trades"}, csvs={"curve": rows})
    collect([sweep], out=tmp_path / "rb", fmt="robustbench", figures=False)
    (entry,) = [json.loads(p.read_text()) for p in (tmp_path / "rb" / "robustbench").glob("*.json")]
    assert entry["warnings"] == [] and entry["n_examples"] == 10_000
