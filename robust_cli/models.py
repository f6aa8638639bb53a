"""Model zoo. Every class takes `(input_shape, num_classes, **params)` and maps a batch to logits.

`build_model` wraps the network in a `Classifier` that holds the dataset's normalisation (so attacks see
[0, 1] inputs) and the optional tanh head of tulip. Shapes come from the dataset metadata, never hard-coded.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from robust_cli.errors import UserError


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
        side = (lambda s: (s - shrink if padding == "valid" else s) // 2)
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
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
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
                nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
                nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch),
            )
        else:  # ResNeXt bottleneck: 1x1 reduce, grouped 3x3, 1x1 expand
            self.body = nn.Sequential(
                nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
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


def build_model(cfg, meta) -> Classifier:
    """Instantiate `cfg.model` for the dataset's shape and classes, wrapped with normalisation and head."""
    from hydra.utils import instantiate

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    head = model_cfg.pop("head", None)
    normalize = model_cfg.pop("normalize", True)
    test_noise = model_cfg.pop("test_noise", 0.0) or 0.0
    if not isinstance(test_noise, (int, float)) or test_noise < 0:
        raise UserError(f"model.test_noise must be a number >= 0 (std of test-time input noise), got {test_noise!r}")
    if head not in (None, "none", "tanh"):
        raise UserError(f"model.head must be none or tanh, got {head!r}")
    try:
        net = instantiate(model_cfg, input_shape=tuple(meta.shape), num_classes=meta.num_classes)
    except UserError:
        raise
    except Exception as exc:  # hydra wraps constructor errors; surface ours, keep bugs loud
        cause = exc.__cause__ or exc
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, TypeError):
            raise UserError(f"model: {cause}") from None
        raise
    use_norm = normalize and meta.mean is not None and len(meta.shape) == 3
    return Classifier(net, meta.num_classes, meta.mean if use_norm else None, meta.std if use_norm else None, head=None if head == "none" else head, test_noise=test_noise)
