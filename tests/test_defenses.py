"""Defenses: parameter gradients against float64 central finite differences, closed forms on linear models,
mode / gradient / BatchNorm hygiene, and every YAML instantiated and stepped once."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from robust_cli.attacks import FGM, FGSM, PGD
from robust_cli.core.errors import UserError
from robust_cli.core.models import TanhHead
from robust_cli.defenses import (
    MART,
    TRADES,
    AdversarialTraining,
    AdversarialWeightPerturbation,
    CrossEntropy,
    FastTangentProp,
    GaussianAugmentation,
    GradientNormPenalty,
    LipschitzPenalty,
    LossIBP,
    PredictionIBP,
    SimultaneousPropagation,
    TangentProp,
    Tulip,
)
from robust_cli.defenses import gradient as gradient_module
from robust_cli.defenses import invariance as invariance_module
from robust_cli.defenses.tangents import image_tangents

DEFENSE_DIR = Path(__file__).resolve().parents[1] / "robust_cli" / "conf" / "defense"


# ------------------------------------------------------------------------------------------- tiny models
def mlp_bn(features=6, classes=3, head=False):
    """2-layer MLP with BatchNorm (smooth activation so finite differences are clean), optional tanh head."""
    layers = [nn.Linear(features, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, classes)]
    if head:
        layers.append(TanhHead(classes, t=2.0))
    return nn.Sequential(*layers).double()


def conv_bn(classes=3):
    """Tiny conv net on 1x6x6 images, with BatchNorm2d."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Softplus(), nn.Flatten(), nn.Linear(2 * 6 * 6, classes)).double()


def batch(kind, n=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 1, 6, 6)
    x = (0.2 + 0.6 * torch.rand(shape, generator=g)).double()  # interior of the box: steps are not clipped
    y = torch.arange(n) % classes
    return x, y


def make_model(kind, seed=0, head=False):
    torch.manual_seed(seed)
    model = mlp_bn(head=head) if kind == "mlp" else conv_bn()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.train()


# ------------------------------------------------------------------------------------------- finite differences
def directional_check(defense, model, x, y, seed=0, h=1e-5):
    """Compare d loss / d theta . v (autograd) with the central difference (L(theta + h v) - L(theta - h v)) / 2h."""
    params = [p for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_at(shift):
        model.load_state_dict(state)  # same parameters and buffers every evaluation
        if shift is not None:
            with torch.no_grad():
                for p, d in zip(params, shift):
                    p.add_(d)
        torch.manual_seed(seed)  # same random draws (random start, noise, projections) every evaluation
        loss, _ = defense(model, x, y)
        return loss

    gen = torch.Generator().manual_seed(seed + 1)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    loss = loss_at(None)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    analytic = sum((g * d).sum() for g, d in zip(grads, direction) if g is not None).item()
    with torch.enable_grad():  # the defenses differentiate w.r.t. inputs inside
        plus = loss_at([h * d for d in direction]).item()
        minus = loss_at([-h * d for d in direction]).item()
    numeric = (plus - minus) / (2 * h)
    model.load_state_dict(state)
    return analytic, numeric


def assert_fd(defense, model, x, y, tol=1e-4):
    analytic, numeric = directional_check(defense, model, x, y)
    assert abs(analytic) > 1e-6, "degenerate check: zero directional derivative"
    assert abs(analytic - numeric) / abs(analytic) < tol, (analytic, numeric)


class Frozen:
    """Hold a quantity the defense treats as fixed at its value for the unperturbed parameters."""

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def __call__(self, *args, **kwargs):
        if self.value is None:
            self.value = self.fn(*args, **kwargs)
        return self.value


PENALTIES = [  # (id, defense factory, model kinds): the held-fixed quantities are none, or seeded
    ("none", lambda: CrossEntropy(), ("mlp",)),
    ("loss_ibp", lambda: LossIBP(beta=0.7), ("mlp", "conv")),
    ("prediction_ibp_random", lambda: PredictionIBP(beta=0.7, direction="random"), ("mlp", "conv")),
    ("tangent_prop", lambda: TangentProp(beta=0.7), ("conv",)),
    ("fast_tangent_prop", lambda: FastTangentProp(beta=0.7), ("conv",)),
    ("grad_norm_exact_linf", lambda: GradientNormPenalty(lam=0.7, norm="linf"), ("mlp", "conv")),
    ("grad_norm_exact_l2", lambda: GradientNormPenalty(lam=0.7, norm="l2"), ("mlp", "conv")),
    ("grad_norm_fd_linf", lambda: GradientNormPenalty(lam=0.7, norm="linf", method="fd", h=0.01), ("mlp",)),
    ("lipschitz_exact", lambda: LipschitzPenalty(lam=0.7), ("mlp", "conv")),
    ("lipschitz_hutchinson", lambda: LipschitzPenalty(lam=0.7, projections=3), ("mlp",)),
    ("lipschitz_pairs", lambda: LipschitzPenalty(lam=0.7, estimate="pairs"), ("mlp",)),
    ("simprop", lambda: SimultaneousPropagation(mu=0.7, gamma=5.0), ("mlp", "conv")),
    ("gaussian_aug", lambda: GaussianAugmentation(sigma=0.1), ("mlp",)),
    ("fgsm_at", lambda: AdversarialTraining(FGSM(model_mode="keep"), eps=0.05, mix=0.5), ("mlp", "conv")),
    ("pgd_at", lambda: AdversarialTraining(PGD(steps=3, model_mode="keep"), eps=0.05), ("mlp",)),
    ("pgd_at_eval_mode", lambda: AdversarialTraining(PGD(steps=3), eps=0.05), ("mlp",)),
]


@pytest.mark.parametrize("name,factory,kind", [(n, f, k) for n, f, kinds in PENALTIES for k in kinds], ids=lambda v: v if isinstance(v, str) else "")
def test_parameter_gradient_matches_finite_difference(name, factory, kind):
    x, y = batch(kind)
    assert_fd(factory(), make_model(kind), x, y)


def test_tulip_with_tanh_head_matches_finite_difference_with_the_step_held():
    x, y = batch("mlp")
    defense = Tulip(eps=0.05, lam_lip=0.7)
    defense.step = Frozen(defense.step)  # the adversarial point is data for the parameter gradient
    assert_fd(defense, make_model("mlp", head=True), x, y)


def test_l2_at_matches_finite_difference_with_the_attack_point_held():
    x, y = batch("mlp")
    defense = AdversarialTraining(FGM(norm="l2", model_mode="keep"), eps=0.3, mix=0.5)
    defense.attack = Frozen(defense.attack)
    assert_fd(defense, make_model("mlp"), x, y)


def test_prediction_ibp_gradient_direction_matches_finite_difference_with_the_direction_held(monkeypatch):
    x, y = batch("conv")
    real = invariance_module.input_gradient
    frozen = Frozen(lambda *a, **k: real(*a, **k)[2].detach())
    monkeypatch.setattr(invariance_module, "input_gradient", lambda *a, **k: (*real(*a, **k)[:2], frozen(*a, **k)))
    assert_fd(PredictionIBP(beta=0.7), make_model("conv"), x, y)


def test_grad_norm_fd_l2_matches_finite_difference_with_the_direction_held(monkeypatch):
    x, y = batch("mlp")
    monkeypatch.setattr(gradient_module, "normalize", Frozen(gradient_module.normalize))
    assert_fd(GradientNormPenalty(lam=0.7, norm="l2", method="fd"), make_model("mlp"), x, y)


# ------------------------------------------------------------------------------------------- closed forms
def linear_model(features=6, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(features, classes).double()


def softmax_input_gradient(model, x, y):
    """grad_x CE for logits W x + b: W^T (softmax - onehot), per example."""
    p = model(x).softmax(1)
    return (p - F.one_hot(y, p.shape[1]).double()) @ model.weight


def test_loss_ibp_and_grad_norm_values_match_the_closed_form_on_a_linear_model():
    model, (x, y) = linear_model(), batch("mlp")
    g = softmax_input_gradient(model, x, y)
    _, stats = LossIBP(beta=1.0)(model, x, y)
    assert torch.allclose(stats["penalty"], g.pow(2).sum(1).mean())
    _, stats = GradientNormPenalty(lam=1.0, norm="linf")(model, x, y)  # J^1: L1 norm
    assert torch.allclose(stats["penalty"], g.abs().sum(1).mean())
    _, stats = GradientNormPenalty(lam=1.0, norm="l2")(model, x, y)  # J^2: L2 norm
    assert torch.allclose(stats["penalty"], g.norm(dim=1).mean())


def test_prediction_ibp_and_tangent_prop_values_match_the_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).double()
    x, y = batch("conv")
    W = model[1].weight
    g = ((model(x).softmax(1) - F.one_hot(y, 3).double()) @ W).view_as(x)
    _, stats = PredictionIBP(beta=1.0)(model, x, y)  # J = W: ||W g||^2
    assert torch.allclose(stats["penalty"], (g.flatten(1) @ W.T).pow(2).sum(1).mean())
    t = image_tangents(x).flatten(2)  # (B, 5, n)
    _, stats = TangentProp(beta=1.0)(model, x, y)
    assert torch.allclose(stats["penalty"], (t @ W.T).pow(2).sum((1, 2)).mean())
    _, stats = FastTangentProp(beta=1.0)(model, x, y)
    assert torch.allclose(stats["penalty"], (t @ g.flatten(1).unsqueeze(2)).pow(2).sum((1, 2)).mean())


def test_simprop_distance_is_the_exact_distance_to_the_runner_up_hyperplane_on_a_linear_model():
    model, (x, y) = linear_model(), batch("mlp")
    gamma = 100.0  # every point is closer than gamma: penalty = mean (gamma - d)^2
    z = model(x)
    runner = z.scatter(1, y[:, None], float("-inf")).argmax(1)
    w = model.weight[y] - model.weight[runner]
    d = (z.gather(1, y[:, None]).squeeze(1) - z.gather(1, runner[:, None]).squeeze(1)) / w.norm(dim=1)
    # the hyperplane {z_y = z_runner} really is d away: the foot of the perpendicular is on it
    foot = x - d[:, None] * w / w.norm(dim=1, keepdim=True)
    zf = model(foot)
    assert torch.allclose(zf.gather(1, y[:, None]), zf.gather(1, runner[:, None]), atol=1e-10)
    _, stats = SimultaneousPropagation(mu=1.0, gamma=gamma)(model, x, y)
    assert torch.allclose(stats["penalty"], (gamma - d).pow(2).mean())
    assert torch.allclose(stats["backward_error"], d.median())


def test_lipschitz_estimates_match_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = batch("mlp", classes=4)
    f = lambda v: model(v).softmax(-1)
    jacobians = torch.stack([torch.autograd.functional.jacobian(f, xi) for xi in x])  # (B, classes, features)
    frob = jacobians.flatten(1).norm(dim=1)
    _, stats = LipschitzPenalty(lam=1.0)(model, x, y)
    assert torch.allclose(stats["lipschitz"], frob.max())
    assert torch.allclose(stats["jacobian_norm"], frob.mean())
    # Hutchinson: mean_k ||J^T u_k||^2 with the same Gaussian u_k, and E||J^T u||^2 = ||J||_F^2
    torch.manual_seed(1)
    u = torch.randn(300, 4, dtype=torch.double)
    torch.manual_seed(1)
    _, stats = LipschitzPenalty(lam=1.0, projections=300)(model, x, y)
    estimate = torch.einsum("kc,bcn->bkn", u, jacobians).pow(2).sum(2).mean(1).sqrt()
    assert torch.allclose(stats["lipschitz"], estimate.max())
    assert abs(stats["lipschitz"] / frob.max() - 1) < 0.2
    p = f(x)
    ratios = [(p[i] - p[j]).norm() / (x[i] - x[j]).norm() for i in range(len(x)) for j in range(i + 1, len(x))]
    _, stats = LipschitzPenalty(lam=1.0, estimate="pairs", lip0=0.0)(model, x, y)
    assert torch.allclose(stats["lipschitz"], torch.stack(ratios).max())
    big = float(torch.stack(ratios).max().detach()) + 1
    _, stats = LipschitzPenalty(lam=1.0, estimate="pairs", lip0=big)(model, x, y)  # below L0: no penalty
    assert stats["penalty"] == 0


def test_grad_norm_exact_and_fd_agree_to_first_order_in_h():
    for norm in ("l2", "linf"):
        x, y = batch("mlp")
        model = make_model("mlp")
        exact_loss, exact = GradientNormPenalty(lam=1.0, norm=norm)(model, x, y)
        exact_grads = torch.autograd.grad(exact_loss, list(model.parameters()))
        exact_size = sum(g.pow(2).sum() for g in exact_grads).sqrt().item()
        errors, grad_errors = [], []
        for h in (1e-2, 5e-3, 2.5e-3):
            loss, stats = GradientNormPenalty(lam=1.0, norm=norm, method="fd", h=h)(model, x, y)
            grads = torch.autograd.grad(loss, list(model.parameters()))
            errors.append(abs(stats["penalty"] - exact["penalty"]).item())
            grad_errors.append(sum((a - b).pow(2).sum() for a, b in zip(grads, exact_grads)).sqrt().item())
        assert errors[0] < 0.1 * exact["penalty"] and grad_errors[0] < 0.15 * exact_size
        for errs in (errors, grad_errors):
            for coarse, fine in zip(errs, errs[1:]):
                assert 1.7 < coarse / fine < 2.3, (norm, errs)  # error proportional to h


def test_tulip_step_has_l2_norm_eps_along_the_gradient():
    x, y = batch("conv")
    model = make_model("conv")
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    tulip = Tulip(eps=0.01)
    step = (tulip.step(x, g) - x).flatten(1)
    assert torch.allclose(step.norm(dim=1), torch.full((len(x),), 0.01, dtype=x.dtype), rtol=1e-10)
    assert torch.allclose(F.cosine_similarity(step, g.flatten(1)), torch.ones(len(x), dtype=x.dtype))
    corner = torch.ones_like(x)  # at the box corner the step is clipped: never leaves [0, 1]
    assert tulip.step(corner, g.abs()).max() <= 1


def test_tulip_penalty_is_the_largest_per_example_gradient_norm():
    x, y = batch("mlp")
    model = linear_model()
    g = softmax_input_gradient(model, x, y)
    _, stats = Tulip(eps=0.01, lam_lip=1.0)(model, x, y)
    assert torch.allclose(stats["penalty"], g.norm(dim=1).max())
    assert torch.allclose(stats["grad_norm"], g.norm(dim=1).mean())


def test_adversarial_training_trains_on_the_attack_point_from_the_attacks_package():
    x, y = batch("mlp")
    model = make_model("mlp").eval()
    fgsm = FGSM()
    x_adv = fgsm(model, x, y, 0.05)
    loss, stats = AdversarialTraining(FGSM(), eps=0.05, mix=0.25)(model, x, y)
    expected = 0.25 * F.cross_entropy(model(x), y) + 0.75 * F.cross_entropy(model(x_adv), y)
    assert torch.allclose(loss, expected)
    assert torch.allclose(stats["perturbation_l2"], (x_adv - x).flatten(1).norm(dim=1).mean())
    with pytest.raises(UserError):
        AdversarialTraining(FGSM(), eps=0.1, mix=1.5)


# ------------------------------------------------------------------------------------------- tangent vectors
def test_tangents_match_the_analytic_derivatives_of_a_blob_and_a_real_rotation():
    size, s, sigma = 28, 3.0, 0.9
    rows, cols = torch.meshgrid(torch.arange(size).double(), torch.arange(size).double(), indexing="ij")
    c0, r0 = 12.3, 14.1
    blob = torch.exp(-((cols - c0) ** 2 + (rows - r0) ** 2) / (2 * s**2))[None, None]
    t = image_tangents(blob, sigma)[0, :, 0]
    # shift_u: the smoothed blob is a Gaussian of variance s^2 + sigma^2; the tangent is its central difference
    # in columns, per [-1, 1] unit (= 13.5 pixels); and that is the analytic derivative up to O(1 / variance)
    var = s**2 + sigma**2
    smoothed = lambda c: (s**2 / var) * torch.exp(-((c - c0) ** 2 + (rows - r0) ** 2) / (2 * var))
    central = (smoothed(cols + 1) - smoothed(cols - 1)) / 2 * (size - 1) / 2
    analytic = -(cols - c0) / var * smoothed(cols) * (size - 1) / 2
    assert (t[0] - central).abs().max() < 1e-3 * central.abs().max()
    assert (t[0] - analytic).abs().max() < 0.05 * analytic.abs().max()
    # rotation: d/da of the image sampled on coordinates rotated by a (analytically, no interpolation), for an
    # off-centre anisotropic blob; the tangent uses central differences, so agreement is up to O(1 / width^2)
    half = (size - 1) / 2
    u, v = (cols - half) / half, (rows - half) / half

    def rotated(a):
        uu, vv = u * math.cos(a) + v * math.sin(a), -u * math.sin(a) + v * math.cos(a)
        c, r = half + half * uu, half + half * vv
        return torch.exp(-((c - c0) ** 2 / (2 * 5.0**2) + (r - r0) ** 2 / (2 * 3.5**2)))

    angle = 1e-4
    numeric = (rotated(angle) - rotated(-angle)) / (2 * angle)
    tangent = image_tangents(rotated(0.0)[None, None], sigma=0.0)[0, 4, 0]
    assert F.cosine_similarity(numeric.flatten(), tangent.flatten(), dim=0) > 0.995
    assert abs(tangent.norm() / numeric.norm() - 1) < 0.03
    # a radially symmetric image has (almost) no rotation tangent, but a shift tangent
    centred = torch.exp(-((cols - 13.5) ** 2 + (rows - 13.5) ** 2) / (2 * s**2))[None, None]
    tc = image_tangents(centred, sigma)[0, :, 0]
    assert tc[4].norm() < 1e-2 * tc[0].norm()  # zero up to the O(1 / width^2) of central differences


def test_tangent_prop_rejects_non_image_data():
    x, y = batch("mlp")
    with pytest.raises(UserError):
        TangentProp()(make_model("mlp"), x, y)


# ------------------------------------------------------------------------------------------- hygiene
HYGIENE = [  # (factory, number of training forwards that may update BatchNorm statistics)
    (lambda: CrossEntropy(), 1),
    (lambda: LossIBP(), 1),
    (lambda: PredictionIBP(), 1),
    (lambda: PredictionIBP(direction="random"), 1),  # the JVP pass is the training forward
    (lambda: TangentProp(), 1),
    (lambda: FastTangentProp(), 1),
    (lambda: GradientNormPenalty(method="exact"), 1),
    (lambda: GradientNormPenalty(method="fd"), 1),
    (lambda: LipschitzPenalty(), 1),
    (lambda: SimultaneousPropagation(), 1),
    (lambda: GaussianAugmentation(), 1),
    (lambda: Tulip(), 2),  # clean batch (penalty) + adversarial batch (loss)
    (lambda: AdversarialTraining(FGSM(model_mode="keep"), eps=0.1, mix=0.5), 2),
    (lambda: AdversarialTraining(PGD(steps=3, model_mode="keep"), eps=0.1), 1),
    (lambda: AdversarialTraining(FGM(norm="l2"), eps=0.5), 1),
    (lambda: TRADES(eps=0.1, steps=3), 2),  # clean + adversarial batch; the KL-PGD's passes do not count
    (lambda: MART(eps=0.1, steps=3, attack_bn="train"), 2),
    (lambda: TRADES(eps=0.1, steps=2, awp=AdversarialWeightPerturbation(gamma=5e-3)), 2),  # the AWP pass does not count
    (lambda: AdversarialTraining(PGD(steps=2), eps=0.1, awp=AdversarialWeightPerturbation(gamma=1e-2)), 1),
]


@pytest.mark.parametrize("factory,forwards", HYGIENE)
def test_defense_keeps_mode_leaves_no_grads_and_counts_batchnorm_batches(factory, forwards):
    x, y = batch("conv", n=16)
    model = make_model("conv")
    defense = factory()
    for mode in (True, False):
        model.train(mode)
        bn = model[1]
        before = int(bn.num_batches_tracked)
        loss, stats = defense(model, x, y)
        assert model.training is mode
        assert all(p.grad is None for p in model.parameters())
        assert x.grad is None and not x.requires_grad
        assert torch.isfinite(loss) and loss.requires_grad
        assert all(torch.isfinite(torch.as_tensor(v)) and not torch.as_tensor(v).requires_grad for v in stats.values())
        assert int(bn.num_batches_tracked) - before == (forwards if mode else 0)
        loss.backward()  # the training loop's step works
        model.zero_grad(set_to_none=True)


def test_derivative_passes_leave_batchnorm_statistics_as_one_clean_forward():
    x, y = batch("conv", n=16)
    reference = make_model("conv")
    reference(x)
    defenses = (LossIBP(), PredictionIBP(), PredictionIBP(direction="random"), TangentProp(), GradientNormPenalty(method="fd"), LipschitzPenalty())
    for defense in defenses:
        model = make_model("conv")
        defense(model, x, y)
        for a, b in zip(model.buffers(), reference.buffers()):
            assert torch.allclose(a, b)
    # PGD training in train mode: the statistics are those of one forward of the adversarial batch
    model, twin = make_model("conv"), make_model("conv")
    torch.manual_seed(3)
    AdversarialTraining(PGD(steps=3, model_mode="keep"), eps=0.1)(model, x, y)
    torch.manual_seed(3)
    x_adv = PGD(steps=3, model_mode="keep")(twin, x, y, 0.1)  # moves twin's statistics 3 times: reset them
    twin.load_state_dict(make_model("conv").state_dict())
    twin(x_adv)
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.allclose(a, b)


@pytest.mark.parametrize("bad", [dict(beta=-1.0), dict(beta="x")])
def test_bad_parameters_are_user_errors(bad):
    with pytest.raises(UserError):
        LossIBP(**bad)
    with pytest.raises(UserError):
        GradientNormPenalty(method="magic")
    with pytest.raises(UserError):
        PredictionIBP(direction="sideways")


# ------------------------------------------------------------------------------------------- YAML files
YAMLS = sorted(p.stem for p in DEFENSE_DIR.glob("*.yaml"))


def test_every_issue_defense_has_a_yaml():
    wanted = {
        "none",
        "fgsm_at",
        "l2_at",
        "pgd_at",
        "grad_norm",
        "lipschitz",
        "tulip",
        "loss_ibp",
        "prediction_ibp",
        "tangent_prop",
        "fast_tangent_prop",
        "fast_at",
        "simprop",
        "gaussian_aug",
    }
    assert wanted <= set(YAMLS)


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_instantiates_and_trains_one_step_on_digit_shaped_images(name):
    text = (DEFENSE_DIR / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("#"), "each YAML names its source in a leading comment"
    defense = instantiate(OmegaConf.create(text))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    x, y = torch.rand(32, 1, 8, 8), torch.arange(32) % 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, stats = defense(model.train(), x, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and model.training


def test_defenses_that_clip_refuse_unbounded_data_with_a_hint():
    x = torch.randn(16, 2).double() * 3 + 2  # gaussians2d-like: not in [0, 1]
    y = torch.arange(16) % 2
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    for defense, fix in (
        (AdversarialTraining(FGSM(), eps=0.1), "defense.attack.bounds=null"),
        (Tulip(), "defense.bounds=null"),
        (GaussianAugmentation(), "defense.clip=false"),
    ):
        with pytest.raises(UserError, match=fix):
            defense(model, x, y)
    for defense in (AdversarialTraining(FGSM(bounds=None), eps=0.1), Tulip(bounds=None), GaussianAugmentation(clip=False)):
        loss, _ = defense(model, x, y)
        assert torch.isfinite(loss)


@pytest.mark.slow
@pytest.mark.parametrize("name", YAMLS)
def test_every_defense_trains_on_digits_from_the_cli(robust, tmp_path, name):
    proc = robust("train", f"defense={name}", "train.epochs=1", "data.n_train=300", "data.n_test=100", check=True)
    log = sorted((tmp_path / "outputs" / "train").glob("*/*/train_log.csv"))[-1].read_text().splitlines()
    assert len(log) == 2 and "test_accuracy" in log[0], proc.stdout
