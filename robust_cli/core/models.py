"""Model zoo. Every class takes `(input_shape, num_classes, **params)` and maps a batch to logits.

`build_model` wraps the network in a `Classifier` that holds the dataset's normalisation (so attacks see
[0, 1] inputs) and the optional tanh head of tulip. Shapes come from the dataset metadata, never hard-coded.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from robust_cli.core.errors import UserError


def _flat_size(input_shape) -> int:
    return int(math.prod(input_shape))


def _needs_image(name, input_shape):
    if len(input_shape) != 3:
        raise UserError(f"model {name} needs image data of shape (C, H, W); this dataset has shape {tuple(input_shape)}: pick an fc model")


class MLP(nn.Module):
    """Fully connected ReLU net: flatten -> hidden layers -> logits.

    Bell/Szegedy regulariser per layer l: lambda_l * ||W_l||_2 / N_l (Frobenius norm of the weight matrix, N_l its
    number of weights) added to the mean cross-entropy, with `penalty_scale` multiplying it. The extracted text
    lost the exact form; penalty_scale is chosen so the FC10-k accuracies land near Bell's (see conf/model/fc10_*.yaml).
    """

    def __init__(self, input_shape, num_classes, hidden=(), penalties=None, penalty_scale=1.0):
        super().__init__()
        sizes = [_flat_size(input_shape), *[int(h) for h in hidden], int(num_classes)]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        penalties = list(penalties) if penalties is not None else [0.0] * len(self.layers)
        if len(penalties) != len(self.layers):
            raise UserError(f"model.penalties has {len(penalties)} values but the net has {len(self.layers)} layers")
        self.penalties = [float(p) for p in penalties]
        self.penalty_scale = float(penalty_scale)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)

    def regularization(self):
        total = self.layers[0].weight.new_zeros(())
        for lam, layer in zip(self.penalties, self.layers):
            if lam:
                total = total + lam * self.penalty_scale * layer.weight.norm() / layer.weight.numel()
        return total


class ConvNet(nn.Module):
    """Bell's C-Ch (Table 3): n_conv 5x5 convolutions with `channels` channels, 2x2 max-pool, FC `fc`, FC classes.

    Table 3 uses unpadded convolutions on 28x28 (24, 20, 16, 12 -> pool 6). `padding: auto` keeps that where the
    image is large enough and pads 'same' otherwise (8x8 digits), so every image dataset fits.
    """

    def __init__(self, input_shape, num_classes, channels=32, n_conv=4, kernel_size=5, fc=256, padding="auto"):
        super().__init__()
        _needs_image("cnn", input_shape)
        c, h, w = input_shape
        shrink = n_conv * (kernel_size - 1)
        if padding == "auto":
            padding = "valid" if min(h, w) - shrink >= 2 else "same"
        if padding not in ("valid", "same"):
            raise UserError(f"model.padding must be auto, valid or same, got {padding!r}")
        convs, in_ch = [], c
        for _ in range(n_conv):
            convs += [nn.Conv2d(in_ch, channels, kernel_size, padding=padding), nn.ReLU()]
            in_ch = channels
        self.features = nn.Sequential(*convs, nn.MaxPool2d(2))
        side = lambda s: (s - shrink if padding == "valid" else s) // 2
        if side(h) < 1 or side(w) < 1:
            raise UserError(f"model cnn with padding=valid does not fit images of size {h}x{w}; use model.padding=same")
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * side(h) * side(w), fc), nn.ReLU(), nn.Linear(fc, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet(nn.Module):
    """LeNet-5-like ("the Szegedy CNN"): conv 6@5x5 'same', pool, conv 16@5x5 'same', pool, FC 120, 84, classes."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        _needs_image("lenet", input_shape)
        c, h, w = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class _Block(nn.Module):
    """Pre-activation-free residual block; `groups` > 1 with a bottleneck gives ResNeXt's aggregated transform."""

    def __init__(self, in_ch, out_ch, stride, groups=1, width=None):
        super().__init__()
        if width is None:  # ResNet basic block: two 3x3 convs
            self.body = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
                nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:  # ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand
            self.body = nn.Sequential(
                nn.Conv2d(in_ch, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, out_ch, 1, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (3x3 stem, no initial pool). resnet18: blocks [2,2,2,2], widths [64,128,256,512].

    With `cardinality` > 1 the blocks are ResNeXt bottlenecks (ResNeXt-29: blocks [3,3,3], widths [256,512,1024],
    bottleneck width = cardinality * base_width * 2^stage).
    """

    def __init__(self, input_shape, num_classes, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem=64, cardinality=1, base_width=4):
        super().__init__()
        _needs_image("resnet", input_shape)
        layers, in_ch = [nn.Conv2d(input_shape[0], stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()], stem
        for stage, (n, out_ch) in enumerate(zip(blocks, widths)):
            for i in range(n):
                stride = 2 if (i == 0 and stage > 0) else 1
                width = None if cardinality == 1 else cardinality * base_width * 2**stage
                layers.append(_Block(in_ch, out_ch, stride, groups=cardinality, width=width))
                in_ch = out_ch
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class _PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv, BN-ReLU-conv, plus the shortcut (a 1x1 conv of the
    pre-activated input where the shape changes). `dropout` between the convs (Zagoruyko & Komodakis' WRN option)."""

    def __init__(self, in_ch, out_ch, stride, dropout=0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_ch), nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(out_ch), nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if stride != 1 or in_ch != out_ch else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(out)))))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 images (Rice et al. 2020's PreAct ResNet-18: blocks [2,2,2,2], widths
    [64,128,256,512]); wide_resnet: Zagoruyko & Komodakis' WRN-depth-k as in the TRADES/MART/AWP code (stem 16,
    widths 16k/32k/64k, (depth - 4) / 6 blocks per stage). Both end in BN-ReLU, global average pool, linear."""

    def __init__(self, input_shape, num_classes, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem=64, strides=None, dropout=0.0):
        super().__init__()
        _needs_image("preact_resnet", input_shape)
        strides = strides or [1] + [2] * (len(blocks) - 1)
        layers, in_ch = [nn.Conv2d(input_shape[0], stem, 3, 1, 1, bias=False)], stem
        for n, out_ch, stride in zip(blocks, widths, strides):
            for i in range(n):
                layers.append(_PreActBlock(in_ch, out_ch, stride if i == 0 else 1, float(dropout)))
                in_ch = out_ch
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(in_ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def wide_resnet(input_shape, num_classes, depth=34, widen_factor=10, dropout=0.0):
    """WRN-depth-widen_factor (WRN-34-10: 5 blocks per stage, widths 160/320/640, 46.2 M parameters)."""
    if (depth - 4) % 6:
        raise UserError(f"model.depth must be 6n + 4 (e.g. 28, 34, 40) for a wide ResNet, got {depth}")
    n, k = (depth - 4) // 6, int(widen_factor)
    return PreActResNet(input_shape, num_classes, blocks=(n, n, n), widths=(16 * k, 32 * k, 64 * k), stem=16, dropout=dropout)


class TanhHead(nn.Module):
    """tulip's output head (Oberman/Finlay/Calder): BatchNorm1d(classes, affine=False), then |t| tanh(z / |t|)."""

    def __init__(self, num_classes, t=1.0):
        super().__init__()
        self.norm = nn.BatchNorm1d(num_classes, affine=False)
        self.t = nn.Parameter(torch.tensor(float(t)))

    def forward(self, z):
        scale = self.t.abs() + 1e-12
        return scale * torch.tanh(self.norm(z) / scale)


class Classifier(nn.Module):
    """[0, 1] data -> normalise -> net -> optional head. Attacks and persistence see data space only."""

    def __init__(self, net, num_classes, mean=None, std=None, head=None, test_noise=0.0):
        super().__init__()
        self.net = net
        # a randomised model for EoT evaluation: Gaussian noise of this std on the input in eval mode only (training
        # noise is the defense's business, e.g. defense=gaussian_aug)
        self.test_noise = float(test_noise)
        if mean is not None:
            shape = (1, -1) + (1,) * 2  # per-channel (C, H, W) images
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))
        else:
            self.mean = self.std = None
        self.head = TanhHead(num_classes) if head == "tanh" else None

    def forward(self, x):
        if self.test_noise > 0 and not self.training:
            x = x + self.test_noise * torch.randn_like(x)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        z = self.net(x)
        return self.head(z) if self.head is not None else z

    def regularization(self):
        reg = getattr(self.net, "regularization", None)
        if reg is not None:
            return reg()
        first = next(self.parameters(), None)  # analytic test objects have no parameters
        return torch.zeros((), device=first.device if first is not None else None)


def torchvision_model(input_shape, num_classes, arch: str):
    """Any `torchvision.models` builder by name (vgg16, alexnet, resnet50, ...), untrained, with the dataset's
    number of classes; pretrained weights come from `model.weights` (see `load_weights`)."""
    import torchvision

    _needs_image(f"torchvision {arch}", input_shape)
    if int(input_shape[0]) != 3:
        raise UserError(
            f"torchvision's {arch} takes RGB images (3 channels); this dataset's images have {input_shape[0]}: use model=timm (in_chans) or a zoo model"
        )
    builders = set(torchvision.models.list_models(module=torchvision.models))
    if arch not in builders:
        import difflib

        close = difflib.get_close_matches(arch, sorted(builders), n=3)
        raise UserError(f"model.arch={arch!r} is not a torchvision.models classifier" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return torchvision.models.get_model(arch, weights=None, num_classes=int(num_classes))


def timm_model(input_shape, num_classes, arch: str):
    """A timm architecture by name (optional extra: pip install 'robust[zoo]'), untrained; weights from model.weights."""
    try:
        import timm
    except ImportError:
        raise UserError("model=timm needs the timm package: pip install 'robust[zoo]' (or pip install timm)") from None
    _needs_image(f"timm {arch}", input_shape)
    if arch not in timm.list_models():
        raise UserError(f"model.arch={arch!r} is not a timm model name (timm.list_models() lists them)")
    return timm.create_model(arch, pretrained=False, num_classes=int(num_classes), in_chans=int(input_shape[0]))


ROBUSTBENCH_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


def _robustbench_zoo():
    """RobustBench's model table (dataset -> threat model -> name -> {'model': constructor, ...}).

    robustbench 1.1.1's top-level __init__ imports its evaluation code, which needs pkg_resources and the git-only
    autoattack package; the model zoo needs neither. When the package itself does not import, its folder is
    mounted as a bare package (no __init__ run) and only robustbench.model_zoo is imported from it."""
    import importlib
    import importlib.util
    import sys
    import types

    fix = "pip install 'robust[zoo]' (robustbench, timm, geotorch, torchdiffeq)"
    try:
        zoo = importlib.import_module("robustbench.model_zoo")
    except ImportError:
        sys.modules.pop("robustbench", None)
        spec = importlib.util.find_spec("robustbench")
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model=robustbench needs the robustbench package: {fix}") from None
        bare = types.ModuleType("robustbench")
        bare.__path__ = list(spec.submodule_search_locations)
        sys.modules["robustbench"] = bare
        try:
            zoo = importlib.import_module("robustbench.model_zoo")
        except ImportError as exc:
            raise UserError(f"model=robustbench: robustbench's model zoo needs {exc.name}: {fix}") from None
    enums = importlib.import_module("robustbench.model_zoo.enums")
    return zoo.model_dicts, enums.BenchmarkDataset, enums.ThreatModel


def robustbench_model(input_shape, num_classes, name: str, threat_model: str = "Linf", dataset: str = "cifar10"):
    """A RobustBench model's architecture by its id (model.name=Carmon2019Unlabeled), untrained; its checkpoint
    comes from model.weights (a local file: nothing is downloaded). RobustBench models take [0, 1] inputs and
    normalise inside themselves where they need it, so robust adds no normalisation (the YAML's normalize: false)."""
    import difflib

    if dataset not in ROBUSTBENCH_CLASSES:
        raise UserError(f"model.dataset must be one of {', '.join(ROBUSTBENCH_CLASSES)} (RobustBench's datasets), got {dataset!r}")
    if ROBUSTBENCH_CLASSES[dataset] != int(num_classes):
        raise UserError(
            f"model=robustbench model.dataset={dataset} has {ROBUSTBENCH_CLASSES[dataset]} classes, the dataset here has {num_classes}; "
            f"use the dataset the model was trained on"
        )
    wanted = (3, 32, 32) if dataset != "imagenet" else (3,)
    if tuple(input_shape)[: len(wanted)] != wanted:
        raise UserError(
            f"model=robustbench model.dataset={dataset} takes images of shape {'x'.join(map(str, wanted))}{' x H x W' if dataset == 'imagenet' else ''}, "
            f"the dataset here gives {'x'.join(map(str, input_shape))}; use dataset={dataset}"
        )
    tables, benchmark, threat = _robustbench_zoo()
    threats = [t.value for t in threat]
    if threat_model not in threats:
        raise UserError(f"model.threat_model must be one of {', '.join(threats)}, got {threat_model!r}")
    models = tables[benchmark(dataset)].get(threat(threat_model), {})
    if name not in models:
        close = difflib.get_close_matches(str(name), list(models), n=3)
        raise UserError(
            f"model.name={name!r} is not a RobustBench {dataset} {threat_model} model"
            + (f"; did you mean {', '.join(close)}?" if close else f" ({len(models)} are: {', '.join(list(models)[:4])}, ...)")
        )
    if isinstance(models[name].get("gdrive_id"), list):
        raise UserError(f"model.name={name} is an ensemble of several checkpoints in RobustBench; robust loads single-checkpoint models only")
    return models[name]["model"]()


def torchvision_weights_name(spec) -> str | None:
    """model.weights when it names torchvision weights (IMAGENET1K_V1, DEFAULT) rather than a file, else None."""
    from pathlib import Path

    weights = spec.get("weights") if spec is not None else None
    if not weights or not str(spec.get("_target_", "")).endswith("torchvision_model"):
        return None
    return str(weights) if str(weights).isupper() and not Path(str(weights)).is_file() else None


def torchvision_weights(arch: str, name: str):
    """(file in the torch hub cache, the weights enum) for a torchvision weights name such as IMAGENET1K_V1; the
    file must be there already (nothing is downloaded): otherwise one line naming the file and where to put it."""
    import os

    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
        weights = enum[name] if name != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        names = []
        try:
            names = [w.name for w in torchvision.models.get_model_weights(arch)]
        except (KeyError, ValueError):
            pass
        raise UserError(
            f"model.weights={name!r}: not a file, and not a weights name of torchvision {arch}" + (f" ({', '.join(names)})" if names else "")
        ) from None
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cache):
        raise UserError(
            f"model.weights={name}: {os.path.basename(weights.url)} is not in the torch hub cache; robust does not download: "
            f"fetch {weights.url} and put it at {cache} (or give model.weights=PATH)"
        )
    return cache, weights


def _fit_model_prefix(state: dict, own: dict) -> dict:
    """Codebases that wrap their network keep it as `self.model` (RobustBench's checkpoints, both ways round): drop
    or add a `model.` prefix on every key, but only when that makes the keys exactly the model's."""
    if set(state) == set(own):
        return state
    if all(k.startswith("model.") for k in state) and {k[len("model.") :] for k in state} == set(own):
        return {k[len("model.") :]: v for k, v in state.items()}
    if {f"model.{k}" for k in state} == set(own):
        return {f"model.{k}": v for k, v in state.items()}
    return state


def load_weights(net: nn.Module, path, what: str) -> None:
    """Weights from elsewhere into `net`: any format registry.load_checkpoint reads; a head of another size is one
    line naming both sizes, other mismatches name the first differing keys."""
    from robust_cli.core import registry

    state = registry.load_checkpoint(path)["state_dict"]
    own = net.state_dict()
    state = _fit_model_prefix(state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if (
        reshaped
        and not missing
        and not unexpected
        and all(state[k].dim() >= 1 and own[k].dim() >= 1 and state[k].shape[1:] == own[k].shape[1:] for k in reshaped)
    ):
        k = reshaped[0]
        raise UserError(
            f"{what}: the weights in '{path}' have a {state[k].shape[0]}-class head ({k} {list(state[k].shape)}), the dataset has "
            f"{own[k].shape[0]} classes; use the dataset the weights were trained on (or weights for {own[k].shape[0]} classes)"
        )
    if missing or unexpected or reshaped:
        found = "; ".join(
            p
            for p in (
                f"missing {missing[:2]}" if missing else "",
                f"unexpected {unexpected[:2]}" if unexpected else "",
                f"shape {', '.join(f'{k} {list(state[k].shape)} here {list(own[k].shape)}' for k in reshaped[:2])}" if reshaped else "",
            )
            if p
        )
        raise UserError(f"{what}: the weights in '{path}' do not fit the model ({found}); check model.arch / the class and its arguments")
    net.load_state_dict(state)


def _import_target(target: str):
    """The object a dotted path names, imported here (not through Hydra, whose error spans lines and logs)."""
    import importlib

    module_name, _, name = str(target).rpartition(".")
    fix = "the package must be importable (pip install -e it, or PYTHONPATH)"
    try:
        module = importlib.import_module(module_name) if module_name else None
    except Exception as exc:  # noqa: BLE001 - not importable: the user's path or environment
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"model._target_={target}: cannot import it ({type(exc).__name__}: {message}); {fix}") from None
    if module is None or not hasattr(module, name):
        raise UserError(f"model._target_={target}: {module_name or target} has no {name!r}; {fix}")
    return getattr(module, name)


def _instantiate(spec: dict, meta):
    """The model's `_target_` with its YAML's arguments, plus input_shape and num_classes where it takes them (a
    user's own class, `model._target_=my_pkg.module.Net`, need not)."""
    import inspect

    from hydra.utils import instantiate

    extra = {"input_shape": tuple(meta.shape), "num_classes": meta.num_classes}
    target = spec.get("_target_")
    if not target:
        raise UserError("model: no _target_; pick a model= option, or with model=python give model._target_=package.module.Class")
    obj = _import_target(target)
    try:
        params = inspect.signature(obj).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
        extra = {k: v for k, v in extra.items() if takes_any or k in params}
    except (TypeError, ValueError):
        pass
    try:
        net = instantiate(spec, **extra)
    except UserError:
        raise
    except Exception as exc:  # hydra wraps constructor errors; surface ours, keep bugs loud
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise UserError(f"model: {cause}") from None
        raise
    if not isinstance(net, nn.Module):
        raise UserError(f"model._target_={target} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def build_model(spec: dict, meta) -> Classifier:
    """Instantiate the model settings `spec` (the config's resolved `model` node) for the dataset's shape and classes, wrapped with normalisation and head.

    `model.weights` (any model): a weights file (.pt/.pth/.safetensors, a bare state dict or a wrapper), or for
    model=torchvision a weights name (IMAGENET1K_V1) whose file is already in the torch hub cache; its
    normalisation (mean/std) then replaces the dataset's, inside the model as always."""
    settings = dict(spec)
    head = settings.pop("head", None)
    normalize = settings.pop("normalize", True)
    test_noise = settings.pop("test_noise", 0.0) or 0.0
    weights = settings.pop("weights", None)
    if not isinstance(test_noise, (int, float)) or test_noise < 0:
        raise UserError(f"model.test_noise must be a number >= 0 (std of test-time input noise), got {test_noise!r}")
    if head not in (None, "none", "tanh"):
        raise UserError(f"model.head must be none or tanh, got {head!r}")
    net = _instantiate(settings, meta)
    mean, std = meta.mean, meta.std
    if weights:
        from pathlib import Path

        path, enum = Path(str(weights)), None
        if torchvision_weights_name(spec):
            path, enum = torchvision_weights(settings["arch"], str(weights))
        elif not path.is_file():
            raise UserError(f"model.weights='{weights}' is not a file; give the path of a .pt, .pth or .safetensors weights file")
        load_weights(net, path, f"model.weights={weights}")
        transforms = enum.transforms() if enum is not None else None
        if transforms is not None and hasattr(transforms, "mean"):  # the weights' own preprocessing
            mean, std = tuple(transforms.mean), tuple(transforms.std)
    use_norm = normalize and mean is not None and len(meta.shape) == 3
    return Classifier(
        net, meta.num_classes, mean if use_norm else None, std if use_norm else None, head=None if head == "none" else head, test_noise=test_noise
    )


def weights_preprocessing(settings) -> dict | None:
    """{'resize': ..., 'image_size': ...} of a torchvision weights name's evaluation transform, else None."""
    name = torchvision_weights_name(settings)
    if name is None:
        return None
    transforms = torchvision_weights(str(settings.get("arch")), name)[1].transforms()  # a missing file is refused here, before any data is read
    if not hasattr(transforms, "crop_size") or not hasattr(transforms, "resize_size"):
        return None
    return {"resize": int(transforms.resize_size[0]), "image_size": int(transforms.crop_size[0])}


def weights_file(spec: dict):
    """The file model.weights stands for (a weights name resolved to its torch hub cache file)."""
    from pathlib import Path

    name = torchvision_weights_name(spec)
    if name is not None:
        return Path(torchvision_weights(str(spec["arch"]), name)[0])
    return Path(str(spec["weights"]))
