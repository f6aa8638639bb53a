"""Sparse-RS (l0): the budget in pixels, the known answer on a linear model, the schedule, bad input."""

import pytest
import torch

from robust_cli.attacks import PGD, SparseRS
from robust_cli.attacks.sparse_rs import alpha_at
from robust_cli.core.errors import UserError


def _linear(d=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(2, d, generator=gen), torch.rand(400, d, generator=gen)
    model = torch.nn.Linear(d, 2)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.zero_()
    return model.eval(), w, x


def test_on_a_linear_model_it_breaks_exactly_what_k_pixels_can_break():
    """Two classes, linear: changing feature i to a corner c in {0, 1} moves the margin by (w_y - w_o)_i (c - x_i), so
    an example can be broken with k features iff its margin plus its k most negative best moves is < 0."""
    model, w, x = _linear()
    y = model(x).argmax(1)
    for k in (1, 2, 3):
        d = (w[y] - w[1 - y]).detach()  # (n, d): the margin's gradient per example
        margin = (d * x).sum(1)
        best_move = torch.minimum(d * (0 - x), d * (1 - x)).clamp(max=0)
        breakable = margin + best_move.sort(dim=1).values[:, :k].sum(1) < 0
        torch.manual_seed(0)
        adv = SparseRS(n_queries=2000)(model, x, y, float(k))
        broken = model(adv).argmax(1) != y
        assert ((adv != x).sum(1) <= k).all()  # never more than k pixels
        assert torch.equal(broken, breakable), (k, int(broken.sum()), int(breakable.sum()))
        assert 0 < int(breakable.sum()) < len(x) or k > 1  # k = 1: neither trivial nor hopeless


def test_it_never_changes_more_than_k_pixels_of_an_image_and_stays_in_the_box():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x = torch.rand(20, 3, 8, 8)
    y = net(x).argmax(1)
    adv = SparseRS(n_queries=300)(net, x, y, 4.0)
    pixels = (adv != x).any(dim=1).flatten(1).sum(1)
    assert (pixels <= 4).all() and (pixels > 0).any() and adv.min() >= 0 and adv.max() <= 1
    changed = adv[(adv != x)]
    assert ((changed == 0) | (changed == 1)).all()  # corners of the colour cube


def test_the_schedule_is_the_authors():
    assert alpha_at(0, 10000, 0.8) == 0.8
    assert [alpha_at(i, 10000, 0.8) for i in (1, 50, 51, 200, 201, 8000, 8001, 9999)] == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.16, 0.8 / 15, 0.04, 0.04])
    assert alpha_at(500, 1000, 0.8) == pytest.approx(0.8 / 12)  # rescaled: 500 of 1000 is 5000 of 10,000


def test_bad_input_is_one_line():
    model, _, x = _linear()
    y = model(x).argmax(1)
    with pytest.raises(UserError, match="number of pixels"):
        SparseRS(n_queries=10)(model, x, y, 1.5)
    with pytest.raises(UserError, match="alpha_init"):
        SparseRS(alpha_init=0)
    with pytest.raises(UserError, match="norm must be one of linf, l2"):
        PGD(norm="l0")  # l0 with a gradient attack
