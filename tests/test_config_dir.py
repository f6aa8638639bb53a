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
