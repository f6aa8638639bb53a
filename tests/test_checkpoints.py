"""Checkpoints from elsewhere (issue 16): bare state dicts, wrappers, DataParallel prefixes, safetensors; pickles
that need code are refused without running it."""

import pickle

import pytest
import torch

from robust_cli.core import registry
from robust_cli.core.errors import UserError


def weights():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)).state_dict()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {"model": sd, "optimizer": {}},
        lambda sd: {"net": sd},
        lambda sd: {"model_state_dict": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
)
def test_wrappers_and_prefixes_load_to_the_same_weights(tmp_path, wrap):
    sd = weights()
    torch.save(wrap(sd), tmp_path / "w.pth")
    loaded = registry.load_checkpoint(tmp_path / "w.pth")["state_dict"]
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_safetensors_loads_the_same_weights(tmp_path):
    from safetensors.torch import save_file

    sd = weights()
    save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = registry.load_checkpoint(tmp_path / "w.safetensors")["state_dict"]
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


class Payload:
    """Unpickling this would call os.system: the loader must refuse it before anything runs."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_pickle_that_needs_code_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(UserError, match="would run code"):
        registry.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def test_garbage_and_tensorless_files_are_one_line(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot be read"):
        registry.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        registry.load_checkpoint(tmp_path / "empty.pt")


def test_an_external_state_dict_attacks_through_the_cli(robust, tmp_path):
    """A bare DataParallel-style state dict of the zoo's fc200 on digits, as another codebase would save it."""
    from hydra import compose, initialize_config_dir

    from robust_cli.cli import CONF_DIR
    from robust_cli.commands import build

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("attack", overrides=["model=fc200_200_10", "dataset=digits"])
    model = build.make_model(cfg, build.make_dataset(cfg).meta)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "theirs.pth")
    proc = robust("attack", "checkpoint=theirs.pth", "data.n_test=30", "audit=false", "attack=fgsm", check=True)
    assert "robust_accuracy@0.1" in proc.stdout
    torch.save({"model": {"wrong.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    bad = robust("attack", "checkpoint=other.pth", "data.n_test=30", "audit=false")
    assert bad.returncode == 2 and "does not match the configured model" in bad.stderr and "wrong.weight" in bad.stderr
