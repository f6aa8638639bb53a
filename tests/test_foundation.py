"""Foundation: CLI dispatch, config composition, datasets, models, training loop, run store."""

import gzip
import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from robust_cli.cli import CONF_DIR
from robust_cli.commands import build
from robust_cli.core import store
from robust_cli.core.batches import stratified_subset
from robust_cli.core.errors import UserError
from tests.conftest import latest_run

# the analytic objects have their own tests; python (a user's class) and timm (an optional extra) are in test_zoo
MODELS = sorted(
    p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem not in ("wedge", "orthant", "theta_wedge", "voronoi", "python", "timm", "robustbench")
)  # external zoos: tests/test_zoo.py
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
HEAVY = {"resnet18", "resnext", "c_256", "c_512", "torchvision"}


def compose_cfg(*overrides, command="train"):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ CLI dispatch
def test_no_command_prints_usage_and_exits_2(robust):
    proc = robust()
    assert proc.returncode == 2
    assert "commands:" in proc.stdout and "train" in proc.stdout


def test_unknown_command_exits_2(robust):
    proc = robust("trian")
    assert proc.returncode == 2
    assert "unknown command 'trian'" in proc.stderr


def test_help_lists_commands_and_group_options(robust):
    proc = robust("--help")
    assert proc.returncode == 0
    for word in ("train", "attack", "persistence", "fc200_200_10", "c_32", "digits", "mnist", "none"):
        assert word in proc.stdout


def test_hydra_flags_work_after_the_command(robust):
    proc = robust("train", "model=c_8", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "channels: 8" in proc.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("train.epochs=-1",), "train.epochs must be an integer >= 1"),
        (("model=nope",), "Could not find 'model/nope'"),
        (("model=c_32", "dataset=gaussians2d"), "needs image data"),
        (("device=cuda:7",), "device=cuda:7"),
        (("train.optimizer=rmsprop",), "train.optimizer must be one of"),
        (("data.n_train=0",), "data.n_train must be a positive integer"),
    ],
)
def test_user_errors_are_one_line_exit_2(robust, args, fragment):
    proc = robust("train", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_missing_mnist_offline_names_the_files(robust, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = robust("train", "dataset=mnist", "data.root=empty", "data.download=false")
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte.gz" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_checkpoint_is_a_user_error(robust, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    proc = robust("info", "checkpoint=bad.pt")
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ models x datasets
def _fits(model, dataset):
    image_only = model.startswith("c_") or model in ("cnn", "lenet", "resnet18", "resnext", "preact_resnet18", "wrn_34_10")
    if model == "torchvision":  # torchvision's classifiers take RGB images
        return dataset in ("cifar10", "cifar100", "imagefolder", "imagenet")
    return not (image_only and dataset == "gaussians2d")


# heavy nets are checked on digits and cifar10 only (same code path, a slow forward elsewhere)
# image folders default to 224x224: checked with one model of each kind
FOLDER_MODELS = {"fc200_200_10", "c_4", "lenet", "torchvision"}
PAIRS = [
    (m, d)
    for m in MODELS
    for d in DATASETS
    if (m not in HEAVY or d in ("digits", "cifar10", "gaussians2d")) and (d not in ("imagefolder", "imagenet") or m in FOLDER_MODELS)
]


@pytest.mark.parametrize("model, dataset", PAIRS)
def test_every_model_composes_with_every_fitting_dataset(model, dataset):
    cfg = compose_cfg(f"model={model}", f"dataset={dataset}")
    meta = build.make_dataset(cfg).meta
    if not _fits(model, dataset):
        with pytest.raises(UserError):
            build.make_model(cfg, meta)
        return
    net = build.make_model(cfg, meta).eval()
    x = torch.rand(2, *meta.shape)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (2, meta.num_classes)
    assert torch.isfinite(out).all()


def test_c_ch_matches_bell_table_3_shapes():
    cfg = compose_cfg("model=c_32", "dataset=mnist")
    net = build.make_model(cfg, build.make_dataset(cfg).meta).net
    feats = net.features(torch.zeros(1, 1, 28, 28))
    assert feats.shape == (1, 32, 6, 6)  # 28 -> 24 -> 20 -> 16 -> 12 -> pool 6
    assert net.classifier[1].in_features == 32 * 6 * 6 and net.classifier[1].out_features == 256


def test_tanh_head_bounds_logits_by_t():
    cfg = compose_cfg("model=fc100_100_10", "+model.head=tanh")
    net = build.make_model(cfg, build.make_dataset(cfg).meta).train()
    with torch.no_grad():
        net.head.t.fill_(0.5)
        out = net(torch.rand(16, 1, 8, 8) * 100)
    assert out.abs().max() <= 0.5 + 1e-6


# ------------------------------------------------------------------------------------------------ datasets
def test_digits_in_unit_box_with_fixed_split():
    cfg = compose_cfg()
    bundle = build.make_data(cfg)
    assert bundle.train_x.shape[1:] == (1, 8, 8) and len(bundle.train_y) + len(bundle.test_y) == 1797
    assert 0.0 <= bundle.train_x.min() and bundle.train_x.max() <= 1.0
    other_seed = build.make_data(compose_cfg("seed=5"))
    assert torch.equal(bundle.test_y, other_seed.test_y)  # the split does not depend on the run seed


def test_stratified_subset_keeps_class_proportions():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    idx = stratified_subset(y, 100, seed=3)
    counts = torch.bincount(y[idx], minlength=3).tolist()
    assert counts == [60, 30, 10] and len(set(idx.tolist())) == 100
    assert not torch.equal(idx, stratified_subset(y, 100, seed=4))


def test_gaussians2d_matches_bell_section_15():
    bundle = build.make_data(compose_cfg("dataset=gaussians2d", "model=fc100_20_10"))
    assert bundle.train_x.shape == (4000, 2)
    means = torch.stack([bundle.train_x[bundle.train_y == c].mean(0) for c in (0, 1)])
    assert torch.allclose(means, torch.tensor([[1.0, 4.0], [4.0, 1.0]]), atol=0.1)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_reads_local_idx_files(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    bundle = build.make_data(compose_cfg("dataset=mnist", f"data.root={tmp_path}", "data.download=false"))
    assert bundle.train_x.shape == (30, 1, 28, 28) and bundle.test_y.tolist() == list(range(10))
    assert bundle.train_x.max() <= 1.0


# ------------------------------------------------------------------------------------------------ store
def test_atomic_write_crash_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old complete content\n")

    def crash(f):
        f.write(b"half a new ")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.atomic_write(target, crash)
    assert target.read_text() == "old complete content\n"
    assert list(tmp_path.iterdir()) == [target]  # no temporary left behind


def test_a_new_file_is_published_once_when_writers_race(tmp_path):
    import threading

    target = tmp_path / "weights.pt"
    started = threading.Barrier(8)
    outcomes = []

    def writer(k):
        def slow(f):
            started.wait()  # every writer has its temporary before any publishes
            f.write(f"writer {k}\n".encode())

        try:
            store.atomic_write(target, slow, replace=False)
            outcomes.append(("won", k))
        except FileExistsError:
            outcomes.append(("lost", k))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [k for what, k in outcomes if what == "won"]
    assert len(winners) == 1 and target.read_text() == f"writer {winners[0]}\n"
    assert list(tmp_path.iterdir()) == [target]  # the losers' temporaries are gone
    with pytest.raises(FileExistsError):
        store.write_text(target, "late\n", replace=False)
    assert target.read_text() == f"writer {winners[0]}\n"


def test_checkpoint_key_ignores_device_and_paths():
    a = build.checkpoint_key(compose_cfg("device=cpu", "data.root=/x"))
    b = build.checkpoint_key(compose_cfg("device=auto", "data.root=/y", "data.n_test=10"))
    c = build.checkpoint_key(compose_cfg("train.lr=0.01"))
    assert a == b and a != c


# ------------------------------------------------------------------------------------------------ training
def _log(run_dir):
    return pd.read_csv(run_dir / "train_log.csv").drop(columns=["seconds"])


def test_digits_training_reaches_90_percent(robust, tmp_path):
    robust("train", check=True)
    run = latest_run(tmp_path, "train")
    log = pd.read_csv(run / "train_log.csv")
    assert list(log.columns[:7]) == ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "seconds"]
    assert log["test_accuracy"].iloc[-1] >= 0.9
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["command"] == "train"
    state = torch.load(run / "model.pt", weights_only=True)
    assert state["complete"] and state["epoch"] == len(log)


def test_same_seed_same_log_and_resume_equals_uninterrupted(robust, tmp_path):
    args = ("train", "model=fc100_20_10", "data.n_train=300", "train.epochs=4", "train.batch_size=32")
    robust(*args, check=True)
    first = latest_run(tmp_path, "train")
    weights_first = torch.load(first / "model.pt", weights_only=True)["state_dict"]
    robust(*args, "outputs_root=again", check=True)
    again = sorted((tmp_path / "again" / "train").glob("*/*"))[-1]
    pd.testing.assert_frame_equal(_log(first), _log(again))
    # killed after epoch 2, then resumed in a fresh process
    killed = robust(*args, "outputs_root=resumed", env={"ROBUST_STOP_AFTER_EPOCH": "2"})
    assert killed.returncode != 0
    robust(*args, "outputs_root=resumed", "resume=true", check=True)
    resumed = sorted((tmp_path / "resumed" / "train").glob("*/*"), key=lambda p: p.stat().st_mtime)[-1]
    pd.testing.assert_frame_equal(_log(first), _log(resumed))
    weights_resumed = torch.load(resumed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights_first[k], weights_resumed[k]) for k in weights_first)
    robust(*args, "seed=1", "outputs_root=seed1", check=True)
    seed1 = sorted((tmp_path / "seed1" / "train").glob("*/*"))[-1]
    assert not _log(first).equals(_log(seed1))


def test_non_finite_loss_stops_with_epoch_and_step(robust, tmp_path):
    proc = robust("train", "model=fc100_20_10", "data.n_train=200", "train.epochs=2", "train.lr=1e30", "train.momentum=0")
    assert proc.returncode == 2
    assert "training diverged" in proc.stderr and "epoch" in proc.stderr and "Traceback" not in proc.stderr


def test_bell_weight_penalty_is_lambda_scale_norm_over_n():
    cfg = compose_cfg("model=fc10_2")
    net = build.make_model(cfg, build.make_dataset(cfg).meta).net
    w = net.layers[0].weight
    reg = net.regularization()
    assert torch.isclose(reg, 0.01 * 3000 * w.detach().norm() / w.numel())
    (grad,) = torch.autograd.grad(reg, w)
    assert torch.allclose(grad, 0.01 * 3000 * w.detach() / (w.detach().norm() * w.numel()), rtol=1e-5)
