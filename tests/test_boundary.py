"""Decision-boundary geometry (Bell Part III): known answers on objects whose boundary is exact."""

import itertools
import math

import pytest
import torch

from robust_cli.analysis.boundary import boundary_dimension, boundary_point, count_degenerate, flat_svd, point_differences, project_to_boundary, sample_around
from robust_cli.analysis.geometry_objects import Orthant, ThetaWedge, Voronoi
from robust_cli.core.errors import UserError


class Linear(torch.nn.Module):
    """A linear classifier: every pairwise boundary is a hyperplane with normal W_a - W_b."""

    def __init__(self, n, classes, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(classes, n, generator=gen, dtype=torch.float64)
        self.bias = torch.randn(classes, generator=gen, dtype=torch.float64)

    def forward(self, x):
        return x.reshape(len(x), -1) @ self.weight.T + self.bias


def brute_force_nearest(x, normals, boundary_only):
    """Nearest point of the cone {N y >= 0} (or of its boundary) by enumerating every active set: the projection
    onto each intersection of face planes, kept if feasible, the closest one wins (a brute-force QP)."""
    best, best_dist = None, math.inf
    for r in range(len(normals) + 1):
        if boundary_only and r == 0:
            continue
        for active in itertools.combinations(range(len(normals)), r):
            y = x.clone()
            if active:
                a = normals[list(active)]
                y = x - a.T @ torch.linalg.solve(a @ a.T, a @ x)
            if (normals @ y >= -1e-12).all() and (y - x).norm() < best_dist:
                best, best_dist = y, float((y - x).norm())
    return best


@pytest.mark.parametrize("cone", [Orthant((9,), 2, k=4), ThetaWedge((9,), 2, k=5, thetas=[5, 20, 45, 70]), ThetaWedge((3, 3), 2, k=3, thetas=60)])
def test_exact_projections_match_brute_force_qp(cone):
    x = torch.randn(150, *cone.input_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    normals = cone.face_normals()
    flat = x.reshape(len(x), -1)
    to_cone = cone.project(x).reshape(len(x), -1)
    to_boundary = cone.project_to_boundary(x).reshape(len(x), -1)
    inside = (flat @ normals.T > 0).all(1)
    assert 0 < int(inside.sum()) < len(x)  # both cases are exercised
    for i in range(len(x)):
        assert torch.allclose(to_cone[i], brute_force_nearest(flat[i], normals, False), atol=1e-6)
        assert torch.allclose(to_boundary[i], brute_force_nearest(flat[i], normals, True), atol=1e-6)
    # the margin of the logits is the signed distance to the boundary
    distance = (flat - to_boundary).norm(dim=1)
    logits = cone(x)
    assert torch.allclose(logits[:, 1] - logits[:, 0], torch.where(inside, distance, -distance), atol=1e-9)


def test_wedge_definition_and_crossing_paths():
    wedge = ThetaWedge((6,), 4, k=3, thetas=[30, 50])
    x = torch.randn(2000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inside = (x[:, 0] > 0) & (x[:, 1] > x[:, 0] * math.tan(math.radians(30))) & (x[:, 2] > x[:, 0] * math.tan(math.radians(50)))
    assert torch.equal(wedge(x).argmax(1), inside.long())  # Definition 30.8; extra classes never win
    # centerline: inside for t > 0, outside for t < 0, crossing at the apex
    line = wedge.centerline(torch.tensor([1.0, -1.0]))
    assert wedge(line).argmax(1).tolist() == [1, 0]
    apex = boundary_point(wedge, line[:1], line[1:], tol=1e-9).points[0]
    assert apex.abs().max() < 1e-9
    # x-epsilon-parallel: crosses the face x_1 = 0 at (0, eps, eps, ...)
    par = wedge.parallel(torch.tensor([0.1, -1.0]), 0.5)
    crossing = boundary_point(wedge, par[:1], par[1:], tol=1e-9).points[0]
    assert torch.allclose(crossing, torch.tensor([0.0, 0.5, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64), atol=1e-9)
    with pytest.raises(UserError):
        ThetaWedge((6,), 2, k=3, thetas=[30])


@pytest.mark.parametrize("k", range(1, 11))
def test_orthant_degenerate_count_equals_k(k):
    """Section 31: samples around the apex of the k-orthant, projected onto it, drop exactly k singular values."""
    n, m = 100, 400
    orthant = Orthant((n,), 2, k=k).double()
    gen = torch.Generator().manual_seed(k)
    samples = sample_around(torch.zeros(n, dtype=torch.float64), m, 0.1, "flat_svd", gen)
    x1, x2 = orthant.centerline(torch.tensor([1.0, -1.0]))
    by_descent = project_to_boundary(orthant, samples, x1, x2, "descent", tol=1e-9)
    assert by_descent.converged.all()
    assert torch.allclose(by_descent.points, orthant.project_to_boundary(samples), atol=1e-8)
    assert boundary_dimension(samples, by_descent.points).n_degenerate == k
    assert boundary_dimension(samples, orthant.project(samples)).n_degenerate == k  # onto the closed orthant, as the seed


@pytest.mark.parametrize("theta", [20.0, 60.0])
def test_acute_wedge_still_drops_k_values(theta):
    n, k = 60, 4
    wedge = ThetaWedge((n,), 2, k=k, thetas=theta)
    samples = sample_around(torch.zeros(n, dtype=torch.float64), 300, 0.1, "flat_svd", torch.Generator().manual_seed(0))
    assert boundary_dimension(samples, wedge.project_to_boundary(samples)).n_degenerate == k


@pytest.mark.parametrize("method", ["interpolate", "descent"])
@pytest.mark.parametrize("distribution", ["gaussian", "flat_svd"])
def test_linear_classifier_has_one_hyperplane(method, distribution):
    n = 40
    model = Linear(n, 3)
    gen = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(2, n, generator=gen, dtype=torch.float64) * 3
    assert model(x1[None]).argmax() != model(x2[None]).argmax()
    found = boundary_point(model, x1[None], x2[None], tol=1e-10)
    a, b = int(found.class_a), int(found.class_b)
    samples = sample_around(found.points[0], 200, 0.05, distribution, gen)
    proj = project_to_boundary(model, samples, x1, x2, method, tol=1e-10, classes=(found.class_a[0], found.class_b[0]))
    assert proj.converged.all()
    normal = model.weight[a] - model.weight[b]
    dim = boundary_dimension(samples, proj.points, {"weights": normal})
    assert dim.n_degenerate == 1
    assert dim.cosines["weights"] > 0.999
    assert dim.singular_values[-1] < 1e-8 * dim.singular_values[0]


def test_descent_normal_with_fewer_samples_than_dimensions():
    """M - 1 < n: the normal is sought in the span of the points and their displacements; exact for descent, and
    a flat boundary still drops one Flat SVD value, to about sqrt(1 - M/n) of the rest."""
    n, m = 300, 240
    model = Linear(n, 2, seed=3)
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, n, generator=gen, dtype=torch.float64) * 3
    found = boundary_point(model, x1[None], x2[None], tol=1e-10)
    samples = sample_around(found.points[0], m, 0.05, "flat_svd", gen)
    proj = project_to_boundary(model, samples, x1, x2, "descent", tol=1e-10)
    dim = boundary_dimension(samples, proj.points, {"weights": model.weight[1] - model.weight[0]})
    assert dim.cosines["weights"] > 0.999
    assert dim.n_degenerate == 1
    ratio = float(dim.singular_values[-1] / dim.singular_values[0])
    assert abs(ratio - math.sqrt(1 - m / n)) < 0.1


def test_descent_is_exact_in_one_step_on_a_linear_classifier():
    model = Linear(10, 2, seed=4)
    x = torch.randn(50, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a, b = torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)
    proj = project_to_boundary(model, x, x[0], x[0], "descent", tol=1e-12, max_steps=1, classes=(a, b))
    w, c = model.weight[0] - model.weight[1], model.bias[0] - model.bias[1]
    expected = x - ((x @ w + c) / (w @ w))[:, None] * w  # orthogonal projection onto the hyperplane
    assert torch.allclose(proj.points, expected, atol=1e-12)


def test_voronoi_boundary_is_the_perpendicular_bisector():
    """Bell section 30.1: between neighbouring sites the 1-NN boundary is their bisector, crossed orthogonally."""
    n = 20
    gen = torch.Generator().manual_seed(5)
    a, b = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    b[0] = 1.0
    far = 10 + torch.rand(4, n, generator=gen, dtype=torch.float64)
    model = Voronoi((n,), 3, sites=torch.cat([a[None], b[None], far]), labels=[0, 1, 2, 2, 0, 1])
    found = boundary_point(model, a[None], b[None], tol=1e-10)
    assert torch.allclose(found.points[0], (a + b) / 2, atol=1e-9)
    samples = sample_around(found.points[0], 100, 0.05, "flat_svd", gen)
    proj = project_to_boundary(model, samples, a, b, "interpolate", tol=1e-10)
    dim = boundary_dimension(samples, proj.points, {"sites": a - b})
    assert dim.n_degenerate == 1 and dim.cosines["sites"] > 0.999


def _relu_net(n, classes, seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n, 32), torch.nn.ReLU(), torch.nn.Linear(32, classes)).double()


def test_batched_bisection_equals_one_at_a_time_and_brackets_the_boundary():
    n, tol = 12, 1e-7
    net = _relu_net(n, 4, 6)
    x = torch.randn(400, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2
    same = net(x).argmax(1) == net(x[:1]).argmax(1)
    m = min(int(same.sum()), int((~same).sum()), 60)
    x1, x2 = x[same][:m], x[~same][:m]
    batched = boundary_point(net, x1, x2, tol)
    for i in range(len(x1)):
        one = boundary_point(net, x1[i : i + 1], x2[i : i + 1], tol)
        assert torch.allclose(one.points[0], batched.points[i], atol=2 * tol)
        assert int(one.class_b) == int(batched.class_b[i])
    assert (batched.width <= tol).all()
    unit = (x2 - x1) / (x2 - x1).norm(dim=1, keepdim=True)
    before = net(batched.points - unit * batched.width[:, None] / 2).argmax(1)
    after = net(batched.points + unit * batched.width[:, None] / 2).argmax(1)
    assert torch.equal(before, batched.class_a) and torch.equal(after, batched.class_b)
    assert (batched.class_a != batched.class_b).all()
    with pytest.raises(ValueError):
        boundary_point(net, x1[:1], x1[:1], tol)


def test_descent_and_interpolate_land_on_a_relu_nets_boundary():
    n = 12
    net = _relu_net(n, 3, 7)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, n, dtype=torch.float64, generator=gen) * 2
    pred = net(x).argmax(1)
    x1, x2 = x[0], x[(pred != pred[0]).nonzero()[0, 0]]
    found = boundary_point(net, x1[None], x2[None], 1e-9)
    samples = sample_around(found.points[0], 100, 0.05, "gaussian", gen)
    for method in ("interpolate", "descent"):
        proj = project_to_boundary(net, samples, x1, x2, method, tol=1e-7, classes=(found.class_a[0], found.class_b[0]))
        assert proj.converged.float().mean() > 0.9
        logits = net(proj.points[proj.converged])
        top2 = logits.topk(2, dim=1).values
        gradient_scale = 50.0  # |grad (z_a - z_b)| of this small net is far below this
        assert (top2[:, 0] - top2[:, 1]).max() < gradient_scale * 1e-7


def test_flat_svd_sample_is_flat_centred_and_keeps_the_frobenius_norm():
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    flat = flat_svd(noise)
    s = torch.linalg.svdvals(flat)
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-10)
    assert math.isclose(float(flat.norm()), float(noise.norm()), rel_tol=1e-10)
    center = torch.rand(4, 5, dtype=torch.float64)
    sample = sample_around(center, 30, 0.1, "flat_svd", gen)
    assert sample.shape == (30, 4, 5)
    assert torch.allclose(sample.mean(0), center, atol=1e-12)
    s = torch.linalg.svdvals((sample - center).reshape(30, -1))[:19]  # centred noise has rank 30 - 1 = 29 > 20
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-8)
    with pytest.raises(UserError):
        sample_around(center, 30, 0.1, "uniform", gen)


def test_all_pair_differences_have_the_centred_spectrum():
    points = torch.randn(25, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    i, j = torch.triu_indices(25, 25, offset=1)
    all_pairs = points[i] - points[j]
    assert torch.allclose(torch.linalg.svdvals(all_pairs), math.sqrt(25) * torch.linalg.svdvals(point_differences(points)), rtol=1e-10)
    random_pairs = point_differences(points, n_pairs=40, generator=torch.Generator().manual_seed(0))
    assert random_pairs.shape == (40, 8) and (random_pairs.norm(dim=1) > 0).all()  # never a point minus itself


def test_count_degenerate_reads_the_first_drop():
    plateau = torch.linspace(1.1, 0.9, 20, dtype=torch.float64)
    assert count_degenerate(plateau) == 0
    assert count_degenerate(torch.cat([plateau, torch.tensor([0.5, 0.45, 0.1])])) == 3  # two tiers, both dropped
    assert count_degenerate(torch.cat([plateau, torch.zeros(2)])) == 2
    assert count_degenerate(torch.cat([torch.tensor([5.0]), plateau])) == 0  # a large top value is not a drop
