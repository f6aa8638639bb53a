"""TRADES, MART, AWP, validation with checkpoint selection, weight averaging and the piecewise schedule.

Losses are checked against hand computations in numpy, AWP against the plain step taken by hand at the perturbed
weights, the weight average against its closed form, and selection end to end through the CLI.
"""

import dataclasses
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from robust_cli.attacks import PGD
from robust_cli.defenses import MART, TRADES, AdversarialTraining, AdversarialWeightPerturbation
from robust_cli.defenses.trades import kl_divergence
from robust_cli.training.loop import TrainSettings, make_optimizer, piecewise_milestones
from robust_cli.training.selection import WeightAverage
from tests.conftest import latest_run


def tiny(seed=0, classes=3, features=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 5), nn.ReLU(), nn.Linear(5, classes)).double()
    x = torch.rand(6, features, dtype=torch.float64)
    x_adv = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    y = torch.arange(6) % classes
    return model, x, x_adv, y


def numpy_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def numpy_logits(model, x):
    with torch.no_grad():
        return model(x).numpy()


# ----------------------------------------------------------------------------------------------- losses
def test_trades_loss_is_ce_plus_beta_times_the_batch_mean_kl():
    model, x, x_adv, y = tiny()
    loss, stats = TRADES(eps=0.1, beta=2.5).outer(model, x, x_adv, y)
    p, q = numpy_softmax(numpy_logits(model, x)), numpy_softmax(numpy_logits(model, x_adv))
    rows = np.arange(len(y))
    ce = -np.log(p[rows, y.numpy()]).mean()
    kl = (p * (np.log(p) - np.log(q))).sum(axis=1).sum() / len(y)  # the official code: KL summed, / batch size
    assert loss.item() == pytest.approx(ce + 2.5 * kl, rel=1e-10)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-10) and stats["ce"].item() == pytest.approx(ce, rel=1e-10)
    # and PyTorch's own KLDivLoss agrees (a second implementation)
    reference = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(model(x), 1), reduction="batchmean")
    assert stats["kl"].item() == pytest.approx(reference.item(), rel=1e-10)


def test_mart_loss_is_bce_plus_the_misclassification_weighted_kl():
    model, x, x_adv, y = tiny(seed=1, classes=4)
    y = torch.arange(6) % 4
    loss, stats = MART(eps=0.1, beta=5.0).outer(model, x, x_adv, y)
    p, q = numpy_softmax(numpy_logits(model, x)), numpy_softmax(numpy_logits(model, x_adv))
    rows, labels = np.arange(len(y)), y.numpy()
    wrong = q.copy()
    wrong[rows, labels] = -np.inf
    runner_up = wrong.max(axis=1)  # max_{k != y} p_k(x')
    bce = -np.log(q[rows, labels]) - np.log(1.0001 - runner_up + 1e-12)
    kl = (p * (np.log(p) - np.log(q + 1e-12))).sum(axis=1)
    weighted = kl * (1.0000001 - p[rows, labels])
    assert loss.item() == pytest.approx(bce.mean() + 5.0 * weighted.mean(), rel=1e-9)
    # the paper's formula without the code's numerical guards differs only in those guards
    paper = (-np.log(q[rows, labels]) - np.log(1 - runner_up)).mean() + 5.0 * (kl * (1 - p[rows, labels])).mean()
    assert loss.item() == pytest.approx(paper, abs=1e-3)


def test_trades_inner_maximisation_raises_the_kl_and_stays_in_ball_and_box():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
    x, y = torch.rand(64, 16), torch.arange(64) % 5
    log_p = F.log_softmax(model(x), 1).detach()

    def kl_at(point):
        with torch.no_grad():
            return kl_divergence(log_p, F.log_softmax(model(point), 1))

    eps = 0.1
    torch.manual_seed(1)
    one_step = TRADES(eps=eps, steps=1).craft(model, x, y)
    torch.manual_seed(1)
    x_adv = TRADES(eps=eps, steps=10).craft(model, x, y)
    random_point = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert kl_at(x_adv).mean() > 2 * kl_at(random_point).mean()
    assert kl_at(x_adv).mean() > kl_at(one_step).mean() > kl_at(x + 0.001 * torch.randn_like(x)).mean()


# ----------------------------------------------------------------------------------------------- AWP
def test_awp_perturbation_is_gamma_times_the_layer_norm_along_the_loss_gradient():
    model, _, x_adv, y = tiny()
    loss_fn = lambda m: F.cross_entropy(m(x_adv), y)
    awp = AdversarialWeightPerturbation(gamma=0.02)
    weights = awp.perturbed_weights(model)
    assert [w.shape for w in weights] == [(5, 4), (3, 5)]  # the two weight matrices, no biases
    grads = torch.autograd.grad(loss_fn(model), weights)
    for w, g, v in zip(weights, grads, awp.perturbation(model, loss_fn)):
        assert v.norm().item() == pytest.approx(0.02 * w.norm().item(), rel=1e-12)
        assert torch.allclose(v, 0.02 * w.norm() * g / g.norm(), atol=1e-15)


def test_awp_step_equals_the_plain_step_at_the_perturbed_weights_and_restores_exactly():
    model, _, x_adv, y = tiny(seed=2)
    loss_fn = lambda m: F.cross_entropy(m(x_adv), y)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    awp = AdversarialWeightPerturbation(gamma=0.05)
    # by hand: v from the gradient at w, then the gradient of every parameter at (w + v, biases unchanged)
    twin = tiny(seed=2)[0]
    weights = [twin[0].weight, twin[2].weight]
    grads = torch.autograd.grad(loss_fn(twin), weights)
    with torch.no_grad():
        for w, g in zip(weights, grads):
            w.add_(0.05 * w.norm() * g / g.norm())
    perturbed_grads = dict(zip([n for n, _ in twin.named_parameters()], torch.autograd.grad(loss_fn(twin), list(twin.parameters()))))
    lr = 0.1
    expected = {n: original[n] - lr * perturbed_grads[n] for n in perturbed_grads}

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    awp.perturb(model, loss_fn)
    assert torch.equal(model[0].bias, original["0.bias"])  # biases are not perturbed
    assert not torch.equal(model[0].weight, original["0.weight"])
    loss_fn(model).backward()
    optimizer.step()
    awp.restore()
    for name, value in model.state_dict().items():
        assert torch.allclose(value, expected[name], atol=1e-14), name

    # without an update the weights come back bit for bit
    before = {k: v.clone() for k, v in model.state_dict().items()}
    awp.perturb(model, loss_fn)
    awp.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_awp_leaves_batchnorm_statistics_and_waits_for_its_warmup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    x, y = torch.rand(8, 4), torch.arange(8) % 3
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    weights = {k: v.clone() for k, v in model.named_parameters()}
    awp = AdversarialWeightPerturbation(gamma=0.01, warmup=2)
    for epoch, active in ((1, False), (2, False), (3, True)):
        awp.begin_epoch(epoch)
        stats = awp.perturb(model, lambda m: F.cross_entropy(m(x), y))
        assert stats["awp_on"].item() == float(active)
        assert all(torch.equal(buffers[k], v) for k, v in model.named_buffers())  # the proxy pass is not a batch
        changed = not torch.equal(weights["0.weight"], model[0].weight)
        assert changed is active
        awp.restore()
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())


# ----------------------------------------------------------------------------------------------- EMA, schedule
def test_weight_average_equals_its_closed_form_on_scripted_updates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    decay, steps = 0.9, 7
    start = {k: v.clone().double() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay)
    history = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            for value in model.state_dict().values():
                if value.dtype.is_floating_point:
                    value.copy_(torch.randn_like(value) * t)
                else:
                    value.add_(1)
        history.append({k: v.clone().double() for k, v in model.state_dict().items()})
        average.update(model)
    for name, value in average.state_dict().items():
        if not value.dtype.is_floating_point:
            assert int(value) == int(history[-1][name])  # num_batches_tracked is copied, not averaged
            continue
        closed = decay**steps * start[name] + sum((1 - decay) * decay ** (steps - t) * history[t - 1][name] for t in range(1, steps + 1))
        assert torch.allclose(value.double(), closed, atol=1e-5), name


def test_piecewise_schedule_is_rices_and_takes_official_milestones():
    assert piecewise_milestones(None, 200) == [101, 151]
    settings = TrainSettings.from_dict(
        {
            "optimizer": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 0.0,
            "scheduler": "piecewise",
            "milestones": None,
            "lr_gamma": 0.1,
            "epochs": 8,
            "lr_step": 1,
            "batch_size": 64,
        }
    )

    def epoch_lrs(epochs):
        optimizer, scheduler, per_step = make_optimizer(settings, nn.Linear(2, 2))
        assert not per_step  # stepped once per epoch
        lrs = []
        for _ in range(epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    # Rice et al.: lr while t / epochs < 0.5, lr / 10 while < 0.75, then lr / 100 (t = epochs done)
    assert epoch_lrs(8) == pytest.approx([0.1 if t / 8 < 0.5 else 0.01 if t / 8 < 0.75 else 0.001 for t in range(8)])
    settings = dataclasses.replace(settings, milestones=[3, 5])  # TRADES-style epoch numbers: epoch >= 3 trains at lr / 10
    assert epoch_lrs(6) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_adversarial_training_crafts_in_the_mode_attack_bn_names():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).train()
    x, y = torch.rand(8, 4), torch.arange(8) % 3
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    AdversarialTraining(PGD(steps=2), eps=0.1, attack_bn="eval")(model, x, y)
    assert seen[:2] == [False, False] and seen[-1] is True  # crafted in eval mode, trained in train mode
    seen.clear()
    AdversarialTraining(PGD(steps=2), eps=0.1, attack_bn="train")(model, x, y)
    assert all(seen)


# ----------------------------------------------------------------------------------------------- the CLI
FAST = ("train.epochs=2", "data.n_train=500", "data.val_fraction=0.3", "train.validate=true", "train.select=best_robust")


# plain TRADES and PGD-AT + AWP are covered in process (tests/test_defenses.py, the AWP tests above)
@pytest.mark.parametrize("objective", [["defense=mart"], ["defense=trades", "++defense.awp.gamma=5e-3"]])
def test_new_objectives_train_with_robust_validation_and_write_the_columns(robust, tmp_path, objective):
    proc = robust("train", *objective, *FAST)
    assert proc.returncode == 0, proc.stderr
    run = latest_run(tmp_path, "train")
    log = pd.read_csv(run / "train_log.csv")
    assert {"val_accuracy", "val_robust_accuracy"} <= set(log.columns) and log["val_robust_accuracy"].notna().all()
    assert (log["val_robust_accuracy"] <= log["val_accuracy"] + 1e-12).all()
    if any("awp" in a for a in objective):
        assert log["awp_on"].tolist() == [1.0, 1.0]
    record = json.loads((run / "run.json").read_text())
    best = int(log["val_robust_accuracy"].idxmax())
    assert record["selected"]["epoch"] == log["epoch"][best] and record["selected"]["criterion"] == "val_robust_accuracy"
    entry = next((tmp_path / "outputs" / "checkpoints").iterdir())
    assert {"model.pt", "model.best.pt", "model.last.pt"} <= {p.name for p in entry.iterdir()}


BLOWUP = (
    "defense=pgd_at",
    "defense.eps=0.05",
    "train.epochs=3",
    "data.n_train=600",
    "data.val_fraction=0.3",
    "train.validate=true",
    "train.select=best_robust",
    "train.scheduler=piecewise",
    "train.milestones=[3]",
    "train.lr_gamma=20",
)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_best_robust_publishes_the_peak_epoch_resume_keeps_it_and_attack_uses_it(robust, tmp_path):
    # the lr jumps 20x at epoch 3 and wrecks the model: the robust validation accuracy peaks at epoch 2
    proc = robust("train", *BLOWUP)
    assert proc.returncode == 0, proc.stderr
    log = pd.read_csv(latest_run(tmp_path, "train") / "train_log.csv")
    assert log["val_robust_accuracy"].idxmax() == 1 and log["val_robust_accuracy"][2] < log["val_robust_accuracy"][1] - 0.2
    entry = next((tmp_path / "outputs" / "checkpoints").iterdir())
    published, best, last = (_weights(entry / n) for n in ("model.pt", "model.best.pt", "model.last.pt"))
    assert all(torch.equal(published[k], best[k]) for k in published)
    assert not all(torch.equal(published[k], last[k]) for k in published)
    state = torch.load(entry / "model.pt", weights_only=True)
    assert state["epoch"] == 2 and state["selected"]["checkpoint"] == "best"

    # killed after epoch 2 and resumed: the same best epoch and the same weights
    killed = robust("train", *BLOWUP, "outputs_root=resumed", env={"ROBUST_STOP_AFTER_EPOCH": "2"})
    assert killed.returncode != 0
    resumed = robust("train", *BLOWUP, "outputs_root=resumed", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    again = _weights(next((tmp_path / "resumed" / "checkpoints").iterdir()) / "model.pt")
    assert all(torch.allclose(again[k].float(), published[k].float(), atol=1e-6) for k in published)

    # later commands load the published (best) checkpoint: its clean accuracy is epoch 2's test accuracy
    attack = robust("attack", *BLOWUP, "attack=fgsm", "eps=[0]", "audit=false", "save_adversarial=false")
    assert attack.returncode == 0, attack.stderr
    curve = pd.read_csv(latest_run(tmp_path, "attack") / "curve.csv")
    assert curve["clean_accuracy"][0] == pytest.approx(log["test_accuracy"][1], abs=1e-9)


def test_weight_average_is_what_gets_published(robust, tmp_path):
    proc = robust("train", "train.epochs=2", "data.n_train=400", "train.ema=0.9")
    assert proc.returncode == 0, proc.stderr
    entry = next((tmp_path / "outputs" / "checkpoints").iterdir())
    resumable = torch.load(entry / "last.pt", weights_only=True)
    published = _weights(entry / "model.pt")
    assert all(torch.equal(published[k], resumable["average"][k]) for k in published)
    assert not all(torch.equal(published[k], resumable["state_dict"][k]) for k in published)


BAD_VALUES = [
    (["defense=trades", "defense.beta=-1"], "defense.beta"),
    (["defense=pgd_at", "defense.awp.gamma=-0.1"], "defense.awp.gamma"),
    (["defense=trades", "defense.attack_bn=batch"], "defense.attack_bn"),
    (["train.validate=true"], "data.val_fraction"),
    (["train.select=best_robust", "data.val_fraction=0.2"], "train.validate=true"),
    (["defense=trades", "defense.norm=l2", "train.validate=true", "data.val_fraction=0.2"], "train.val_attack.norm=l2"),
    (["defense=pgd_at", "train.validate=true", "data.val_fraction=0.2", "attack@train.val_attack=deepfool"], "budgeted"),
    (["train.ema=1.5"], "train.ema"),
    (["train.scheduler=piecewise", "train.milestones=[3,2]"], "train.milestones"),
]


def test_bad_training_values_are_refused_by_the_commands_checks():
    from hydra import compose, initialize_config_module

    from robust_cli.commands import build
    from robust_cli.commands.train import validate
    from robust_cli.core.errors import UserError

    def checks(cfg):  # what a train job runs before any work: the shared training checks, then the command's own
        build.check_training(cfg)
        validate(cfg)

    with initialize_config_module("robust_cli.conf", version_base="1.3"):
        for args, needle in BAD_VALUES:
            with pytest.raises(UserError, match=re.escape(needle)):
                checks(compose("train", overrides=args))


@pytest.mark.parametrize(
    "args,needle", [BAD_VALUES[0], BAD_VALUES[4], (["train.validate=true", "data.val_fraction=0.2", "attack@train.val_attack=pdg"], "attack/pdg")]
)
def test_bad_training_values_are_one_line_before_any_work(robust, tmp_path, args, needle):
    proc = robust("train", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


PRESETS = ["cifar10_pgd_at", "cifar10_trades", "cifar10_trades_awp", "cifar10_mart"]


def test_every_recipe_composes_with_its_published_settings(robust):
    job = robust("train", "experiment=cifar10_trades_awp", "--cfg", "job")  # what a user types
    assert job.returncode == 0, job.stderr
    assert OmegaConf.create(job.stdout).defense.awp.gamma == pytest.approx(5e-3)
    from hydra import compose, initialize_config_module

    with initialize_config_module("robust_cli.conf", version_base="1.3"):
        configs = {p: compose("train", overrides=[f"experiment={p}"]) for p in PRESETS}
    for cfg in configs.values():
        assert cfg.dataset.name == "cifar10" and cfg.train.scheduler._target_.endswith("schedules.Piecewise") and cfg.data.augment == "crop_flip"
        assert math.isclose(cfg.defense.eps, 8 / 255, rel_tol=0.02)  # 8/255, or the official scripts' 0.031
    assert configs["cifar10_pgd_at"].train.select == "best_robust" and configs["cifar10_pgd_at"].model._target_.endswith("PreActResNet")
    assert configs["cifar10_trades"].defense.beta == 6.0 and configs["cifar10_trades"].defense.attack_bn == "eval"
    assert configs["cifar10_mart"].defense.beta == 5.0 and configs["cifar10_mart"].train.weight_decay == pytest.approx(3.5e-3)
    assert configs["cifar10_trades_awp"].model._target_.endswith("wide_resnet")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_recipe_has_a_smoke_variant_that_trains(robust, tmp_path, preset):
    smoke = robust("train", f"experiment={preset}_smoke")
    assert smoke.returncode == 0, smoke.stderr
    log = pd.read_csv(latest_run(tmp_path, "train") / "train_log.csv")
    assert len(log) == 2 and log["test_accuracy"].iloc[-1] > 0.5


def test_mnist_defenses_smoke_writes_its_table(robust, tmp_path):
    proc = robust("attack", "--multirun", "experiment=mnist_defenses", "scale=smoke")
    assert proc.returncode == 0, proc.stderr
    tables = list((tmp_path / "outputs").rglob("table_mnist_defenses.csv"))
    assert tables, proc.stdout
    table = pd.read_csv(tables[0])
    assert table["objective"].tolist() == ["none", "trades_beta6"]
    assert (table["clean_low"] <= table["clean"]).all() and (table["clean"] <= table["clean_high"]).all()
    assert (table["seconds_per_epoch"] > 0).all() and table["time_vs_none"].iloc[0] == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_shipped_optimizer_yamls_are_the_builtins_and_keep_checkpoint_keys(name):
    """conf/optimizer/<name>.yaml resolves to exactly loop.builtin_optimizer, so the checkpoint identity names it as
    it did when train.optimizer was a name (models trained before are found again)."""
    from hydra import compose, initialize_config_module

    from robust_cli.training.loop import builtin_optimizer, shipped_names

    with initialize_config_module("robust_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"optimizer={name}", "train.lr=0.01", "train.weight_decay=0.001"])
    train = OmegaConf.to_container(cfg.train, resolve=True)
    assert train["optimizer"] == builtin_optimizer(name, TrainSettings.from_dict(train))
    assert shipped_names(train)["optimizer"] == name and shipped_names(train)["scheduler"] == "cosine"
    custom = {**train, "optimizer": {**train["optimizer"], "lr": 0.5}}  # a changed value is no longer the shipped one
    assert shipped_names(custom)["optimizer"] == custom["optimizer"]


@pytest.mark.parametrize("name", ["none", "step", "cosine", "cyclic", "piecewise", "onecycle"])
def test_every_scheduler_yaml_builds_and_steps(name):
    from hydra import compose, initialize_config_module

    from robust_cli.training.loop import builtin_scheduler

    with initialize_config_module("robust_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"scheduler={name}", "train.epochs=4", "train.lr=0.1"])
    settings = TrainSettings.from_dict(OmegaConf.to_container(cfg.train, resolve=True))
    assert OmegaConf.to_container(cfg.train.scheduler, resolve=True) == builtin_scheduler(name, settings)
    optimizer, scheduler, per_step = make_optimizer(settings, nn.Linear(2, 2), steps_per_epoch=5)
    assert per_step == (name in ("cyclic", "onecycle")) and (scheduler is None) == (name == "none")
    lrs = []
    for _ in range(4 * (5 if per_step else 1)):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    if name == "onecycle":  # torch's OneCycleLR: warm-up to max_lr over 30 % of the 20 steps, then down
        assert max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[0] < 0.01 and lrs[-1] < lrs[len(lrs) // 2]
    if name == "step":  # train.lr_step defaults to 10 > 4 epochs: constant
        assert lrs == [0.1] * 4


def test_any_torch_optimizer_trains_from_a_yaml_of_ones_own(robust, tmp_path):
    conf = tmp_path / "myconf" / "optimizer"
    conf.mkdir(parents=True)
    (conf / "rmsprop.yaml").write_text("# @package train.optimizer\n_target_: torch.optim.RMSprop\n_partial_: true\nlr: 0.001\nalpha: 0.9\n")
    proc = robust("train", "--config-dir", str(tmp_path / "myconf"), "optimizer=rmsprop", "train.epochs=1", "data.n_train=200", check=True)
    assert "test_accuracy" in proc.stdout
    bad = robust("train", "train.optimizer._target_=torch.optim.Nope", "train.epochs=1")
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "error: train.optimizer: _target_ 'torch.optim.Nope' cannot be imported; give a class such as torch.optim.AdamW"
    )
