"""The ledger (per-example worst case across runs), its command, and the reference audit of a single attack."""

import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import latest_run

from robust_cli.attacks import PGD
from robust_cli.evaluation import audit
from robust_cli.evaluation import evaluate as ev
from robust_cli.evaluation import ledger as ledgers

COMMON = ("data.n_test=120", "train.epochs=2", "eps=[0,0.05,0.1]", "attack.n_iter=20")


def _row(example, evaluation="e1", broken=1, radius=0.1, eps=0.1, attack="pgd", model="m", recorded=0.0):
    return {
        "model": model,
        "dataset": "digits",
        "split": "test",
        "example": example,
        "norm": "linf",
        "eps": eps,
        "evaluation": evaluation,
        "attack": attack,
        "label": 0,
        "clean_pred": 0,
        "adv_pred": 1 if broken else 0,
        "broken": broken,
        "radius": radius,
        "adversarial": None,
        "position": None,
        "run": f"run-{evaluation}",
        "recorded": recorded,
    }


# ----------------------------------------------------------------------------------------------- the store
def test_a_resumed_batch_is_not_written_twice(tmp_path):
    ledger = ledgers.Ledger(tmp_path)
    rows = [_row(i) for i in range(5)]
    assert ledger.record(rows) == 5
    assert ledger.record(rows) == 0  # the same evaluation's batch again (a resume reads it back)
    assert ledger.record([_row(i, evaluation="e2") for i in range(5)]) == 5  # another evaluation is another row
    assert len(ledger.frame()) == 10


WRITER = """
import sys
from robust_cli.evaluation import ledger as ledgers
sys.path.insert(0, {tests!r})
from test_ledger import _row
ledger = ledgers.Ledger({root!r})
worker = int(sys.argv[1])
for batch in range(25):
    ledger.record([_row(1000 * batch + i, evaluation=f"w{{worker}}") for i in range(40)])
"""


def test_four_processes_writing_at_once_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(Path(__file__).parent), root=str(tmp_path / "out")))
    procs = [subprocess.Popen([sys.executable, str(script), str(w)], stderr=subprocess.PIPE, text=True) for w in range(4)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    con = sqlite3.connect(tmp_path / "out" / ledgers.FILE)
    counts = dict(con.execute("SELECT evaluation, COUNT(*) FROM outcomes GROUP BY evaluation").fetchall())
    assert counts == {f"w{w}": 25 * 40 for w in range(4)}
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_damaged_ledger_is_one_line_saying_to_move_it_aside(tmp_path):
    (tmp_path / ledgers.FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(Exception, match="damaged.*move it aside"):
        ledgers.Ledger(tmp_path).record([_row(0)])


def test_worst_case_counts_a_break_at_a_smaller_eps_and_a_minimal_attack_within_the_radius(tmp_path):
    import pandas as pd

    rows = [_row(i, evaluation="pgd", broken=int(i < 3), radius=0.1 if i < 3 else 0.1, eps=0.1) for i in range(10)]
    rows += [_row(i, evaluation="pgd-small", broken=int(i in (3, 4)), radius=0.05, eps=0.05, attack="apgd_dlr") for i in range(10)]
    # a minimal attack (eps = inf) found example 5 at distance 0.08 (inside 0.1) and example 6 at 0.2 (outside)
    rows += [_row(i, evaluation="fab", broken=1, radius={5: 0.08, 6: 0.2}[i], eps=math.inf, attack="fab") for i in (5, 6)]
    outcomes = pd.DataFrame(rows)
    evaluations = pd.DataFrame([{"model": "m", "dataset": "digits", "split": "test", "norm": "linf", "eps": "[0.1]"}])
    summary, by_attack = ledgers.worst_case(outcomes, evaluations)
    at = {r["eps"]: r for r in summary}
    assert at[0.1]["n"] == 10 and at[0.1]["worst_case_robust_accuracy"] == pytest.approx(4 / 10)  # 0,1,2 + 3,4 + 5 broken
    assert at[0.05]["worst_case_robust_accuracy"] == pytest.approx(8 / 10)
    alone = {(r["eps"], r["attack"]): r for r in by_attack}
    assert alone[(0.1, "fab")]["broke"] == 1 and alone[(0.1, "apgd_dlr")]["broke_alone"] == 2


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A PGD run and an AutoAttack run of the same digits model into one outputs root."""
    root = tmp_path_factory.mktemp("ledger")

    def robust(*args):
        proc = subprocess.run(
            [sys.executable, "-m", "robust_cli", *args], cwd=root, capture_output=True, text=True, env={**__import__("os").environ, "COLUMNS": "200"}
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    first = robust("attack", *COMMON[:3], "attack=pgd", "attack.steps=5", "audit.reference=false")
    pgd = latest_run(root, "attack")
    second = robust("attack", *COMMON, "attack=autoattack", "attack.n_queries=200", "audit=false")
    aa = latest_run(root, "attack")
    return root, pgd, aa, first, second


def test_the_ledger_is_the_per_example_minimum_of_the_runs_examples_csv(two_runs):
    root, pgd, aa, _, second = two_runs
    frames = [pd.read_csv(run / "examples.csv") for run in (pgd, aa)]
    proc = subprocess.run([sys.executable, "-m", "robust_cli", "ledger", "--out", "shown"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(root / "shown" / "ledger.csv")
    assert {"model", "dataset", "norm", "eps", "n", "worst_case_robust_accuracy"} <= set(table.columns)
    for eps in (0.0, 0.05, 0.1):
        robust = [f[f["eps"] == eps].set_index("index").pipe(lambda g: (g["clean_pred"] == g["label"]) & (g["adv_pred"] == g["label"])) for f in frames]
        expected = float((robust[0] & robust[1]).mean())
        row = table[table["eps"] == eps].iloc[0]
        assert row["n"] == 120
        assert row["worst_case_robust_accuracy"] == pytest.approx(expected, abs=1e-12)
        assert row["worst_case_robust_accuracy"] <= min(float(r.mean()) for r in robust)
    attacks = pd.read_csv(root / "shown" / "ledger_attacks.csv")
    assert set(attacks["attack"]) == {"pgd", "autoattack_standard"}
    # the second run saw the first in the ledger: its run.json has the worst case on its examples
    import json

    record = json.loads((aa / "run.json").read_text())
    assert record["ledger"]["worst_case_robust_accuracy"]["0.1"] == pytest.approx(float(table[table["eps"] == 0.1]["worst_case_robust_accuracy"].iloc[0]))


def test_an_imported_tensor_with_one_example_over_budget_is_rejected_and_reported(two_runs, tmp_path):
    root, pgd, _, _, _ = two_runs
    saved = torch.load(pgd / "adversarial.pt", weights_only=True)
    examples = pd.read_csv(pgd / "examples.csv")
    i = 2  # eps = 0.1
    x_adv = saved["x_adv"][i].clone()
    x_adv[0] = (saved["x"][0] + 0.3).clamp(0, 1)  # example 0: far over the 0.1 budget
    index = torch.tensor(sorted(examples["index"].unique()))  # the run's positions; the test-set indices are in the ledger
    import sqlite3

    con = sqlite3.connect(root / "outputs" / ledgers.FILE)
    dataset_index = [e for (e,) in con.execute("SELECT example FROM outcomes WHERE eps = 0.1 AND attack = 'pgd' ORDER BY example")]
    assert len(dataset_index) == len(index)
    before = con.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
    file = tmp_path / "external.pt"
    torch.save({"x_adv": x_adv, "index": torch.tensor(dataset_index), "y": saved["y"]}, file)
    proc = subprocess.run(
        [sys.executable, "-m", "robust_cli", "ledger", "import", str(file), "--model", str(pgd), "--norm", "linf", "--eps", "0.1"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "rejected 1: over the linf budget 0.1" in out
    assert f"accepted {len(index) - 1}" in out
    after = con.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
    assert after - before == len(index) - 1
    # the import agrees with the run it came from: the same examples broken (bar the rejected one)
    imported = dict(con.execute("SELECT example, broken FROM outcomes WHERE attack = 'import:external.pt'").fetchall())
    original = dict(con.execute("SELECT example, broken FROM outcomes WHERE eps = 0.1 AND attack = 'pgd'").fetchall())
    assert dataset_index[0] not in imported
    assert all(imported[e] == original[e] for e in imported)


def test_export_hands_on_the_worst_case_and_its_tensors_reimport(two_runs, tmp_path):
    root, pgd, _, _, _ = two_runs
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "robust_cli", "ledger", "export", "--eps", "0.1", "--out", str(out)], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_csv(out / "worst_case_examples.csv")
    saved = torch.load(out / "adversarial_linf_eps=0.1.pt", weights_only=True)
    adversarial = rows[rows["broken"] & rows["clean_correct"]]
    assert sorted(saved["index"].tolist()) == sorted(adversarial["example"].tolist())
    assert float(rows["radius"][rows["broken"]].max()) <= 0.1 + 1e-9
    fresh = tmp_path / "fresh"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robust_cli",
            "ledger",
            "--root",
            str(fresh),
            "import",
            str(out / "adversarial_linf_eps=0.1.pt"),
            "--model",
            str(pgd),
            "--norm",
            "linf",
            "--eps",
            "0.1",
        ],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"accepted {len(saved['index'])}, of which {len(saved['index'])} are adversarial" in proc.stdout


def test_bad_ledger_input_is_one_line(two_runs, tmp_path):
    root, pgd, _, _, _ = two_runs
    run = lambda *a: subprocess.run([sys.executable, "-m", "robust_cli", "ledger", *a], cwd=root, capture_output=True, text=True)
    missing = run("--root", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: no ledger at") and "Traceback" not in missing.stderr
    torch.save({"x_adv": torch.rand(3, 1, 5, 5)}, tmp_path / "wrong.pt")
    shape = run("import", str(tmp_path / "wrong.pt"), "--model", str(pgd), "--norm", "linf", "--eps", "0.1")
    assert shape.returncode == 2 and "shape (1, 5, 5)" in shape.stderr and len(shape.stderr.strip().splitlines()) == 1
    eps = run("export", "--eps", "0.7")
    assert eps.returncode == 2 and "the ledger has this model at eps 0, 0.05, 0.1" in eps.stderr


# ----------------------------------------------------------------------------------------------- audit checks
def _linear(w, b, scale=1.0):
    model = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        model.weight.copy_(scale * w)
        model.bias.copy_(scale * b)
    return torch.nn.Sequential(torch.nn.Flatten(), model).eval()


def _reference_rows(model, x, eps, steps=10):
    y = ev.predict(model, x)  # every example correctly classified
    pgd = PGD(norm="linf", steps=steps, bounds=(0.0, 1.0))
    torch.manual_seed(0)
    outcomes = ev.accuracy_curve(model, pgd, x, y, [0.0, eps], y)
    torch.manual_seed(0)
    return outcomes, audit.reference_check(model, pgd, x, y, y, outcomes, 256, torch.device("cpu"))


def test_the_reference_check_fires_where_pgd_ce_saturates():
    """A linear model with logits scaled by 1e4: softmax saturates in float32, the CE gradient is exactly 0 on every
    correctly classified example and PGD-CE cannot move; the DLR loss is scale-invariant and finds the breaks."""
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(10, 20, generator=gen), torch.randn(10, generator=gen)
    x = torch.rand(300, 20, generator=gen)
    model = _linear(w, b, scale=1e4)
    outcomes, rows = _reference_rows(model, x, eps=0.05)
    (ref,) = rows
    assert ref["check"] == "reference" and ref["status"] == "warn", ref
    assert "run attack=autoattack" in ref["detail"] and ref["seconds"] > 0
    gradients = audit.gradient_check(model, PGD(norm="linf", bounds=(0.0, 1.0)), x, ev.predict(model, x), ev.predict(model, x), 0.05, torch.device("cpu"), 256)
    assert gradients["status"] == "warn"  # the cause, as the audit's own check sees it


def test_the_reference_check_is_silent_on_a_linear_two_class_model_where_pgd_is_optimal():
    """Two classes, linear: x - eps sign(w1 - w0) is the exact worst case, which PGD finds; nothing is left to the
    reference."""
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(2, 20, generator=gen), torch.zeros(2)
    x = torch.rand(300, 20, generator=gen)
    model = _linear(w, b)
    outcomes, rows = _reference_rows(model, x, eps=0.03)
    (ref,) = rows
    assert ref["status"] == "ok", ref
    y = ev.predict(model, x)
    d = (w[1] - w[0]) * torch.where(y == 1, -1.0, 1.0)[:, None]  # the direction toward the other class, per example
    exact = ev.predict(model, (x + 0.03 * d.sign()).clamp(0, 1)) != y  # the box only removes moves that were not needed
    assert float(outcomes[1].success.double().mean()) == pytest.approx(float(exact.double().mean()), abs=0.01)


def test_the_ledger_check_names_the_examples_an_earlier_run_broke():
    y = torch.tensor([0, 1, 2, 3])
    outcome = ev.Outcome(0.1, torch.zeros(4, 1), pred=torch.tensor([0, 1, 2, 0]), success=torch.tensor([False, False, False, True]), seconds=0.0)
    known = {10: (0.05, "apgd_dlr", "r1"), 11: (0.2, "apgd_dlr", "r1"), 13: (0.01, "pgd", "r2")}
    (row,) = audit.ledger_check([outcome], y, y, torch.tensor([10, 11, 12, 13]), known)
    assert row["status"] == "warn" and row["detail"].startswith("1 examples") and "apgd_dlr 1" in row["detail"]


def test_untargeted_dlr_breaks_alone_recommend_the_plus_version():
    rows = [{"model": "abcdef123", "eps": 0.1, "attack": "apgd_dlr", "broke_alone": 2}, {"model": "abcdef123", "eps": 0.1, "attack": "pgd", "broke_alone": 5}]
    (line,) = ledgers.advice(rows)
    assert "APGD-DLR alone broke 2" in line and "attack.version=plus" in line


def test_a_full_disk_under_the_ledger_is_the_one_line_of_a_full_disk(tmp_path):
    from robust_cli.core import store

    error = ledgers.Ledger(tmp_path)._error(sqlite3.OperationalError("database or disk is full"))
    assert isinstance(error, store.DiskFull) and "ledger.sqlite" in str(error)


def test_the_model_identity_is_the_weights_whatever_holds_them():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())  # a 0-dim buffer too
    twin = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten())
    twin.load_state_dict(net.state_dict())
    assert ledgers.weights_digest(net) == ledgers.weights_digest(twin)
    with torch.no_grad():
        twin[0].weight[0, 0, 0, 0] += 1e-6
    assert ledgers.weights_digest(net) != ledgers.weights_digest(twin)
