"""Attacks: budgets and box, closed forms on linear models, targets, modes/buffers/grad hygiene, determinism,
restarts, and one regression test per bug class in DESIGN.md's "Lessons from the peers"."""

import hashlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust_cli.attacks import BIM, CW, FGM, FGSM, JSMA, LBFGS, MIFGSM, PGD, RFGSM, DeepFool, Gradient, Noise, norms
from robust_cli.core.errors import UserError
from robust_cli.evaluation import evaluate as ev


# ------------------------------------------------------------------------------------------- models and data
def digits(n=120):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target[:n])


@pytest.fixture(scope="module")
def trained_mlp():
    """A small MLP trained on sklearn's digits (bundled, offline) for ~1 s: most test inputs correctly classified."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x[300:]), y[300:]).backward()
        opt.step()
    model.eval()
    return model, x[:300], y[:300]


def tiny_cnn(bn=True):
    torch.manual_seed(1)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(4 * 64, 10)]
    return nn.Sequential(*layers)


def tiny_mlp():
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 10))


class Linear(nn.Module):
    """Softmax regression: logits = W x + b, where distances to decision boundaries are closed form."""

    def __init__(self, dim=20, classes=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(classes, dim, generator=g))
        self.b = nn.Parameter(torch.randn(classes, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


def hyperplane_distance(model, x, y, target=None):
    """Untargeted: min_k |f_k - f_y| / ||w_k - w_y|| (the class-y region is a convex polyhedron). Two classes
    targeted: the distance to the one boundary."""
    with torch.no_grad():
        f = model(x)
        fy = f.gather(1, y[:, None])
        wy = model.w[y]
        d = (f - fy).abs() / (model.w[None] - wy[:, None]).norm(dim=2).clamp_min(1e-12)
        d.scatter_(1, y[:, None], float("inf"))
        return d.amin(dim=1)


BUDGETED = [
    FGSM(),
    FGM(norm="l2"),
    FGM(norm="linf"),
    Gradient(),
    BIM(steps=5),
    PGD(norm="linf", steps=5),
    PGD(norm="l2", steps=5),
    PGD(norm="linf", steps=3, restarts=3),
    MIFGSM(norm="linf", steps=5),
    MIFGSM(norm="l2", steps=5),
    RFGSM(),
    Noise(norm="linf"),
    Noise(norm="l2", distribution="gaussian"),
]
MINIMAL = [DeepFool(steps=10), CW(steps=20, binary_search_steps=2), LBFGS(max_iter=10), JSMA(gamma=0.1)]


def ids(attacks):
    return [f"{a.name}-{a.norm}" + ("-restarts" if getattr(a, "restarts", 1) > 1 else "") for a in attacks]


# ------------------------------------------------------------------------------------------- budget and box
@pytest.mark.parametrize("attack", BUDGETED, ids=ids(BUDGETED))
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, "per-example"])
def test_budget_and_box_respected(trained_mlp, attack, eps):
    model, x, y = trained_mlp
    x = x[:40].clone()
    x[:, :, 0, 0] = 1.0  # pixels on both box edges
    if eps == "per-example":
        eps = torch.linspace(0, 0.5, len(x)) if attack.norm == "linf" else torch.linspace(0, 3, len(x))
    elif attack.norm == "l2":
        eps = eps * 8
    torch.manual_seed(0)
    x_adv = attack(model, x, y[:40], eps)
    limit = eps if isinstance(eps, torch.Tensor) else torch.full((len(x),), float(eps))
    size = norms.lp_norm(x_adv - x, attack.norm)
    assert (size <= limit + 1e-6).all(), f"{attack.name}: {(size - limit).max().item()} over budget"
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    if not isinstance(eps, torch.Tensor) and eps == 0:
        assert torch.equal(x_adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_inside_ball_and_box(norm):
    torch.manual_seed(0)
    x = torch.rand(500, 1, 8, 8).round()  # only 0s and 1s: every coordinate sits on the box edge
    eps = torch.linspace(0, 2, 500)
    start = norms.random_start(x, eps, norm)
    assert (norms.lp_norm(start - x, norm) <= eps + 1e-6).all()
    assert start.min() >= 0 and start.max() <= 1
    free = norms.random_start(torch.full((2000, 64), 0.5), 0.1, norm, bounds=None)
    size = norms.lp_norm(free - 0.5, norm)
    if norm == "linf":  # uniform in the cube: coordinates fill [-eps, eps]
        assert size.max() <= 0.1 + 1e-7 and (free - 0.5).abs().mean() == pytest.approx(0.05, rel=0.02)
    else:  # uniform in the 64-ball: P(radius <= r eps) = r^64, so nearly all radii are near eps
        assert size.max() <= 0.1 + 1e-6 and (size / 0.1).median() == pytest.approx(0.5 ** (1 / 64), abs=0.01)


def test_normalize_and_project_per_example():
    g = torch.randn(3, 2, 5)
    g[1] *= 1000.0
    g[2] = 0.0
    assert torch.equal(norms.normalize(g, "linf"), g.sign())
    unit = norms.normalize(g, "l2")
    assert torch.allclose(unit[:2].flatten(1).norm(dim=1), torch.ones(2)) and torch.equal(unit[2], torch.zeros(2, 5))
    assert torch.allclose(unit[0], g[0] / g[0].norm())  # a large neighbour does not change an example's direction
    d = torch.randn(4, 10)
    assert torch.equal(norms.project(d, 0.3, "linf"), d.clamp(-0.3, 0.3))
    eps = torch.tensor([0.1, 100.0, 0.5, 0.0])
    p = norms.project(d, eps, "l2")
    assert torch.allclose(p.norm(dim=1), torch.minimum(d.norm(dim=1), eps), atol=1e-6)
    assert torch.equal(p[1], d[1])  # inside the ball: unchanged
    with pytest.raises(UserError):
        norms.normalize(g, "l3")


# ------------------------------------------------------------------------------------------- closed forms
def test_single_step_directions_closed_form():
    """FGSM = eps sign(g), FGM = eps g/||g||_2 (Oberman's dual-norm direction), Gradient = eps g/||g||_inf."""
    model = Linear()
    x, y = torch.randn(6, 20), torch.arange(6) % 4
    x_ = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x_), y, reduction="sum"), x_)
    eps = 0.3
    assert torch.allclose(FGSM(bounds=None)(model, x, y, eps) - x, eps * g.sign(), atol=1e-6)
    assert torch.allclose(FGM(bounds=None)(model, x, y, eps) - x, eps * g / g.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(Gradient(bounds=None)(model, x, y, eps) - x, eps * g / g.abs().amax(dim=1, keepdim=True), atol=1e-6)
    # targeted FGSM descends the target's loss (Kurakin): x - eps sign(grad CE(target))
    t = (y + 1) % 4
    x_ = x.clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(F.cross_entropy(model(x_), t, reduction="sum"), x_)
    assert torch.allclose(FGSM(bounds=None, targeted="next")(model, x, y, eps) - x, -eps * gt.sign(), atol=1e-6)


def test_margin_loss_gradient_closed_form():
    """loss=margin ascends max_{i != y} Z_i - Z_y: on a linear model its input gradient is w_k - w_y (k the runner-up)."""
    model = Linear()
    x, y = torch.randn(6, 20), torch.arange(6) % 4
    with torch.no_grad():
        runner_up = model(x).scatter(1, y[:, None], float("-inf")).argmax(dim=1)
    expected = model.w[runner_up] - model.w[y]
    got = PGD(loss="margin").loss_gradient(model, x, y, None)
    assert torch.allclose(got, expected.detach(), atol=1e-6)
    t = (y + 1) % 4  # targeted: Z_t - max_{i != t} Z_i
    with torch.no_grad():
        best_other = model(x).scatter(1, t[:, None], float("-inf")).argmax(dim=1)
    assert torch.allclose(PGD(loss="margin").loss_gradient(model, x, y, t), (model.w[t] - model.w[best_other]).detach(), atol=1e-6)
    with pytest.raises(UserError):
        FGSM(loss="hinge")


def test_rfgsm_splits_eps_into_random_and_gradient_steps():
    """alpha = eps/2 then a step of eps - alpha: without a box every coordinate moves by -eps, 0 or +eps."""
    model = Linear()
    x, y = torch.randn(8, 20), torch.arange(8) % 4
    torch.manual_seed(0)
    delta = RFGSM(bounds=None)(model, x, y, 0.2) - x
    values = torch.unique(torch.round(delta / 0.1))
    assert set(values.tolist()) <= {-2.0, 0.0, 2.0} and {-2.0, 2.0} <= set(values.tolist())


def test_noise_has_exactly_the_budget():
    model = Linear()
    x, y = torch.randn(50, 20), torch.zeros(50, dtype=torch.long)
    for norm in ("linf", "l2"):
        for dist in ("uniform", "gaussian"):
            d = Noise(norm=norm, distribution=dist, bounds=None)(model, x, y, 0.7) - x
            assert torch.allclose(norms.lp_norm(d, norm), torch.full((50,), 0.7), atol=1e-5)


def test_deepfool_equals_hyperplane_distance_on_linear_model():
    """Analytic check: one DeepFool step lands on the nearest hyperplane; the overshoot scales it (not a no-op)."""
    model = Linear(dim=30, classes=5)
    torch.manual_seed(3)
    x = torch.randn(64, 30)
    y = model(x).argmax(dim=1)  # correctly classified by construction
    d = hyperplane_distance(model, x, y)
    for overshoot in (0.0, 0.02, 0.2):
        x_adv = DeepFool(overshoot=overshoot, bounds=None)(model, x, y)
        dist = (x_adv - x).norm(dim=1)
        ratio = dist / ((1 + overshoot) * d)
        assert (ratio - 1).abs().max() < 0.01, f"overshoot {overshoot}: worst ratio {ratio.max().item():.4f}"
        assert (model(x_adv).argmax(dim=1) != y).all()


def test_cw_is_never_farther_than_deepfool_and_usually_closer(trained_mlp):
    """Issue 15: the default CW (warm-started from DeepFool) finds, per example, a distance <= DeepFool's * 1.01."""
    model, x, y = trained_mlp
    ok = model(x).argmax(1) == y
    x, y = x[ok][:120], y[ok][:120]
    torch.manual_seed(0)
    deepfool = DeepFool()(model, x, y)
    cw = CW(steps=100, binary_search_steps=5)(model, x, y)
    fooled_df, fooled_cw = model(deepfool).argmax(1) != y, model(cw).argmax(1) != y
    assert (fooled_cw | ~fooled_df).all()  # CW succeeds wherever DeepFool does
    d_df = torch.where(fooled_df, (deepfool - x).flatten(1).norm(dim=1), torch.tensor(float("inf")))
    d_cw = torch.where(fooled_cw, (cw - x).flatten(1).norm(dim=1), torch.tensor(float("inf")))
    assert float((d_cw <= d_df * 1.01).double().mean()) >= 0.99
    cold = CW(steps=100, binary_search_steps=5, warm_start=False)(model, x, y)  # the authors' start, for contrast
    d_cold = torch.where(model(cold).argmax(1) != y, (cold - x).flatten(1).norm(dim=1), torch.tensor(float("inf")))
    assert (d_cw <= d_cold * (1 + 1e-6)).float().mean() > (d_cold <= d_df * 1.01).float().mean()


def test_minimal_attacks_never_beat_the_closed_form():
    """No attack can succeed closer than the exact distance; CW (binary search over c) must come close to it
    instead of returning the unchanged input."""
    model = Linear(dim=20, classes=4, seed=1)
    torch.manual_seed(4)
    x = torch.randn(32, 20)
    y = model(x).argmax(dim=1)
    d = hyperplane_distance(model, x, y)
    torch.manual_seed(0)
    cw = CW(c=0.1, steps=100, lr=0.05, binary_search_steps=6, bounds=None, warm_start=False)(model, x, y)  # the search alone
    dist = (cw - x).norm(dim=1)
    ok = model(cw).argmax(dim=1) != y
    assert ok.all(), "CW failed on a linear model"
    assert (dist >= d * (1 - 1e-4)).all()
    assert (dist / d).median() < 1.05, f"CW median ratio to the exact distance {(dist / d).median().item():.3f}"
    for attack in (DeepFool(bounds=None), LBFGS(c_search="minimal", targeted="next", bounds=None, search_steps=6, max_iter=30)):
        adv = attack(model, x, y)
        fooled = model(adv).argmax(dim=1) != y
        assert ((adv - x).norm(dim=1)[fooled] >= d[fooled] * (1 - 1e-4)).all(), attack.name


def test_lbfgs_two_class_minimal_is_near_exact_and_fixed_small_c_is_deeper():
    model = Linear(dim=20, classes=2, seed=2)
    torch.manual_seed(5)
    x = torch.randn(8, 20) * 0.3
    y = model(x).argmax(dim=1)
    d = hyperplane_distance(model, x, y)
    minimal = LBFGS(c_search="minimal", targeted="next", bounds=None, search_steps=12, max_iter=60)(model, x, y)
    dist = (minimal - x).norm(dim=1)
    assert (model(minimal).argmax(dim=1) == 1 - y).all()
    assert (dist >= d * (1 - 1e-4)).all() and (dist - d).max() < 0.02 * d.max()  # just across the boundary
    deep = LBFGS(c_search="fixed", c=0.01, targeted="next", bounds=None)(model, x, y)
    assert ((deep - x).norm(dim=1) > dist).all()  # a small weight on ||r|| pushes deeper into the target class
    szegedy = LBFGS(c_search="szegedy", c=0.01, targeted="next", bounds=None)(model, x, y)
    assert torch.allclose(szegedy, deep)  # the smallest c of the line search already succeeds


# ------------------------------------------------------------------------------------------- targets
def test_choose_target_modes(trained_mlp):
    model, x, y = trained_mlp
    logits = model(x).detach()
    assert torch.equal(PGD(targeted="next").choose_target(model, x, y), (y + 1) % 10)
    assert torch.equal(PGD(targeted="least_likely").choose_target(model, x, y), logits.argmin(dim=1))
    torch.manual_seed(0)
    t = PGD(targeted="random").choose_target(model, x, y)
    assert (t != y).all() and len(t.unique()) == 10
    assert PGD().choose_target(model, x, y) is None
    for bad in (True, "yes", "previous"):
        with pytest.raises(UserError):
            PGD(targeted=bad)


@pytest.mark.parametrize(
    "attack",
    [
        PGD(targeted="next", steps=20),
        BIM(targeted="next", steps=20, step_size=0.04),
        MIFGSM(targeted="next", steps=20),
        CW(targeted="next", c=1, lr=0.1, steps=150, binary_search_steps=2),
        LBFGS(targeted="next", max_iter=50),
        JSMA(targeted="next", gamma=0.6),
    ],
    ids=lambda a: a.name,
)
def test_targeted_success_hits_the_target(trained_mlp, attack):
    """Regression (targeted modes that silently attack untargeted): the returned points are classified as the
    target, far more often than an untargeted attack lands there by chance."""
    model, x, y = trained_mlp
    x, y = x[:60], y[:60]
    target = (y + 1) % 10
    kwargs = {} if attack.kind == "minimal" else {"eps": 0.4}
    torch.manual_seed(0)
    pred = model(attack(model, x, y, **kwargs)).argmax(dim=1)
    assert (pred == target).float().mean() >= 0.9
    if attack.kind == "budgeted":
        untargeted = PGD(steps=20)(model, x, y, 0.4)
        assert (model(untargeted).argmax(dim=1) == target).float().mean() < 0.6


# ------------------------------------------------------------------------------------------- hygiene
def _buffer_hash(model):
    h = hashlib.sha256()
    for name, b in model.named_buffers():
        h.update(name.encode() + b.detach().cpu().numpy().tobytes())
    return h.hexdigest()


ALL = BUDGETED + MINIMAL


@pytest.mark.parametrize("make", [tiny_cnn, tiny_mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("attack", ALL, ids=ids(ALL))
def test_modes_buffers_and_grads_untouched(make, attack):
    """Every attack on a tiny CNN and MLP (with BatchNorm and dropout) on CPU: the caller's per-module train/eval
    flags come back, BatchNorm buffers are unchanged, and no parameter gets a .grad."""
    model = make()
    model.train()
    model[2 if make is tiny_mlp else 1].eval()  # mixed modes: the caller froze one BatchNorm layer
    modes = [m.training for m in model.modules()]
    before = _buffer_hash(model)
    x, y = digits(12)
    kwargs = {} if attack.kind == "minimal" else {"eps": 0.1 if attack.norm == "linf" else 1.0}
    torch.manual_seed(0)
    x_adv = attack(model, x, y, **kwargs)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1 and not x_adv.requires_grad
    assert [m.training for m in model.modules()] == modes
    assert _buffer_hash(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_keep_mode_attacks_in_the_callers_mode():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(self.training)
            return x

    model = nn.Sequential(Probe(), nn.Flatten(), nn.Linear(64, 10)).train()
    x, y = digits(4)
    PGD(steps=2, model_mode="keep")(model, x, y, 0.1)
    assert seen and all(seen)
    seen.clear()
    PGD(steps=2)(model, x, y, 0.1)
    assert seen and not any(seen) and model.training


def test_determinism_by_seed(trained_mlp):
    model, x, y = trained_mlp
    x, y = x[:50], y[:50]
    for attack in (PGD(steps=3), PGD(norm="l2", steps=3), RFGSM(), Noise(), PGD(steps=2, targeted="random")):
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(attack(model, x, y, 0.2))
        assert torch.equal(runs[0], runs[1]), attack.name
        assert not torch.equal(runs[0], runs[2]), attack.name


def test_repeated_calls_keep_no_state(trained_mlp):
    """Regression (memory growing with calls or batch sizes): an attack object holds only its parameters."""
    model, x, y = trained_mlp
    for attack in (PGD(steps=2, restarts=2), CW(steps=5, binary_search_steps=1), DeepFool(steps=3)):
        state = dict(vars(attack))
        for n in (7, 50, 13):
            attack(model, x[:n], y[:n], *([0.1] if attack.kind == "budgeted" else []))
        assert vars(attack) == state


# ------------------------------------------------------------------------------------------- restarts, momentum
def test_restarts_keep_each_examples_worst_case():
    """Regression (restarts keeping the batch-average best): with steps=0 PGD returns its random starts, so the
    result must be, per example, the adversarial start if any, else the start of highest loss."""
    model = Linear(dim=10, classes=3, seed=3)
    x = torch.randn(40, 10)
    y = model(x).argmax(dim=1)
    restarts, eps = 6, 1.5
    torch.manual_seed(7)
    got = PGD(steps=0, restarts=restarts, bounds=None)(model, x, y, eps)
    torch.manual_seed(7)
    starts = torch.stack([norms.random_start(x, eps, "linf", bounds=None) for _ in range(restarts)])
    with torch.no_grad():
        logits = model(starts.flatten(0, 1)).view(restarts, len(x), -1)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(restarts), reduction="none").view(restarts, len(x))
        fooled = logits.argmax(dim=2) != y
    key = fooled.double() * 1e6 + loss.double()  # adversarial first, then loss
    expected = starts[key.argmax(dim=0), torch.arange(len(x))]
    assert torch.equal(got, expected)
    assert 0 < fooled.any(dim=0).float().mean() < 1 and (key.argmax(dim=0) != key.argmax(dim=0)[0]).any()


def test_mifgsm_normalises_per_example():
    """Regression (momentum normalised over the wrong dimensions): a batch gives the same result as its examples
    attacked one by one, even when one example's gradient is 1000x larger."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn(bn=False).eval()

        def forward(self, x):
            scale = torch.ones(len(x), 1)
            scale[0] = 1000.0
            return self.net(x) * scale if len(x) > 1 else self.net(x)

    model = Scaled()
    x, y = digits(3)
    batch = MIFGSM(steps=5)(model, x, y, 0.2)
    alone = torch.cat([MIFGSM(steps=5)(model.net, x[i : i + 1], y[i : i + 1], 0.2) for i in range(3)])
    assert torch.equal(batch[1:], alone[1:])
    # and the L1 normalisation matters: without it (mu=1) the first step's gradient would dominate the sum
    assert MIFGSM(steps=5).ascent_direction(torch.full((1, 4), 2.0), None)[1].abs().sum() == pytest.approx(1.0)


def test_bim_step_rule_and_pgd_default_step():
    assert BIM().num_steps(0.3) == math.ceil(min(255 * 0.3 + 4, 1.25 * 255 * 0.3))
    assert BIM().num_steps(8 / 255) == 10
    assert PGD(steps=40).default_step_size(0.3, 40) == pytest.approx(2.5 * 0.3 / 40)


# ------------------------------------------------------------------------------------------- evaluation
def test_curve_counts_misclassified_as_errors_and_reruns_the_model(trained_mlp):
    model, x, y = trained_mlp
    clean_pred = ev.predict(model, x)
    assert (clean_pred != y).any(), "need some misclassified inputs for this test"
    (zero, mid) = ev.accuracy_curve(model, PGD(steps=5), x, y, [0.0, 0.1], clean_pred, batch_size=64)
    row0 = ev.curve_row(PGD(), 0.0, y, clean_pred, zero.pred, zero.success, ev.perturbation_sizes(x, zero.x_adv), 0)
    assert row0["robust_accuracy"] == row0["clean_accuracy"] and torch.equal(zero.x_adv, x)
    assert torch.equal(mid.pred, model(mid.x_adv).argmax(dim=1))  # success re-computed on the returned batch
    # an "attack" that repairs misclassified inputs still cannot raise robust accuracy above clean accuracy
    repaired = ev.curve_row(PGD(), 0.1, y, clean_pred, y.clone(), torch.zeros_like(y, dtype=torch.bool), ev.perturbation_sizes(x, x), 0)
    assert repaired["robust_accuracy"] == pytest.approx((clean_pred == y).double().mean().item())


def test_minimal_distances_zero_for_misclassified_inf_for_failures():
    y = torch.tensor([0, 1, 2, 3])
    clean_pred = torch.tensor([0, 0, 2, 3])  # example 1 misclassified
    success = torch.tensor([True, False, False, True])  # example 2 failed (and example 1 "failed" too)
    sizes = {k: torch.tensor([0.5, 0.7, 0.9, 0.3], dtype=torch.float64) for k in ev.SIZE_COLUMNS}
    d = ev.minimal_distances(y, clean_pred, success, sizes)
    assert d["l2"].tolist() == [0.5, 0.0, math.inf, 0.3]
    s = ev.distance_summary(d["l2"], y, clean_pred)
    assert s["failures"] == 1 and s["mean_over_successes"] == pytest.approx(0.4)
    assert s["median"] == pytest.approx(0.3)  # torch's lower median of [0, 0.3, 0.5, inf]


def test_binary_search_finds_the_exact_l2_distance():
    """Two classes, linear: FGM-L2 steps along the normal, so the smallest successful eps is the distance."""
    model = Linear(dim=15, classes=2, seed=4)
    torch.manual_seed(1)
    x = torch.randn(30, 15) * 0.5
    y = model(x).argmax(dim=1)
    d = hyperplane_distance(model, x, y)
    found, x_adv = ev.binary_search_eps(model, FGM(bounds=None), x, y, tol=1e-4, max_eps=float(d.max()) * 1.5 + 0.1)
    assert torch.allclose(found, d, atol=2e-4)
    assert (model(x_adv).argmax(dim=1) != y).all()
    never, _ = ev.binary_search_eps(model, FGM(bounds=None), x, y, tol=1e-3, max_eps=float(d.min()) * 0.5)
    assert torch.isinf(never).all()


def test_user_errors_are_one_line():
    for make in (
        lambda: PGD(norm="l3"),
        lambda: PGD(steps=-1),
        lambda: DeepFool(targeted="next"),
        lambda: LBFGS(targeted=False),
        lambda: LBFGS(c_search="max"),
        lambda: JSMA(bounds=None),
        lambda: CW(c=0),
        lambda: PGD(model_mode="train"),
    ):
        with pytest.raises(UserError) as info:
            make()
        assert "\n" not in str(info.value)
    model = Linear()
    with pytest.raises(UserError):
        PGD()(model, torch.zeros(2, 20), torch.zeros(2, dtype=torch.long), -0.1)
    with pytest.raises(UserError):
        PGD()(model, torch.zeros(2, 20), torch.zeros(2, dtype=torch.long))


def test_early_stop_ends_at_the_first_adversarial_iterate_closed_form():
    """Binary linear model f(x) = w.x + b from the interior of the box: each BIM step lowers the margin by exactly
    alpha * ||w||_1, so the first adversarial iterate is step k* = floor(m / (alpha ||w||_1)) + 1 and the stopped
    example sits at linf distance k* alpha from x, while the full run goes on to the budget."""
    torch.manual_seed(0)
    w = torch.randn(2, 30)
    lin = nn.Linear(30, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([w[0], -w[0]]) / 2)
        lin.bias.zero_()
    x = torch.full((1, 30), 0.5)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([0.4, -0.4]))
    y = torch.tensor([0])
    alpha, eps = 0.002, 0.2
    margin = (lin(x)[0, 0] - lin(x)[0, 1]).item()  # = w0.x + 0.8
    assert margin > 0
    per_step = alpha * w[0].abs().sum().item()  # margin drop per sign step (no clipping inside the box)
    k_star = math.floor(margin / per_step) + 1
    assert k_star * alpha < eps, "the budget must not bind for this test"
    stopped = BIM(steps=200, step_size=alpha, early_stop=True)(lin, x, y, eps)
    full = BIM(steps=200, step_size=alpha)(lin, x, y, eps)
    assert lin(stopped).argmax(1).item() == 1
    assert (stopped - x).abs().max().item() == pytest.approx(k_star * alpha, rel=1e-4)
    assert (full - x).abs().max().item() == pytest.approx(eps, rel=1e-4)
    # targeted and PGD too: the same rule, one flag
    t = BIM(steps=200, step_size=alpha, early_stop=True, targeted="next")(lin, x, y, eps)
    assert torch.allclose(t, stopped)
    with pytest.raises(UserError, match="early_stop"):
        PGD(early_stop="yes")
