"""Models and images from elsewhere: torchvision architectures with local weights, a user's own class, image
folders and ImageNet's validation layout, streaming training, robust export. All weights are generated here."""

import json
import os
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from robust_cli.core import store
from tests.conftest import latest_run

IMG = ["dataset.image_size=32", "dataset.resize=36", "data.workers=0"]


def make_folder(root, classes=("cat", "dog", "owl"), per_class=(6, 3), size=(40, 50)):
    """Class c's images are a constant grey level 60 + 60 c (plus a little noise): labels can be read off pixels."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(60 + 60 * c + rng.integers(-5, 6, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / (f"{i}.png" if i % 2 else f"{i}.jpg"), quality=95)
    return root


def test_image_folder_labels_sizes_and_class_restriction(tmp_path):
    from omegaconf import OmegaConf

    from robust_cli.commands import build

    make_folder(tmp_path / "data")

    def cfg(**dataset):
        base = OmegaConf.load("robust_cli/conf/dataset/imagefolder.yaml")
        return OmegaConf.create(
            {
                "seed": 0,
                "data": {"root": str(tmp_path / "data"), "download": False, "n_train": None, "n_test": None, "val_fraction": 0.0, "workers": 0, "memory_gb": 8},
                "dataset": {**OmegaConf.to_container(base), "root": str(tmp_path / "data"), "workers": 0, "image_size": 32, "resize": 36, **dataset},
            }
        )

    data = build.make_data(cfg())
    assert data.meta.class_names == ["cat", "dog", "owl"] and data.meta.num_classes == 3 and data.meta.shape == (3, 32, 32)
    assert tuple(data.test_x.shape) == (9, 3, 32, 32) and tuple(data.train_x.shape) == (18, 3, 32, 32)
    grey = (data.test_x.mean(dim=(1, 2, 3)) * 255 - 60) / 60  # the grey level says the class
    assert torch.equal(grey.round().long(), data.test_y)
    only = build.make_data(cfg(classes=["owl", 0]))
    assert sorted(set(only.test_y.tolist())) == [0, 2] and len(only.test_y) == 6 and only.meta.num_classes == 3


def test_imagenet_flat_validation_layouts(tmp_path):
    from omegaconf import OmegaConf

    from robust_cli.commands import build

    root = tmp_path / "imagenet"
    (root / "val").mkdir(parents=True)
    wnids = [f"n{10000000 + i:08d}" for i in range(1000)]
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    lines = ["ImageId,PredictionString"]
    for i, label in enumerate([11, 11, 14, 999]):
        Image.fromarray(np.full((30, 40, 3), 10 * i, dtype=np.uint8)).save(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        lines.append(f"ILSVRC2012_val_{i + 1:08d},{wnids[label]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    base = OmegaConf.to_container(OmegaConf.load("robust_cli/conf/dataset/imagenet.yaml"))

    def load(**over):
        return build.make_data(
            OmegaConf.create(
                {
                    "seed": 0,
                    "data": {"root": str(root), "download": False, "n_train": None, "n_test": None, "val_fraction": 0.0, "workers": 0, "memory_gb": 8},
                    "dataset": {**base, "root": str(root), "workers": 0, "image_size": 16, "resize": 16, **over},
                }
            )
        )

    data = load()
    assert data.test_y.tolist() == [11, 11, 14, 999] and data.meta.num_classes == 1000 and data.meta.class_names[11] == wnids[11]
    assert load(classes=[11]).test_y.tolist() == [11, 11]  # Bell's goldfinch images
    (root / "LOC_val_solution.csv").unlink()
    (root / "LOC_synset_mapping.txt").unlink()
    (root / "val_labels.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG 5\nILSVRC2012_val_00000002.JPEG 7\nILSVRC2012_val_00000003.JPEG 9\nILSVRC2012_val_00000004.JPEG 1\n"
    )
    assert load().test_y.tolist() == [5, 7, 9, 1]


def _resnet_weights(path, num_classes):
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=num_classes).eval()
    torch.save(net.state_dict(), path)
    return net


def test_torchvision_model_with_local_weights_is_attacked_as_it_is(robust, tmp_path):
    make_folder(tmp_path / "data")
    reference = _resnet_weights(tmp_path / "r18.pth", 3)
    args = ["dataset=imagefolder", *IMG, "model=torchvision", "model.arch=resnet18", f"model.weights={tmp_path / 'r18.pth'}", "attack=fgsm", "eps=[0,0.03]"]
    robust("attack", *args, check=True)
    assert not (tmp_path / "outputs" / "checkpoints").exists()  # pretrained: nothing was trained
    run = latest_run(tmp_path, "attack")
    adv = torch.load(run / "adversarial.pt", weights_only=True)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference((adv["x"] - mean) / std).argmax(1)
    assert torch.equal(adv["clean_pred"], expected)  # the weights were used, normalisation inside the model
    assert json.loads((run / "run.json").read_text())["checkpoint"] == str(tmp_path / "r18.pth")


@pytest.mark.slow
def test_torchvision_model_runs_persistence_and_boundary(robust, tmp_path):
    make_folder(tmp_path / "data")
    _resnet_weights(tmp_path / "r18.pth", 3)
    args = ["dataset=imagefolder", *IMG, "model=torchvision", "model.arch=resnet18", f"model.weights={tmp_path / 'r18.pth'}"]
    for command in (
        ["persistence", "attack=fgsm", "eps=0.05", "n_points=2", "stability.points=0", "line.points=0", "persistence.max_samples=64", "persistence.n_init=8"],
        ["boundary", "n_points=2", "pairs=natural_adversarial", "attack=deepfool"],
    ):
        proc = robust(command[0], *args, *command[1:])
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_weights_of_another_head_size_are_one_line(tmp_path, monkeypatch, capsys):
    from tests.test_reliability import refused_in_process

    make_folder(tmp_path / "data")
    _resnet_weights(tmp_path / "r18_1000.pth", 1000)
    line = refused_in_process(
        ["attack", "dataset=imagefolder", *IMG, "model=torchvision", "model.arch=resnet18", f"model.weights={tmp_path / 'r18_1000.pth'}"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert "1000-class head (fc.weight [1000, 512])" in line and "the dataset has 3 classes" in line
    line = refused_in_process(["attack", "dataset=imagefolder", *IMG, "model=torchvision", "model.arch=resnet181"], tmp_path, monkeypatch, capsys)
    assert "did you mean" in line and "resnet18" in line


def test_torchvision_weights_name_comes_from_the_hub_cache_only(robust, tmp_path, monkeypatch, capsys):
    from tests.test_reliability import refused_in_process

    root = tmp_path / "imagenet"
    (root / "val").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 40 * i, dtype=np.uint8)).save(root / "val" / f"v{i}.JPEG")
    (root / "val_labels.txt").write_text("v0.JPEG 11\nv1.JPEG 14\nv2.JPEG 11\n")
    args = [
        "dataset=imagenet",
        "data.root=imagenet",
        "dataset.image_size=32",
        "dataset.resize=32",
        "data.workers=0",
        "model=torchvision",
        "model.arch=resnet18",
        "model.weights=IMAGENET1K_V1",
        "attack=fgsm",
    ]
    hub = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    line = refused_in_process(["attack", *args], tmp_path, monkeypatch, capsys)
    assert "resnet18-f37072fd.pth is not in the torch hub cache; robust does not download" in line
    assert str(hub / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in line
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    _resnet_weights(hub / "hub" / "checkpoints" / "resnet18-f37072fd.pth", 1000)
    proc = robust("attack", *args, env={"TORCH_HOME": str(hub)}, check=True)
    # the sizes set here differ from the weights' 256/224: one warning each, printed once and kept in run.json
    assert proc.stderr.count("as given; model.weights=IMAGENET1K_V1 was evaluated with") == 2, proc.stderr
    warnings = json.loads((latest_run(tmp_path, "attack") / "run.json").read_text())["warnings"]
    assert sorted(w.split("=")[0] for w in warnings if "as given" in w) == ["dataset.image_size", "dataset.resize"]


def _own_package(tmp_path):
    """A user's package with an nn.Module that takes neither input_shape nor num_classes, and its saved weights."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import torch.nn as nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, width=16):\n"  # no input_shape / num_classes: robust passes only what it takes
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))\n\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from mypkg.nets import Net

        net = Net(width=8)
        torch.save({"model": net.state_dict()}, tmp_path / "mine.pt")  # a wrapper, as other codebases save
    finally:
        sys.path.remove(str(tmp_path))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = ["dataset=digits", "model=python", "model._target_=mypkg.nets.Net", "+model.width=8", f"model.weights={tmp_path / 'mine.pt'}"]
    return args, env


def test_a_users_own_class_runs_attack(robust, tmp_path):
    args, env = _own_package(tmp_path)
    robust("attack", *args, "attack=pgd", env=env, check=True)


@pytest.mark.slow
def test_a_users_own_class_runs_persistence_and_boundary(robust, tmp_path):
    args, env = _own_package(tmp_path)
    robust("persistence", *args, "attack=fgsm", "eps=0.3", "n_points=3", "stability.points=0", "line.points=0", env=env, check=True)
    robust("boundary", *args, "n_points=3", env=env, check=True)


def test_a_class_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch, capsys):
    from tests.test_reliability import refused_in_process

    line = refused_in_process(["attack", "dataset=digits", "model=python", "model._target_=no_such_pkg.nets.Net"], tmp_path, monkeypatch, capsys)
    assert "model._target_=no_such_pkg.nets.Net: cannot import it" in line
    line = refused_in_process(["attack", "model=python"], tmp_path, monkeypatch, capsys)
    assert "model._target_=package.module.Class" in line


def test_training_set_too_large_for_memory_streams_to_the_same_weights(robust, tmp_path):
    make_folder(tmp_path / "data", per_class=(8, 2))
    args = ["train", "dataset=imagefolder", *IMG, "model=c_4", "train.epochs=2", "train.batch_size=8", "data.augment=crop_flip"]
    robust(*args, "outputs_root=memory", check=True)
    robust(*args, "outputs_root=stream", "data.memory_gb=0", "data.workers=2", check=True)
    a = torch.load(next((tmp_path / "memory" / "checkpoints").glob("*/model.pt")), weights_only=True)
    b = torch.load(next((tmp_path / "stream" / "checkpoints").glob("*/model.pt")), weights_only=True)
    assert all(torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-6) for k in a["state_dict"])
    assert a["log"][-1]["train_accuracy"] == b["log"][-1]["train_accuracy"]


def test_export_loads_back_to_identical_outputs(robust, tmp_path, monkeypatch, capsys):
    from robust_cli.core import registry

    common = ["dataset=digits", "train.epochs=1", "data.n_test=50"]
    robust("train", *common, check=True)
    original = registry.load_checkpoint(next((tmp_path / "outputs" / "checkpoints").glob("*/model.pt")))["state_dict"]
    from robust_cli import cli

    monkeypatch.chdir(tmp_path)
    for fmt, suffix in (("safetensors", ".safetensors"), ("pt", ".pt")):
        out = tmp_path / "exported" / f"fc200_{fmt}"
        cli.main(["robust", "export", *common, f"format={fmt}", f"out={out}"])
        meta = json.loads(out.with_suffix(".json").read_text())
        assert meta["config"]["choices"]["model"] == "fc200_200_10" and meta["format"] == fmt
        loaded = registry.load_checkpoint(out.with_suffix(suffix))["state_dict"]
        assert sorted(loaded) == sorted(original) and all(torch.equal(loaded[k], original[k]) for k in original)
    with pytest.raises(SystemExit) as again:
        cli.main(["robust", "export", *common, "format=pt", f"out={out}"])
    assert again.value.code == 2 and "never replaces a file" in capsys.readouterr().err
    # another export publishing the same name between this one's check and its write: refused, not replaced
    late = tmp_path / "exported" / "late"
    real_save = store.save_torch

    def rival_first(path, obj, replace=True):
        path.write_bytes(b"the other export's file")
        return real_save(path, obj, replace)

    monkeypatch.setattr(store, "save_torch", rival_first)
    with pytest.raises(SystemExit) as raced:
        cli.main(["robust", "export", *common, "format=pt", f"out={late}"])
    assert raced.value.code == 2 and "another process meanwhile" in capsys.readouterr().err
    assert late.with_suffix(".pt").read_bytes() == b"the other export's file" and not late.with_suffix(".json").exists()
    monkeypatch.setattr(store, "save_torch", real_save)
    robust("attack", *common, "attack=fgsm", check=True)  # the CLI reads an export back to the same outputs
    first = torch.load(latest_run(tmp_path, "attack") / "adversarial.pt", weights_only=True)
    robust("attack", *common, "attack=fgsm", f"checkpoint={tmp_path / 'exported' / 'fc200_safetensors.safetensors'}", check=True)
    second = torch.load(latest_run(tmp_path, "attack") / "adversarial.pt", weights_only=True)
    assert torch.equal(first["x_adv"], second["x_adv"]) and torch.equal(first["pred"], second["pred"])


def _planted_alexnet(path, images, target=11):
    """Generated alexnet weights that call the given images `target` and respond to input changes: a random
    network's logits barely move, so its last layer is set to whitened random directions of its features."""
    torch.manual_seed(0)
    net = torchvision.models.alexnet(num_classes=1000).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        h = net.classifier[:6](torch.flatten(net.avgpool(net.features((torch.rand(64, 3, *images.shape[2:]) - mean) / std)), 1))
        w = torch.randn(1000, h.shape[1]) / (h.std(0) + 1e-3) / 64 * 3
        net.classifier[6].weight.copy_(w)
        net.classifier[6].bias.copy_(-(w @ h.mean(0)))
        z = net((images - mean) / std)
        net.classifier[6].bias[target] += (z.max(1).values - z[:, target]).max() + 1
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_bell_table2_smoke_runs_end_to_end_with_both_columns(tmp_path):
    import subprocess

    import pandas as pd
    from torchvision.transforms import functional as TF

    root = tmp_path / "imagenet" / "val"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(root / f"g{i}.JPEG")
        lines.append(f"g{i}.JPEG 11")
    Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(root / "other.JPEG")
    (tmp_path / "imagenet" / "val_labels.txt").write_text("\n".join(lines + ["other.JPEG 5"]) + "\n")
    images = torch.stack(
        [TF.pil_to_tensor(TF.center_crop(TF.resize(Image.open(root / f"g{i}.JPEG").convert("RGB"), 64), [64, 64])).float() / 255 for i in range(3)]
    )
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    _planted_alexnet(hub / "alexnet-owt-7be5be79.pth", images)
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "robust_cli", "persistence", "--multirun", "experiment=bell_table2", "scale=smoke", "data.root=imagenet", "data.workers=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(next((tmp_path / "outputs" / "persistence" / "multirun").glob("*/*/collected/table_bell_table2.csv")))
    assert table[["network", "attack"]].values.tolist() == [["alexnet", "total"], ["alexnet", "bim"], ["alexnet", "pgd"]]
    assert table.bell_persist_nat.tolist() == [0.0155, 0.0162, 0.0162] and table.bell_persist_adv.tolist() == [0.0049, 0.0050, 0.0050]
    assert (table.persist_nat > 0).all() and (table.persist_adv > 0).all() and (table.points_adv > 0).all()
    for run in (tmp_path / "outputs" / "persistence" / "multirun").glob("*/*/[0-9]*"):  # 2 distinct targets per image (full: 28)
        rows = pd.read_csv(run / "persistence.csv")
        adv = rows[rows.kind == "adversarial"]
        assert len(adv) == 2 * (rows.kind == "natural").sum() and (adv.groupby("index").target.nunique() == 2).all()


def test_timm_model_or_one_line_saying_how_to_get_it(robust, tmp_path):
    make_folder(tmp_path / "data")
    try:
        import timm
    except ImportError:
        proc = robust("attack", "dataset=imagefolder", *IMG, "model=timm", "model.arch=resnet18")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            "error: model=timm needs the timm package: pip install 'robust[zoo]' (or pip install timm)"
        ]
        return
    net = timm.create_model("resnet18", pretrained=False, num_classes=3)
    torch.save(net.state_dict(), tmp_path / "t.pth")
    robust("attack", "dataset=imagefolder", *IMG, "model=timm", "model.arch=resnet18", f"model.weights={tmp_path / 't.pth'}", "attack=fgsm", check=True)


def test_torchvision_weights_bring_their_resize_and_crop(tmp_path, monkeypatch):
    """resnet50's IMAGENET1K_V2 is evaluated at resize 232 / crop 224, efficientnet_b3's V1 at 320 / 300: the dataset
    takes those sizes; one set on the command line stays, with a warning; a weights file changes nothing."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from robust_cli.cli import CONF_DIR
    from robust_cli.commands import build

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    for name in ("resnet50-11ad3fa6.pth", "efficientnet_b3_rwightman-b3899882.pth"):  # only their presence is checked here
        (tmp_path / "hub" / "checkpoints" / name).write_bytes(b"")

    def dataset(*overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="attack"):
            cfg = compose(config_name="attack", overrides=["dataset=imagefolder", "data.root=somewhere", *overrides], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            return build.make_dataset(cfg), build.weights_sizes(cfg)[1]

    ds, warnings = dataset("model=torchvision", "model.arch=resnet50", "model.weights=IMAGENET1K_V2")
    assert warnings == []
    assert (ds.resize, ds.image_size, ds.meta.shape) == (232, 224, (3, 224, 224))
    ds, _ = dataset("model=torchvision", "model.arch=efficientnet_b3", "model.weights=IMAGENET1K_V1")
    assert (ds.resize, ds.image_size) == (320, 300)
    ds, warnings = dataset("model=torchvision", "model.arch=efficientnet_b3", "model.weights=IMAGENET1K_V1", "dataset.image_size=64", "dataset.resize=80")
    assert (ds.resize, ds.image_size) == (80, 64)
    out = " ".join(warnings)
    assert "dataset.image_size=64 as given; model.weights=IMAGENET1K_V1 was evaluated with image_size 300" in out
    assert "dataset.resize=80 as given" in out
    ds, _ = dataset("model=torchvision", "model.arch=resnet50", "model.weights=weights.pth")
    assert (ds.resize, ds.image_size) == (256, 224)
    assert str(ds.root) == "somewhere"  # the interpolated root still resolves


def _fake_robustbench(root):
    """A package laid out as robustbench 1.1.1 is: a top-level __init__ that cannot import (as the real one, which
    needs pkg_resources and a git-only package), and a model zoo that can. One single-checkpoint model, one ensemble."""
    pkg = root / "robustbench"
    (pkg / "model_zoo").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import a_module_that_is_not_installed\n")
    (pkg / "model_zoo" / "__init__.py").write_text("from .models import model_dicts\n")
    (pkg / "model_zoo" / "enums.py").write_text(
        "from enum import Enum\n"
        "class BenchmarkDataset(Enum):\n    cifar_10 = 'cifar10'\n    cifar_100 = 'cifar100'\n    imagenet = 'imagenet'\n"
        "class ThreatModel(Enum):\n    Linf = 'Linf'\n    L2 = 'L2'\n    corruptions = 'corruptions'\n"
    )
    (pkg / "model_zoo" / "models.py").write_text(
        "from collections import OrderedDict\nimport torch.nn as nn\n"
        "from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel\n"
        "def tiny():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))\n"
        "model_dicts = OrderedDict([(BenchmarkDataset.cifar_10, OrderedDict([(ThreatModel.Linf, OrderedDict(["
        "('Tiny2024Made', {'model': tiny, 'gdrive_id': 'x'}), ('Ens2024Made', {'model': tiny, 'gdrive_id': ['a', 'b']})]))]))])\n"
    )


def test_robustbench_model_from_its_zoo_and_a_local_checkpoint(robust, tmp_path):
    _fake_robustbench(tmp_path / "site")
    make_folder(tmp_path / "data", classes=tuple(f"c{i}" for i in range(10)), per_class=(1, 2))
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    # as RobustBench's checkpoints come: wrapped, DataParallel's module. and the wrapper's model. prefix
    torch.save({"state_dict": {f"module.model.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "Tiny2024Made.pt")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    base = ["dataset=imagefolder", *IMG, "model=robustbench", "model.name=Tiny2024Made", f"model.weights={tmp_path / 'Tiny2024Made.pt'}"]
    robust("attack", *base, "attack=fgsm", "eps=[0,0.03]", env=env, check=True)
    adv = torch.load(latest_run(tmp_path, "attack") / "adversarial.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(adv["clean_pred"], reference(adv["x"]).argmax(1))  # its weights, its own [0, 1] inputs: no normalisation added
    for override, expected in (
        ("model.name=Tiny2024Mad", "did you mean Tiny2024Made"),
        ("model.name=Ens2024Made", "ensemble"),
        ("model.dataset=cifar100", "has 100 classes, the dataset here has 10"),
    ):
        proc = robust("attack", *base, override, env=env)
        assert proc.returncode != 0 and expected in proc.stderr, proc.stderr[-800:]
    proc = robust("attack", "dataset=digits", "model=robustbench", "model.name=Tiny2024Made", env=env)  # 1x8x8 images, not CIFAR's
    assert proc.returncode != 0 and "takes images of shape 3x32x32" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-800:]
    import importlib.util

    if importlib.util.find_spec("robustbench") is None:  # without the package (where it is not installed)
        proc = robust("attack", *base)
        assert proc.returncode != 0 and "pip install 'robust[zoo]'" in proc.stderr, proc.stderr[-800:]


def test_a_missing_or_misshapen_image_folder_is_one_line(tmp_path, monkeypatch, capsys):
    from tests.test_reliability import refused_in_process

    (tmp_path / "flat" / "stuff").mkdir(parents=True)  # no val/ inside
    for root in (tmp_path / "nowhere", tmp_path / "flat"):
        for dataset in ("imagefolder", "imagenet"):
            line = refused_in_process(
                ["attack", f"dataset={dataset}", f"data.root={root}", *IMG, "model=torchvision", "model.arch=resnet18"], tmp_path, monkeypatch, capsys
            )
            assert f"'{root / 'val'}' not found" in line and "val/<class>/<image>" in line, line
