"""Small pieces shared by the defenses: input gradients, per-example norms, frozen BatchNorm statistics."""

import functools
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from robust_cli.core.errors import UserError


def per_example_norm(t, p=2):
    """||t_i||_p for each example of a batch (all non-batch dimensions flattened)."""
    return t.flatten(1).norm(p=p, dim=1)


def input_gradient(model, x, y, create_graph, keep_graph=True):
    """Forward the clean batch and return (logits, per-example losses, per-example input gradients).

    The gradient is that of the *sum* of the per-example losses, so row i is grad_x ell(x_i, y_i), not
    the 1/B-scaled gradient of the batch mean. With create_graph=True it can be differentiated again
    (double backprop); otherwise it is detached. keep_graph=False frees the forward graph (only the
    direction is wanted; the returned logits and losses are then not differentiable).
    """
    x = x.detach().requires_grad_(True)
    logits = model(x)
    losses = F.cross_entropy(logits, y, reduction="none")
    # retain_graph: the caller usually still backpropagates the losses themselves to the parameters
    (grad,) = torch.autograd.grad(losses.sum(), x, create_graph=create_graph, retain_graph=keep_graph or create_graph)
    if not keep_graph:
        logits, losses = logits.detach(), losses.detach()
    return logits, losses, grad


@contextmanager
def frozen_buffers(model):
    """Run the block on copies of every buffer (BatchNorm running mean/var, num_batches_tracked).

    Extra forward passes that only serve a derivative (a finite-difference point, a forward-mode JVP, an
    attack generated in train mode) must not count as extra batches in the running statistics: the
    statistics should see each training batch once, as under plain training. The originals are swapped
    back untouched rather than copied into: an in-place write would bump their version counters, and the
    main forward's graph saved them for its backward pass.
    """
    originals = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items() if buffer is not None]
    for module, name, buffer in originals:
        module._buffers[name] = buffer.clone()
    try:
        yield
    finally:
        for module, name, buffer in originals:
            module._buffers[name] = buffer


def jacobian_vector_product(model, x, direction, update_stats=False):
    """(model(x), J_model(x) @ direction) in one forward pass of forward-mode AD.

    Uses torch.autograd.forward_ad (dual numbers) rather than torch.func.jvp: torch.func refuses a model
    whose BatchNorm updates its running statistics in train mode (an in-place write to a captured buffer).
    Both outputs stay differentiable w.r.t. the parameters by ordinary backprop. BatchNorm layers run as
    plain tensor arithmetic during this pass (`_composite_batch_norm`): the tangent that PyTorch's fused
    batch_norm kernel produces in train mode has a wrong derivative w.r.t. the layer input (checked against
    finite differences in tests/test_defenses.py), which would corrupt every parameter gradient below it.
    update_stats=True lets the pass count as the step's training forward (running statistics updated once).
    """
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in batch_norms:  # an instance attribute shadows the class's forward for this pass only
        bn.forward = functools.partial(_composite_batch_norm, bn, update_stats=update_stats)
    try:
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x.detach(), direction.detach()))
            primal, tangent = fwAD.unpack_dual(out)
    finally:
        for bn in batch_norms:
            del bn.forward
    return primal, tangent


def _composite_batch_norm(bn, x, update_stats=False):
    """BatchNorm forward from elementary ops: batch statistics in train mode, running ones in eval."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if bn.training or not bn.track_running_stats:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        if update_stats and bn.training and bn.track_running_stats:
            with torch.no_grad():  # what the fused kernel does: unbiased variance, momentum or cumulative average
                count = x.numel() // x.shape[1]
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                bn.running_mean.lerp_(fwAD.unpack_dual(mean).primal, momentum)
                bn.running_var.lerp_(fwAD.unpack_dual(var).primal * count / max(count - 1, 1), momentum)
    else:
        mean, var = bn.running_mean, bn.running_var
    out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out


def detached(**values):
    """Stats for train_log.csv: 0-dim tensors cut from the graph."""
    return {name: value.detach() for name, value in values.items()}


def check_nonnegative(name, value, positive=False):
    """A defense parameter as a float, or a one-line UserError naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"defense.{name} must be a number, got {value!r}") from None
    if number < 0 or (positive and number == 0) or number != number:
        bound = "> 0" if positive else ">= 0"
        raise UserError(f"defense.{name} must be {bound}, got {value!r}: set defense.{name}=<value {bound}>")
    return number


def check_in_box(x, bounds, fix):
    """A one-line UserError when the data leave the box a defense clips to (e.g. gaussians2d with [0, 1])."""
    if bounds is not None and (x.min() < bounds[0] or x.max() > bounds[1]):
        raise UserError(f"the training data are not in the box {list(bounds)} this defense clips to: set {fix} for unbounded data (e.g. dataset=gaussians2d)")
