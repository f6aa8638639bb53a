"""Discrete path kernel (robust_cli/analysis/kernel.py) against Bell's Theorem 14.5, Lemma 14.4, Remarks 1 and 3.

Oracles: the network itself (the theorem says the kernel machine IS the network), torch.optim.SGD (the recorded
path is plain gradient descent), explicit autograd Jacobians (kernel values), the literal per-sample loop
(reference_predict), and closed forms of the representation (contributions sum to the output change).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust_cli.analysis.kernel import DiscretePathKernel, reference_predict
from robust_cli.analysis.training_path import FlatModel, gauss_legendre, nll_of_probabilities, train_path, zero_last_layer
from robust_cli.core.errors import UserError

DT = torch.float64


def gaussians(n_per_class, seed=0):
    """Bell's 2-D set, generated here: class A ~ N([1,4], I), class B ~ N([4,1], I)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[1.0, 4.0], [4.0, 1.0]], dtype=DT)
    y = torch.arange(2).repeat_interleave(n_per_class)
    return means[y] + torch.randn(len(y), 2, generator=g, dtype=DT), y


def net(inputs=2, hidden=16, classes=2, act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), act(), nn.Linear(hidden, classes)).to(DT)


@pytest.fixture(scope="module")
def relu_path():
    x, y = gaussians(100)
    return train_path(net(), x, y, steps=30, step_size=0.5, output="probabilities")


def queries(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 2.5 + 3 * torch.randn(n, 2, generator=g, dtype=DT)  # in- and out-of-distribution


# ------------------------------------------------------------------------------------------------ the trainer
def test_zero_last_layer_makes_the_initial_output_constant():
    model = zero_last_layer(net())
    x = queries(50)
    out = model(x)
    assert torch.equal(out, model[-1].bias.expand_as(out))
    path = train_path(net(), *gaussians(20), steps=2, step_size=0.1)
    assert path.initial_spread == 0.0 and torch.equal(path.bias, path.weights[0][-2:])


def test_recorded_path_is_plain_gradient_descent():
    """Same init, torch.optim.SGD on the full-batch loss: identical weights at every step."""
    x, y = gaussians(30)
    model = zero_last_layer(net())
    oracle = zero_last_layer(net())
    path = train_path(model, x, y, steps=5, step_size=0.3)
    opt = torch.optim.SGD(oracle.parameters(), lr=0.3)
    flat = FlatModel(oracle)
    for s in range(5):
        assert torch.allclose(flat.flatten(), path.weights[s], rtol=0, atol=1e-13)
        opt.zero_grad()
        F.cross_entropy(oracle(x), y).backward()
        opt.step()
    assert torch.allclose(flat.flatten(), path.weights[-1], rtol=0, atol=1e-13)
    # the model is left at w_N, in the mode it was in, with no .grad
    assert torch.equal(FlatModel(model).flatten(), path.weights[-1])
    assert model.training and all(p.grad is None for p in model.parameters())
    # a_{i,s} = -eps dL/dyhat_i: sum_i J^T a reproduces the step (checked through the kernel's v_s)
    steps = path.weights[1:] - path.weights[:-1]
    assert torch.allclose(DiscretePathKernel(path).directions, steps, rtol=0, atol=1e-14)


def test_probabilities_output_trains_like_cross_entropy():
    x, y = gaussians(30)
    a = train_path(net(), x, y, steps=4, step_size=0.5, output="logits")
    b = train_path(net(), x, y, steps=4, step_size=0.5, output="probabilities")
    assert torch.allclose(a.weights, b.weights, rtol=0, atol=1e-12)
    assert torch.allclose(a.losses, b.losses, atol=1e-12)
    p = torch.softmax(torch.randn(5, 3, dtype=DT), 1)
    yy = torch.tensor([0, 1, 2, 0, 1])
    assert torch.isclose(nll_of_probabilities(p, yy), F.nll_loss(p.log(), yy))


def test_user_errors():
    x, y = gaussians(5)
    with pytest.raises(UserError):
        train_path(net(), x, y, steps=0, step_size=0.1)
    with pytest.raises(UserError):
        train_path(net(), x, y, steps=1, step_size=0.1, batch_size=11)
    path = train_path(net(), x, y, steps=1, step_size=0.1)
    for bad in ({"variant": "nope"}, {"tolerance": 0.0}, {"quadrature_points": 0}):
        with pytest.raises(UserError):
            DiscretePathKernel(path, **bad)


# ------------------------------------------------------------------------------------------------ Theorem 14.5
def test_exact_on_the_2d_set(relu_path):
    """float64 + adaptive Gauss-Legendre: the kernel machine reproduces the network to < 1e-6 (here ~1e-12)."""
    kernel = DiscretePathKernel(relu_path, quadrature_points=4, tolerance=1e-10)
    x = queries(60)
    net_out = kernel.network_output(x)
    err = (kernel.predict(x) - net_out).abs().max().item()
    assert err < 1e-9 * max(1.0, net_out.abs().max().item())
    assert (net_out - relu_path.bias).abs().max() > 0.1  # the trained net is far from its constant start
    # the kernel sums (Figure 21) use the same adaptive pieces: they equal the summed per-point values
    probes = torch.tensor([[4.0, 15.0], [1.0, 4.0], [-6.0, -6.0]], dtype=DT)
    sums = kernel.kernel_sums(probes)
    assert torch.allclose(sums, kernel.values(probes).trace.sum(1), rtol=1e-10)
    assert torch.allclose(sums, DiscretePathKernel(relu_path, quadrature_points=8, tolerance=1e-10).kernel_sums(probes), rtol=1e-8)


def test_exact_on_a_small_image_net():
    """10 classes on (1, 8, 8) images, logits: relative error < 1e-4 (measured ~1e-12)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:140] / 16.0, dtype=DT).unsqueeze(1)
    y = torch.tensor(digits.target[:140])
    path = train_path(net(64, 32, 10), x[:120], y[:120], steps=8, step_size=0.5)
    kernel = DiscretePathKernel(path, quadrature_points=2, tolerance=1e-8)
    net_out = kernel.network_output(x[120:])
    err = (kernel.predict(x[120:]) - net_out).abs().max().item()
    assert err / net_out.abs().max().item() < 1e-4
    assert path.accuracies[-1] > path.accuracies[0]


def test_minibatch_extension_stays_exact():
    x, y = gaussians(40)
    path = train_path(net(), x, y, steps=12, step_size=0.5, batch_size=16, seed=3)
    on = (path.coefficients.abs().sum(2) > 0).sum(1)
    assert (on == 16).all()  # a_{i,s} = 0 outside step s's batch
    kernel = DiscretePathKernel(path, quadrature_points=4, tolerance=1e-10)
    q = queries(30)
    assert (kernel.predict(q) - kernel.network_output(q)).abs().max() < 1e-8


def test_error_falls_with_quadrature_points():
    """Smooth net (tanh): Gauss-Legendre converges fast; ReLU: the fixed rule converges slowly (kinks), and the
    adaptive bisection removes the kink error."""
    x, y = gaussians(60)
    smooth = train_path(net(act=nn.Tanh), x, y, steps=10, step_size=0.5)
    q = queries(30)
    exact = DiscretePathKernel(smooth).network_output(q)
    errors = [(DiscretePathKernel(smooth, quadrature_points=p).predict(q) - exact).abs().max().item() for p in (1, 2, 3, 4, 6)]
    assert errors[0] > 1e-3  # measured: 5e-3, 2e-5, 1e-6, 2e-8, 2e-12
    assert all(b < 0.1 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10
    relu = train_path(net(), x, y, steps=6, step_size=1.0)
    exact = DiscretePathKernel(relu).network_output(q)
    coarse, fine = ((DiscretePathKernel(relu, quadrature_points=p).predict(q) - exact).abs().max().item() for p in (2, 64))
    adaptive = (DiscretePathKernel(relu, quadrature_points=2, tolerance=1e-10).predict(q) - exact).abs().max().item()
    assert fine < coarse and adaptive < 1e-9 < coarse


def test_error_falls_with_step_size():
    """Remark 3: the tangent variant (query side at w_s, no t-integral) has error O(eps) at a fixed horizon."""
    x, y = gaussians(60)
    q = queries(30)
    errors = []
    for eps in (0.4, 0.2, 0.1):
        path = train_path(net(act=nn.Tanh), x, y, steps=int(round(2.4 / eps)), step_size=eps)
        kernel = DiscretePathKernel(path, variant="tangent")
        errors.append((kernel.predict(q) - kernel.network_output(q)).abs().max().item())
    assert errors[0] > 1e-5
    for a, b in zip(errors, errors[1:]):
        assert 0.3 < b / a < 0.7, errors  # halves with eps: first order


@pytest.mark.parametrize("output", ["logits", "probabilities"])
def test_matches_the_per_sample_loop(relu_path, output):
    """Second implementation: explicit per-sample Jacobians by autograd, explicit kernel values, contracted."""
    x, y = gaussians(15)
    path = train_path(net(classes=3, hidden=8), x, torch.arange(30) % 3, steps=4, step_size=0.5, output=output)
    q = queries(5)
    fast = DiscretePathKernel(path, quadrature_points=3, variant="continuous").predict(q)
    slow = reference_predict(path, q, quadrature_points=3)
    assert torch.allclose(fast, slow, rtol=0, atol=1e-12)


def test_kernel_values_against_explicit_jacobians():
    x, y = gaussians(10)
    path = train_path(net(classes=3, hidden=6), x, torch.arange(20) % 3, steps=3, step_size=0.5)
    q = queries(3)
    kernel = DiscretePathKernel(path, quadrature_points=2, variant="continuous")
    got = kernel.values(q)
    f = path.flat
    nodes, weights = gauss_legendre(2)
    expected = torch.zeros_like(got.values)
    for s in range(path.steps):
        w0, w1 = path.weights[s], path.weights[s + 1]
        train_jac = torch.autograd.functional.jacobian(lambda w: f(w, path.train_x), w0)  # (M, K, d)
        query_jac = sum(o * torch.autograd.functional.jacobian(lambda w: f(w, q), w0 + t * (w1 - w0)) for t, o in zip(nodes, weights))  # (Q, K, d)
        expected += torch.einsum("qkd,icd->qikc", query_jac, train_jac)
    assert torch.allclose(got.values, expected, rtol=1e-10, atol=1e-12)
    # representation: contributions sum over training points to yhat(x) - b; the trace is the scalar kernel
    assert torch.allclose(got.contributions.sum(1) + path.bias, kernel.predict(q), atol=1e-12)
    assert torch.allclose(got.trace.sum(1), kernel.kernel_sums(q), atol=1e-10)


def test_cross_class_terms_are_needed():
    """Appendix 17.4: with softmax outputs the classes couple; keeping only K[k, k] (17.5's form) is not exact."""
    path = train_path(net(), *gaussians(100), steps=1, step_size=0.5, output="probabilities")
    kernel = DiscretePathKernel(path, quadrature_points=4, tolerance=1e-10)
    q = queries(6)
    values, exact = kernel.values(q), kernel.network_output(q)
    diag_only = torch.einsum("qikk,ik->qk", values.values, path.coefficients[0]) + path.bias
    assert (values.contributions.sum(1) + path.bias - exact).abs().max() < 1e-9
    assert (diag_only - exact).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ Lemma 14.4, Remark 1
@pytest.mark.parametrize("variant", ["dpk", "tangent"])
def test_symmetric_variants_give_a_psd_kernel_matrix(relu_path, variant):
    x = torch.cat([queries(5), relu_path.train_x[:2]])  # includes training points (w_s(t, x) = w_s)
    gram = DiscretePathKernel(relu_path, quadrature_points=4, variant=variant).matrix(x)
    m = gram.reshape(14, 14)
    scale = m.abs().max()
    assert (m - m.T).abs().max() <= 1e-12 * scale
    assert torch.linalg.eigvalsh(m).min() >= -1e-10 * scale


def test_continuous_variant_is_exact_everywhere_but_not_symmetric(relu_path):
    on_train = relu_path.train_x[:10]
    dpk = DiscretePathKernel(relu_path, quadrature_points=4, variant="dpk", tolerance=1e-10)
    cont = DiscretePathKernel(relu_path, quadrature_points=4, variant="continuous", tolerance=1e-10)
    exact = dpk.network_output(on_train)
    assert (cont.predict(on_train) - exact).abs().max() < 1e-9
    assert (dpk.predict(on_train) - exact).abs().max() > 1e-6  # the DPK's jump at training points (Remark 1)
    m = cont.matrix(queries(4)).reshape(8, 8)
    assert (m - m.T).abs().max() > 1e-6 * m.abs().max()


def test_path_memory_is_reported(relu_path):
    d = relu_path.weights.shape[1]
    assert relu_path.nbytes == (31 * d + 30 * 200 * 2) * 8


def test_selected_class_rows_match_the_full_kernel(relu_path):
    """values/kernel_sums/train_self_values restricted to one class per query equal the matching slices."""
    x, y = gaussians(12)
    path = train_path(net(classes=3, hidden=8), x, torch.arange(24) % 3, steps=3, step_size=0.5)
    q = queries(4)
    classes = torch.tensor([2, 0, 1, 2])
    for tol in (None, 1e-10):
        kernel = DiscretePathKernel(path, quadrature_points=3, tolerance=tol)
        full, part = kernel.values(q), kernel.values(q, classes=classes)
        rows = torch.arange(4)
        assert torch.allclose(part.values[:, :, 0], full.values[rows, :, classes], atol=1e-13)
        assert torch.allclose(part.contributions[:, :, 0], full.contributions[rows, :, classes], atol=1e-13)
        assert torch.allclose(part.diagonal[:, :, 0], full.diagonal[rows, :, classes], atol=1e-13)
        assert torch.allclose(kernel.kernel_sums(q, classes), part.diagonal.sum((1, 2)), atol=1e-11)
        assert torch.allclose(kernel.kernel_sums(q), full.trace.sum(1), atol=1e-11)
    per_class = sum(kernel.train_self_values(c) for c in range(3))
    assert torch.allclose(per_class, kernel.train_self_values(), rtol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda w: path.flat(w, path.train_x[:2]), path.weights[0])
    first = DiscretePathKernel(train_path(net(classes=3, hidden=8), x, torch.arange(24) % 3, steps=1, step_size=0.5))
    assert torch.allclose(first.train_self_values(1)[:2], jac[:, 1].square().sum(-1), rtol=1e-12)
