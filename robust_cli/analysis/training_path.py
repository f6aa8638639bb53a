"""The training path the discrete path kernel reads (Bell, Part II): a model's parameters as one flat vector, and
the forward-Euler trajectory w_0, ..., w_N with the per-step loss gradients a_{i,s}, recorded by `train_path`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from robust_cli.core.errors import UserError


def zero_last_layer(model: nn.Module) -> nn.Module:
    """Zero the weight of the last module (in registration order) that owns one, so yhat_{w_0}(x) = its bias = b."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)]
    if not owners:
        raise UserError(f"{type(model).__name__} has no layer with a weight to zero: the kernel needs a constant initial output")
    with torch.no_grad():
        owners[-1].weight.zero_()
    return model


def gauss_legendre(points: int, dtype=torch.float64, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the `points`-point Gauss-Legendre rule on [0, 1] (exact for polynomials of degree 2p-1)."""
    if points < 1:
        raise UserError(f"quadrature points must be >= 1, got {points}")
    x, w = np.polynomial.legendre.leggauss(points)
    return (torch.tensor((x + 1) / 2, dtype=dtype, device=device), torch.tensor(w / 2, dtype=dtype, device=device))


OUTPUTS = ("logits", "probabilities")


def nll_of_probabilities(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean -log p_y: cross-entropy written on the softmax output (appendix 17.5's NLL), same weight gradient."""
    return -p.gather(1, y[:, None]).log().mean()


class FlatModel:
    """A module seen as a function of one flat parameter vector: f(w, x) = yhat_w(x), for torch.func.

    `output` is the function the kernel represents: the module's logits, or their softmax (Bell's appendix 17.3 /
    17.5 write the loss on the probabilities yhat in (0, 1)). Both train identically; they differ in what is
    represented: the probabilities' gradients vanish where the net is saturated (far from the data)."""

    def __init__(self, model: nn.Module, output: str = "logits"):
        if output not in OUTPUTS:
            raise UserError(f"kernel output must be logits or probabilities, got {output!r}")
        self.model, self.output = model, output
        named = list(model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.buffers = {n: b for n, b in model.named_buffers()}

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def flatten(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def load(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self.model.parameters(), flat.split(self.sizes)):
                p.copy_(chunk.view_as(p))

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(self.names, flat.split(self.sizes), self.shapes)}
        logits = functional_call(self.model, (params, self.buffers), (x,))
        return logits.softmax(-1) if self.output == "probabilities" else logits

    def single(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Output for one unbatched input (for per-sample Jacobians under vmap)."""
        return self(flat, x.unsqueeze(0)).squeeze(0)


@dataclass
class TrainingPath:
    """Every weight state of a forward-Euler run and the kernel coefficients a_{i,s} = -eps dL/dyhat_i."""

    flat: FlatModel
    weights: torch.Tensor  # (N+1, d): w_0 .. w_N
    coefficients: torch.Tensor  # (N, M, K): a_{i,s}; zero for points outside step s's mini-batch
    train_x: torch.Tensor  # (M, *input_shape)
    train_y: torch.Tensor  # (M,)
    step_size: float
    bias: torch.Tensor  # (K,): b = yhat_{w_0}(x), the same for every x
    initial_spread: float  # max |yhat_{w_0}(x_i) - b| over training points; 0 makes the representation exact
    losses: torch.Tensor  # (N+1,): training loss at w_0 .. w_N
    accuracies: torch.Tensor  # (N+1,): training accuracy at w_0 .. w_N

    @property
    def steps(self) -> int:
        return self.weights.shape[0] - 1

    @property
    def nbytes(self) -> int:
        """Memory of the recorded path: (N+1) d weights plus N M K coefficients."""
        return self.weights.numel() * self.weights.element_size() + self.coefficients.numel() * self.coefficients.element_size()


@torch.enable_grad()  # callers may sit inside no_grad
def train_path(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    step_size: float,
    loss=None,
    output: str = "logits",
    batch_size: int | None = None,
    seed: int = 0,
    zero_last: bool = True,
    progress=None,
) -> TrainingPath:
    """Train `model` in place by `steps` forward-Euler steps w <- w - eps grad L(w), recording every state.

    Full batch by default (the theorem's setting). With `batch_size`, each step draws a fresh random batch; the
    representation stays exact, with a_{i,s} = 0 for points outside step s's batch (and 1/|B| inside a mean loss).
    The model runs in eval mode throughout: the theorem needs yhat_w(x) to be a fixed per-sample function, so
    dropout and batch statistics are off; the caller's mode is restored. Only the data loss is differentiated:
    a model's regularization() (weight decay) would add a step not of the form sum_i J^T a and is ignored.
    `output` picks the represented function (FlatModel); `loss(yhat, y)` is written on it (default: cross-entropy,
    i.e. F.cross_entropy on logits, nll_of_probabilities on probabilities).
    `progress` is an optional advance() callable, called once per step.
    """
    if steps < 1 or step_size <= 0:
        raise UserError(f"kernel training needs steps >= 1 and step_size > 0, got steps={steps}, step_size={step_size}")
    was_training = model.training
    model.eval()
    if zero_last:
        zero_last_layer(model)
    flat = FlatModel(model, output)
    if loss is None:
        loss = F.cross_entropy if output == "logits" else nll_of_probabilities
    w = flat.flatten()
    x, y = x.to(device=w.device, dtype=w.dtype), y.to(w.device)
    m = x.shape[0]
    if batch_size is not None and not 1 <= batch_size <= m:
        raise UserError(f"kernel.batch_size must be in [1, {m}] (the number of training points), got {batch_size}")
    generator = torch.Generator().manual_seed(seed)

    weights = torch.empty(steps + 1, w.numel(), dtype=w.dtype, device=w.device)
    weights[0] = w
    out0 = flat(w, x).detach()
    coefficients = torch.zeros(steps, m, out0.shape[1], dtype=w.dtype, device=w.device)
    losses, accuracies = torch.empty(steps + 1), torch.empty(steps + 1)
    bias = out0[0].clone()
    for s in range(steps + 1):
        w = w.detach().requires_grad_(True)
        out = flat(w, x)
        with torch.no_grad():
            losses[s] = loss(out, y).item()
            accuracies[s] = (out.argmax(1) == y).double().mean().item()
        if s == steps:
            break
        batch = torch.arange(m) if batch_size is None else torch.randperm(m, generator=generator)[:batch_size]
        batch = batch.to(w.device)
        out_b = out[batch]
        (grad_out,) = torch.autograd.grad(loss(out_b, y[batch]), out_b, retain_graph=True)
        (grad_w,) = torch.autograd.grad(out_b, w, grad_out)  # = J^T dL/dyhat = grad_w L, the GD direction
        coefficients[s, batch] = -step_size * grad_out.detach()
        w = w.detach() - step_size * grad_w
        weights[s + 1] = w
        if progress is not None:
            progress()
    flat.load(weights[-1])
    model.train(was_training)
    return TrainingPath(
        flat=flat,
        weights=weights,
        coefficients=coefficients,
        train_x=x,
        train_y=y,
        step_size=float(step_size),
        bias=bias,
        initial_spread=(out0 - bias).abs().max().item(),
        losses=losses,
        accuracies=accuracies,
    )
