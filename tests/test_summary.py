"""The collection's summary (one row per configuration, mean ± sd over seeds, pooled exact intervals) and its
paper-ready LaTeX and markdown."""

import math
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from test_collect import make_run

from robust_cli.commands import collect as collect_command
from robust_cli.results import summary as summaries
from robust_cli.results.collect import collect

ACC = {("none", 0): (0.90, 0.40), ("none", 1): (0.92, 0.46), ("none", 2): (0.88, 0.43), ("trades", 0): (0.80, 0.55), ("trades", 1): (0.82, 0.51)}


def _sweep(root, n=200):
    for (defense, seed), (clean, robust) in ACC.items():
        headline = {"attack": "pgd", "n": n, "clean_accuracy": clean, "robust_accuracy@0": clean, "robust_accuracy@0.1": robust, "seconds": 1.0 + seed}
        make_run(root, f"{defense}-{seed}", choices={"defense": defense, "model": "fc", "dataset": "digits", "attack": "pgd"}, seed=seed, headline=headline)
    return root


def test_one_row_per_configuration_with_mean_sd_n_and_the_pooled_exact_interval(tmp_path):
    c = collect([_sweep(tmp_path / "sweep")], out=tmp_path / "out", figures=False)
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("defense")
    assert list(summary.index) == ["none", "trades"] and summary.loc["none", "runs"] == 3
    for defense in ("none", "trades"):
        values = [r for (d, _), (_, r) in ACC.items() if d == defense]
        row = summary.loc[defense]
        assert row["robust_accuracy@0.1"] == pytest.approx(np.mean(values))
        assert row["robust_accuracy@0.1_sd"] == pytest.approx(np.std(values, ddof=1))
        assert row["robust_accuracy@0.1_n"] == len(values)
        k = sum(round(v * 200) for v in values)
        ci = binomtest(k, 200 * len(values)).proportion_ci(confidence_level=0.95, method="exact")
        assert (row["robust_accuracy@0.1_low"], row["robust_accuracy@0.1_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert c.summary_metrics == ["clean_accuracy", "robust_accuracy@0.1", "seconds"]  # eps 0 is clean accuracy: once
    md = (tmp_path / "out" / "summary.md").read_text().splitlines()
    assert md[0].split("|")[1].strip() == "defense" and "± " in md[2] and "(n=3)" in md[2]
    assert "**0.530 ± 0.028 (n=2)" in md[3]  # trades: the best robust accuracy, bold


def test_the_pooled_interval_covers_the_truth_at_least_95_percent_of_the_time():
    from robust_cli.evaluation.evaluate import clopper_pearson

    gen = np.random.default_rng(0)
    for p in (0.05, 0.4, 0.9):
        covered = 0
        for _ in range(2000):
            k = int(gen.binomial(100, p, size=3).sum())  # three seeds of 100 examples each
            low, high = clopper_pearson(k, 300)
            covered += low <= p <= high
        assert covered / 2000 >= 0.95 - 0.01  # 2000 draws: 1 pp of Monte Carlo slack


def test_rows_and_columns_choose_what_goes_where(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    c = collect([sweep], out=tmp_path / "out", figures=False, rows=["model"], columns=["robust_accuracy@0.1"])
    assert list(c.summary["model"]) == ["fc"] and c.summary["runs"].tolist() == [5]  # both defenses pooled
    assert c.summary_metrics == ["robust_accuracy@0.1"]
    assert collect_command.main([str(sweep), "--rows", "defence", "--out", str(tmp_path / "o")]) == 2
    assert collect_command.main([str(sweep), "--columns", "robust_accuracy@0.3", "--out", str(tmp_path / "o")]) == 2


def test_latex_is_a_booktabs_table_with_caption_label_and_bold_best(tmp_path):
    sweep = _sweep(tmp_path / "sweep")
    collect([sweep], out=tmp_path / "tex", fmt="latex", figures=False)
    tex = (tmp_path / "tex" / "summary.tex").read_text()
    lines = tex.splitlines()
    assert "\\begin{table}[t]" in lines and "\\end{table}" in lines and "\\label{tab:robust-summary}" in lines
    assert [line for line in lines if line in ("\\toprule", "\\midrule", "\\bottomrule")] == ["\\toprule", "\\midrule", "\\bottomrule"]
    caption = next(line for line in lines if line.startswith("\\caption{"))
    assert "model fc; dataset digits" in caption and "Clopper-Pearson" in caption and "$\\pm$" in caption
    trades = next(line for line in lines if line.startswith("trades"))
    assert "\\textbf{0.530} $\\pm$ 0.028" in trades and "\\textbf" not in next(line for line in lines if line.startswith("none")).split("&")[3]
    assert not (tmp_path / "tex" / "runs.tex").exists()  # the raw dump is latex-raw
    collect([sweep], out=tmp_path / "raw", fmt="latex-raw", figures=False)
    assert (tmp_path / "raw" / "runs.tex").is_file()
    if shutil.which("pdflatex") is None:
        pytest.skip("no pdflatex here (Debian: apt-get install texlive-latex-recommended); the structure is checked above")
    (tmp_path / "tex" / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\\input{summary.tex}\\end{document}\n")
    proc = subprocess.run(
        ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path / "tex", capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_best_is_compared_within_an_attack_and_lower_is_better_for_seconds():
    frame = pd.DataFrame(
        {"attack": ["pgd", "pgd", "aa", "aa"], "robust_accuracy@0.1": [0.5, 0.6, 0.4, 0.45], "seconds": [1.0, 2.0, 3.0, 0.5], "n": [1, 2, 3, 4]}
    )
    assert summaries.best_rows(frame, "robust_accuracy@0.1") == {1, 3}
    assert summaries.best_rows(frame, "seconds") == {0, 3}
    assert summaries.best_rows(frame, "n") == set()
    assert math.isnan(summaries.summarize(pd.DataFrame({"status": ["completed"], "seed": [0], "model": ["m"], "x": [1.0]}), ["model", "seed"])[0]["x_sd"][0])
