"""The execution engine on the CPU: reduced precision re-checked in fp32, compile, crop_flip, batch sizes that
halve on out-of-memory, the cyclic schedule, data-parallel training with gloo."""

import json
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust_cli.attacks import FGSM
from robust_cli.commands import build
from robust_cli.core.batches import crop_flip
from robust_cli.core.engine import BatchSize, Engine, FastModel, chunked, exact, fit_batch, ranks_from_environment
from robust_cli.core.errors import UserError
from robust_cli.evaluation import evaluate as ev
from tests.conftest import latest_run


class Bf16Flips(nn.Module):
    """fp32 says class 0 at x = 1, bf16 says class 1: the linear layer's weight 1 + 2^-9 rounds to 1 in bfloat16
    (8 significant bits), so (h - 1) - 0.001 changes sign."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.fill_(1 + 2**-9)

    def forward(self, x):
        z = ((self.lin(x.flatten(1)) - 1) - 0.001) * 1000
        return torch.cat([z, torch.zeros_like(z)], dim=1)


def test_bf16_success_that_fp32_rejects_is_not_counted():
    model = Bf16Flips().eval()
    x, y = torch.ones(4, 1), torch.zeros(4, dtype=torch.long)
    fast = FastModel(model, "bf16", "cpu", compiled=False, channels_last=False)
    assert model(x).argmax(1).tolist() == [0] * 4  # fp32: correct
    assert fast(x).argmax(1).tolist() == [1] * 4  # bf16: already "adversarial"
    (o,) = ev.accuracy_curve(fast, FGSM(), x, y, [1e-6])
    assert not o.success.any() and o.fp32_rejected == 4 and o.precision == "bf16"
    assert ev.predict(fast, x).tolist() == [0] * 4  # what is reported is the fp32 model's answer
    (plain,) = ev.accuracy_curve(model, FGSM(), x, y, [1e-6])
    assert plain.fp32_rejected == 0 and plain.precision == "fp32"


@pytest.mark.slow  # the re-check itself is tested above, without the CLI
def test_bf16_attack_end_to_end_on_the_cpu(robust, tmp_path):
    common = ["dataset=digits", "train.epochs=1", "data.n_test=60"]
    robust("train", *common, check=True)
    robust("attack", *common, "attack=pgd", "eps=[0,0.1]", "precision=bf16", check=True)
    run = latest_run(tmp_path, "attack")
    import pandas as pd

    curve = pd.read_csv(run / "curve.csv")
    assert set(curve.precision) == {"bf16"} and (curve.fp32_rejected >= 0).all()
    record = json.loads((run / "run.json").read_text())
    assert record["engine"]["precision"] == "bf16" and record["engine"]["precision_reason"] == "set"
    adv = torch.load(run / "adversarial.pt", weights_only=True)
    assert torch.equal(adv["pred"][0], adv["clean_pred"])  # eps 0: the fp32 model's own labels


def test_precision_auto_is_fp32_on_the_cpu_and_bad_values_are_one_line(robust):
    engine = Engine.create(torch.device("cpu"), "auto")
    assert engine.precision == "fp32" and "cpu" in engine.precision_reason
    with pytest.raises(UserError, match="precision must be one of"):
        Engine.create(torch.device("cpu"), "fp8")
    proc = robust("attack", "precision=half")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: precision must be one of auto, fp32, bf16, fp16, got 'half'"]


def test_compile_gives_eager_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(64, 1, 4, 4)
    fallbacks = []
    fast = FastModel(model, "fp32", "cpu", compiled=True, channels_last=False, warn=fallbacks.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fast(x)
    if fallbacks:
        pytest.skip(f"torch.compile does not work on this CPU build: {fallbacks[0]}")
    assert fast._compiled is not None
    assert torch.allclose(out, model(x), atol=1e-5)
    x.requires_grad_(True)  # input gradients (what attacks need) through the compiled graph
    (g_fast,) = torch.autograd.grad(F.cross_entropy(fast(x), torch.zeros(64, dtype=torch.long)), x)
    (g_eager,) = torch.autograd.grad(F.cross_entropy(model(x), torch.zeros(64, dtype=torch.long)), x)
    assert torch.allclose(g_fast, g_eager, atol=1e-5)


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(model, **kwargs):
        def call(x):
            raise RuntimeError("no backend\ndetails")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    model = nn.Linear(3, 2)
    said = []
    fast = FastModel(model, "fp32", "cpu", compiled=True, channels_last=False, warn=said.append)
    x = torch.rand(5, 3)
    assert torch.equal(fast(x), model(x)) and torch.equal(fast(x), model(x))
    assert len(said) == 1 and "no backend" in said[0] and "details" not in said[0]
    assert exact(fast) is model


def _reference_crop(img, dy, dx, flip, padding=4):
    padded = F.pad(img, (padding,) * 4)
    crop = padded[:, dy : dy + img.shape[1], dx : dx + img.shape[2]]
    return torch.flip(crop, dims=[2]) if flip else crop


def test_crop_flip_is_a_padded_crop_and_flip_and_is_seeded():
    x = torch.arange(8 * 3 * 6 * 6, dtype=torch.float32).view(8, 3, 6, 6) + 1  # every pixel distinct, none zero
    out = crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(out, crop_flip(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(out, crop_flip(x, torch.Generator().manual_seed(6)))
    found = []
    for i in range(len(x)):  # each output is exactly one of the 9 x 9 x 2 crops of its own image
        hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True) if torch.equal(out[i], _reference_crop(x[i], dy, dx, f))]
        assert len(hits) == 1, f"image {i}: {hits}"
        found.append(hits[0])
    many = crop_flip(torch.ones(4000, 1, 6, 6), torch.Generator().manual_seed(0))
    flipped_or_shifted = (many == 0).flatten(1).any(1).double().mean()  # zero padding shows unless dy = dx = 4
    assert 0.97 < float(flipped_or_shifted) < 1.0
    assert len({h[2] for h in found}) == 2 or len(found) < 4


def test_crop_flip_training_resumes_to_identical_weights(robust, tmp_path):
    args = ["train", "dataset=digits", "model=fc100_20_10", "data.augment=crop_flip", "train.epochs=2", "data.n_train=300", "data.n_test=50"]
    robust(*args, "outputs_root=straight", check=True)
    killed = robust(*args, "outputs_root=resumed", env={"ROBUST_STOP_AFTER_EPOCH": "1"})
    assert killed.returncode != 0
    robust(*args, "outputs_root=resumed", "resume=true", check=True)
    a = torch.load(next((tmp_path / "straight" / "checkpoints").glob("*/model.pt")), weights_only=True)
    b = torch.load(next((tmp_path / "resumed" / "checkpoints").glob("*/model.pt")), weights_only=True)
    assert a["environment"]["augment"] == "crop_flip"
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_crop_flip_needs_images():
    from robust_cli.core.batches import check_augment

    check_augment("crop_flip", (1, 8, 8))  # 8x8 images are images: allowed, the user's choice
    check_augment("none", (2,))
    with pytest.raises(UserError, match="data.augment=crop_flip needs images"):
        check_augment("crop_flip", (2,))


def test_augment_auto_is_the_datasets_default_and_in_the_checkpoint_key():
    from omegaconf import OmegaConf

    def cfg(dataset, augment):
        return OmegaConf.create(
            {
                "dataset": OmegaConf.load(f"robust_cli/conf/dataset/{dataset}.yaml"),
                "data": {"augment": augment, "n_train": None, "val_fraction": 0.0},
                "model": {},
                "defense": {},
                "train": {},
                "seed": 0,
            }
        )

    assert build.augment(cfg("cifar10", "auto")) == "crop_flip" and build.augment(cfg("mnist", "auto")) == "none"
    assert build.identity(cfg("cifar10", "auto")) == build.identity(cfg("cifar10", "crop_flip"))
    assert build.identity(cfg("cifar10", "none")) != build.identity(cfg("cifar10", "auto"))
    assert "augment" not in build.identity(cfg("mnist", "auto"))["data"]  # older keys unchanged


class OutOfMemoryAbove(nn.Module):
    """A test double for a GPU that holds `limit` examples: larger batches raise torch.OutOfMemoryError."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.calls = limit, []
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {len(x)} > {self.limit}")
        return self.lin(x)


def test_auto_batch_halves_on_out_of_memory_and_equals_a_run_at_the_found_size():
    torch.manual_seed(0)
    model, x, y = OutOfMemoryAbove(100).eval(), torch.rand(300, 4), torch.randint(0, 3, (300,))
    attack = FGSM()
    batch = BatchSize("auto", "batch_size", torch.device("cpu"))
    assert batch.size == 256
    halved = []
    outcomes = fit_batch(lambda bs: ev.accuracy_curve(model, attack, x, y, [0.1], plan=ev.BatchPlan(seed=0), batch_size=bs), batch, halved.append)
    assert batch.size == 64 and halved == [128, 64] and batch.describe()["halvings"] == 2
    reference = ev.accuracy_curve(model, attack, x, y, [0.1], plan=ev.BatchPlan(seed=0), batch_size=64)
    assert torch.equal(outcomes[0].x_adv, reference[0].x_adv)
    fixed = BatchSize(256, "batch_size", torch.device("cpu"))
    with pytest.raises(UserError, match=r"out of memory on cpu at batch_size=256: lower batch_size \(now 256\) or set batch_size=auto"):
        fit_batch(lambda bs: ev.accuracy_curve(model, attack, x, y, [0.1], batch_size=bs), fixed)


def test_chunked_classification_halves_without_changing_answers():
    model = OutOfMemoryAbove(50).eval()
    x = torch.rand(333, 4)
    batch = BatchSize("auto", "persistence.batch_size", torch.device("cpu"), start={"cpu": 1000, "cuda": 1000})
    with torch.no_grad():
        got = chunked(lambda part: model(part).argmax(1), x, batch)
        assert torch.equal(got, model.lin(x).argmax(1))
    assert batch.size == 31 and max(model.calls[-5:]) <= 50
    assert torch.equal(ev.predict(model, x), model.lin(x).argmax(1))  # predict's fixed chunks halve too


class LinearTwoClass(nn.Module):
    def __init__(self, w, limit=None):
        super().__init__()
        self.w, self.limit = w, limit

    def forward(self, x):
        if self.limit is not None and len(x) > self.limit:
            raise torch.OutOfMemoryError("simulated")
        z = x.flatten(1) @ self.w
        return torch.stack([z, -z], 1)


def test_persistence_samples_with_auto_batch_equal_a_fixed_batch():
    from robust_cli.analysis.persistence import persistence

    torch.manual_seed(0)
    w = torch.randn(8)
    x = torch.rand(3, 8) * 0.1
    fixed = persistence(LinearTwoClass(w), x, 0.7, method="fast", seed=1, batch_size=256)
    batch = BatchSize("auto", "persistence.batch_size", torch.device("cpu"), start={"cpu": 4096, "cuda": 4096})
    auto = persistence(LinearTwoClass(w, limit=300), x, 0.7, method="fast", seed=1, batch_size=batch)
    assert batch.size == 256 and batch.halvings == 4
    assert torch.equal(fixed.sigma, auto.sigma) and torch.equal(fixed.evaluations, auto.evaluations)


def test_fixed_batch_out_of_memory_in_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    from robust_cli import cli
    from robust_cli.core.models import MLP

    monkeypatch.chdir(tmp_path)
    common = ["dataset=digits", "train.epochs=1", "data.n_test=90", "attack=fgsm"]
    cli.main(["robust", "train", *common[:-1]])
    original = MLP.forward

    def small_gpu(self, x):
        if len(x) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, x)

    monkeypatch.setattr(MLP, "forward", small_gpu)
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        cli.main(["robust", "attack", *common, "batch_size=64"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert refused.value.code == 2 and lines == ["error: out of memory on cpu at batch_size=64: lower batch_size (now 64) or set batch_size=auto"]
    assert json.loads((latest_run(tmp_path, "attack") / "run.json").read_text())["status"] == "user_error"
    cli.main(["robust", "attack", *common, "batch_size=auto"])
    record = json.loads((latest_run(tmp_path, "attack") / "run.json").read_text())
    assert record["status"] == "completed" and record["batch_size"] == {
        "setting": "batch_size",
        "auto": True,
        "size": 22,
        "halvings": 2,
    }  # 90 (the test set) -> 45 -> 22


def test_shards_need_a_fixed_batch_size(robust):
    proc = robust("attack", "data.shard=0/2", "batch_size=auto")
    assert proc.returncode == 2 and "data.shard needs a fixed batch_size" in proc.stderr


def test_cyclic_schedule_is_wongs_triangle():
    from robust_cli.training.loop import TrainSettings, make_optimizer

    settings = TrainSettings.from_dict(
        {
            "optimizer": "sgd",
            "lr": 0.2,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 0.0,
            "scheduler": "cyclic",
            "epochs": 5,
            "lr_step": 1,
            "lr_gamma": 0.1,
            "batch_size": 64,
        }
    )
    param = nn.Parameter(torch.zeros(1))
    opt, sched, per_step = make_optimizer(settings, nn.ParameterList([param]), steps_per_epoch=10)
    assert per_step
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # step k trains at the interpolation of [0, 2/5 E, E] -> [0, lr, 0] at t = (k + 1) / steps_per_epoch epochs
    expected = [0.2 * min((k + 1) / 20, max(0.0, (50 - k - 1) / 30)) for k in range(50)]
    assert max(abs(a - b) for a, b in zip(lrs, expected)) < 1e-12
    assert lrs.index(max(lrs)) == 19 and lrs[-1] == 0.0


def test_ranks_come_from_torchrun_or_slurm():
    assert ranks_from_environment({}).world == 1
    r = ranks_from_environment({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (r.rank, r.world, r.main, r.distributed) == (2, 4, False, True)
    s = ranks_from_environment({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert (s.rank, s.world, s.local_rank) == (1, 2, 1)
    assert ranks_from_environment({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).world == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_the_weights_of_one_process_with_the_combined_batch(robust, tmp_path):
    # no BatchNorm, no randomness in the defense, a training set of whole batches: the updates must agree
    args = ["train", "dataset=digits", "model=fc100_20_10", "train.epochs=2", "data.n_train=640", "train.batch_size=64", "data.n_test=100", "threads=1"]
    robust(*args, "outputs_root=single", check=True)
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "robust_cli",
            *args,
            "outputs_root=ddp",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = torch.load(next((tmp_path / "single" / "checkpoints").glob("*/model.pt")), weights_only=True)
    ddp = torch.load(next((tmp_path / "ddp" / "checkpoints").glob("*/model.pt")), weights_only=True)
    assert sorted(single) == sorted(ddp)  # the same checkpoint format
    assert ddp["environment"]["processes"] == 2 and single["environment"]["processes"] == 1
    worst = max(float((single["state_dict"][k] - ddp["state_dict"][k]).abs().max()) for k in single["state_dict"])
    assert worst < 1e-5, worst
    assert abs(single["log"][-1]["train_loss"] - ddp["log"][-1]["train_loss"]) < 1e-5  # the loss over both ranks' parts
    runs = list((tmp_path / "ddp" / "train").glob("*/*"))
    assert len(runs) == 1 and json.loads((runs[0] / "run.json").read_text())["processes"] == 2  # rank 0 alone wrote


def test_other_commands_refuse_to_run_as_several_processes(robust):
    proc = robust("attack", env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert proc.returncode == 2 and "only robust train runs as several processes" in proc.stderr and "data.shard" in proc.stderr


@pytest.mark.parametrize(
    "preset, defense, scheduler, epochs, lr", [("cifar10_resnet18", "none", "cosine", 30, 0.1), ("cifar10_fast_at", "fgsm_rs", "cyclic", 15, 0.2)]
)
def test_cifar_presets_compose_to_their_recipes(robust, preset, defense, scheduler, epochs, lr):
    import yaml

    proc = robust("train", f"experiment={preset}", "--cfg", "job", check=True)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["dataset"]["name"] == "cifar10" and cfg["model"]["_target_"] == "robust_cli.core.models.ResNet" and cfg["model"]["blocks"] == [2, 2, 2, 2]
    t = cfg["train"]
    targets = {"cosine": "torch.optim.lr_scheduler.CosineAnnealingLR", "cyclic": "robust_cli.training.schedules.Cyclic"}
    assert (t["scheduler"]["_target_"], t["epochs"], t["lr"], t["batch_size"], t["momentum"], t["weight_decay"]) == (
        targets[scheduler],
        epochs,
        lr,
        128,
        0.9,
        5e-4,
    )
    assert t["optimizer"]["_target_"] == "torch.optim.SGD" and t["optimizer"]["lr"] == "${train.lr}"  # the optimizer group, with train's values
    assert cfg["data"]["augment"] == "crop_flip" and cfg["precision"] == "auto"
    if defense == "fgsm_rs":  # Wong et al.: one step of 1.25 eps from a uniform random start, eps = 8/255
        a = cfg["defense"]["attack"]
        assert cfg["defense"]["eps"] == pytest.approx(8 / 255) and a["steps"] == 1 and a["random_start"] and a["step_size"] == pytest.approx(1.25 * 8 / 255)


@pytest.mark.slow  # the recipe's composition and the cyclic schedule are tested above, without training
def test_fast_at_preset_trains_end_to_end_on_small_images(robust, tmp_path):
    robust("train", "experiment=cifar10_fast_at", "dataset=digits", "model=c_4", "train.epochs=2", "data.n_train=256", "data.n_test=50", check=True)
    log = __import__("pandas").read_csv(latest_run(tmp_path, "train") / "train_log.csv")
    assert {"adv_loss", "perturbation_l2"} <= set(log.columns)
    # the cyclic schedule over 2 epochs x 2 steps of 128: peak at step 1.6; epoch 1 trains first at step 1 of it,
    # epoch 2 at step 3, on the way down
    assert log.lr.iloc[0] == pytest.approx(0.2 / 1.6) and log.lr.iloc[1] == pytest.approx(0.2 * (4 - 3) / (4 - 1.6))


def test_gpu_check_says_in_one_line_that_it_skips_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: scripts/gpu_check.sh runs for real")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1 and "no CUDA device" in proc.stdout


@pytest.mark.slow
def test_bench_gpu_runs_its_quick_mode_on_the_cpu(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--quick", "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["what"] for r in rows} == {"train", "pgd10", "autoattack", "persistence"} and all(r["value"] > 0 for r in rows)
    assert "| pgd10 | resnet18 | ours fp32 |" in proc.stdout


def test_shards_spread_over_the_gpus_of_a_node(monkeypatch):
    from robust_cli.core import engine

    assert engine.shard_device("auto", "1/4") == torch.device("cpu") if not torch.cuda.is_available() else True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [engine.shard_device("auto", f"{i}/5") for i in range(5)] == [torch.device(f"cuda:{i % 3}") for i in range(5)]
    assert engine.shard_device("auto", None) == torch.device("cuda:0")
    assert engine.shard_device("cuda:2", "0/5") == torch.device("cuda:2")  # an explicit device is kept
