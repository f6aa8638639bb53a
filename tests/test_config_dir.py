"""Hydra's documented way to add one's own YAML: `--config-dir DIR` beside the package's configs, single run and sweep."""

import pytest
import torch

from tests.conftest import latest_run


@pytest.mark.parametrize("flag", [["--config-dir", "myconf"], ["-cd", "myconf"], ["--config-dir=myconf"]])
def test_a_model_of_ones_own_from_config_dir_trains_in_a_single_run(robust, tmp_path, flag):
    (tmp_path / "myconf" / "model").mkdir(parents=True)
    (tmp_path / "myconf" / "model" / "mine.yaml").write_text("_target_: robust_cli.core.models.MLP\nhidden: [7]\n")
    proc = robust("train", *flag, "model=mine", "dataset=digits", "train.epochs=1", "data.n_train=100", check=True)
    run = latest_run(tmp_path, "train")
    assert run.name.endswith("mine-digits-none"), proc.stdout
    weights = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert tuple(weights["net.layers.0.weight"].shape) == (7, 64)  # the YAML's hidden layer, on digits' 8x8 inputs


def test_a_missing_config_dir_is_one_line(robust):
    proc = robust("train", "--config-dir", "nowhere", "model=mine")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --config-dir nowhere: no such folder")


def _yaml(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_conf_in_the_current_folder_goes_ahead_of_the_shipped_configs(robust, tmp_path):
    """./conf is searched first: a file named like a shipped option replaces it (the installed package stays as it
    is), and a new one is an option like the others, listed by --help with a star."""
    _yaml(tmp_path / "conf" / "model" / "fc200_200_10.yaml", "_target_: robust_cli.core.models.MLP\nhidden: [9]\n")
    _yaml(tmp_path / "conf" / "attack" / "pgd_strong.yaml", "_target_: robust_cli.attacks.PGD\nnorm: linf\nsteps: 3\nrestarts: 2\n")
    robust("train", "train.epochs=1", "data.n_train=100", check=True)
    weights = torch.load(latest_run(tmp_path, "train") / "model.pt", weights_only=True)["state_dict"]
    assert tuple(weights["net.layers.0.weight"].shape) == (9, 64)
    proc = robust("attack", "attack=pgd_strong", "eps=[0,0.1]", "data.n_test=30", "audit=false", "train.epochs=1", "data.n_train=100", check=True)
    assert "pgd" in proc.stdout
    usage = robust("--help").stdout
    assert "pgd_strong*" in usage and "fc200_200_10*" in usage and "from your config folders" in usage


def test_config_dir_and_searchpath_work_in_a_sweep(robust, tmp_path):
    _yaml(tmp_path / "myconf" / "attack" / "pgd3.yaml", "_target_: robust_cli.attacks.PGD\nnorm: linf\nsteps: 3\n")
    common = ("eps=[0,0.1]", "data.n_test=30", "audit=false", "train.epochs=1", "data.n_train=100")
    robust("attack", "--multirun", "--config-dir", "myconf", "attack=pgd3,fgsm", *common, check=True)
    searched = robust("attack", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "attack=pgd3", *common, check=True)
    assert "pgd" in searched.stdout
