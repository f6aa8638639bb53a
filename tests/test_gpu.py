"""Checks that need a CUDA device (scripts/gpu_check.sh runs them; skipped elsewhere)."""

import json

import pytest
import torch
import torch.nn as nn

from robust_cli.attacks import FGSM, PGD
from robust_cli.core.engine import BatchSize, Engine, FastModel, chunked
from robust_cli.evaluation import evaluate as ev
from tests.conftest import latest_run
from tests.test_engine import Bf16Flips

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def test_training_on_the_gpu_keeps_data_on_the_device_and_records_it(robust, tmp_path):
    robust("train", "dataset=digits", "train.epochs=1", "device=cuda", check=True)
    run = latest_run(tmp_path, "train")
    record = json.loads((run / "run.json").read_text())
    assert record["device"].startswith("cuda")
    state = torch.load(run / "model.pt", weights_only=True, map_location="cpu")
    env = state["environment"]
    assert env["data_on_device"] is True and env["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_bf16_success_that_fp32_rejects_is_not_counted_on_the_gpu():
    model = Bf16Flips().to(CUDA).eval()
    x, y = torch.ones(4, 1, device=CUDA), torch.zeros(4, dtype=torch.long, device=CUDA)
    fast = FastModel(model, "bf16", "cuda", compiled=False, channels_last=False)
    assert fast(x).argmax(1).tolist() == [1] * 4 and model(x).argmax(1).tolist() == [0] * 4
    (o,) = ev.accuracy_curve(fast, FGSM(), x.cpu(), y.cpu(), [1e-6], device=CUDA)
    assert not o.success.any() and o.fp32_rejected == 4


def test_bf16_attack_run_is_judged_in_fp32(robust, tmp_path):
    common = ["dataset=digits", "train.epochs=1", "device=cuda"]
    robust("train", *common, check=True)
    robust("attack", *common, "attack=pgd", "eps=[0,0.1]", "precision=bf16", check=True)
    run = latest_run(tmp_path, "attack")
    adv = torch.load(run / "adversarial.pt", weights_only=True)
    state = torch.load(next((tmp_path / "outputs" / "checkpoints").glob("*/model.pt")), weights_only=True)
    from omegaconf import OmegaConf

    from robust_cli.commands import build
    from robust_cli.core.data import DatasetMeta

    cfg = OmegaConf.create(state["config"])
    model = build.make_model(cfg, DatasetMeta("digits", (1, 8, 8), 10))
    model.load_state_dict(state["state_dict"])
    model.eval()
    with torch.no_grad():  # every reported prediction is the fp32 CPU model's (up to fp32 device differences)
        fp32 = model(adv["x_adv"][1]).argmax(1)
    assert (fp32 == adv["pred"][1]).double().mean() > 0.995


def test_compile_on_the_gpu_gives_eager_predictions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(CUDA).eval()
    said = []
    fast = FastModel(model, "fp32", "cuda", compiled=True, channels_last=False, warn=said.append)
    x = torch.rand(512, 1, 8, 8, device=CUDA)
    out = fast(x)
    assert not said, said
    assert torch.allclose(out, model(x), atol=1e-5)


def test_channels_last_conv_net_matches_the_default_layout():
    from robust_cli.core.models import ConvNet

    torch.manual_seed(0)
    net = ConvNet((3, 32, 32), 10, channels=16).to(CUDA).eval()
    x = torch.rand(64, 3, 32, 32, device=CUDA)
    reference = net(x)
    engine = Engine.create(CUDA, "fp32", False, "auto")
    fast = engine.fast(net)
    assert engine.uses_channels_last(net) and isinstance(fast, FastModel)
    assert torch.allclose(fast(x), reference, atol=1e-3)


def test_auto_batch_size_halves_on_a_real_out_of_memory_error():
    total = torch.cuda.get_device_properties(CUDA).total_memory
    per_example = 2**30  # one GiB per example: 8192 of them cannot fit on any GPU

    def heavy(part):
        big = part[:, None].expand(-1, per_example // 4).clone()
        return big.sum(1)

    x = torch.ones(300, device=CUDA)
    batch = BatchSize("auto", "batch_size", CUDA)
    out = chunked(heavy, x, batch)
    assert batch.halvings >= 1 and batch.size * per_example < total
    assert torch.allclose(out, torch.full((300,), float(per_example // 4), device=CUDA))


def test_attack_batch_auto_on_the_gpu_records_the_size(robust, tmp_path):
    common = ["dataset=digits", "train.epochs=1", "device=cuda"]
    robust("train", *common, check=True)
    robust("attack", *common, "attack=pgd", "batch_size=auto", check=True)
    record = json.loads((latest_run(tmp_path, "attack") / "run.json").read_text())
    assert record["batch_size"]["auto"] and record["batch_size"]["size"] >= 1


def test_a_seeded_gpu_training_run_is_repeatable(robust, tmp_path):
    args = ["train", "dataset=digits", "model=fc200_200_10", "train.epochs=2", "device=cuda", "precision=fp32"]
    robust(*args, "outputs_root=a", check=True)
    robust(*args, "outputs_root=b", check=True)
    a = torch.load(next((tmp_path / "a" / "checkpoints").glob("*/model.pt")), weights_only=True)
    b = torch.load(next((tmp_path / "b" / "checkpoints").glob("*/model.pt")), weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_pgd_under_bf16_on_resnet18_runs_and_is_not_stronger_than_fp32_judged():
    from robust_cli.core.models import Classifier, ResNet

    torch.manual_seed(0)
    model = Classifier(ResNet((3, 32, 32), 10, blocks=[1, 1, 1, 1], widths=[16, 32, 64, 128], stem=16), 10).to(CUDA).eval()
    x = torch.rand(256, 3, 32, 32)
    with torch.no_grad():
        y = model(x.to(CUDA)).argmax(1).cpu()
    fast = Engine.create(CUDA, "bf16", False, "auto").fast(model)
    (o,) = ev.accuracy_curve(fast, PGD(steps=5), x, y, [2 / 255], device=CUDA)
    pred = ev.predict(model, o.x_adv, device=CUDA)
    assert torch.equal(pred, o.pred)  # judged by the fp32 model
