"""Sparse-RS in l0 (Croce, Andriushchenko, Singh, Flammarion & Hein 2022, "Sparse-RS: a versatile framework for
query-efficient sparse black-box adversarial attacks"): score-based random search over sets of k pixels.

The budget eps is k, a number of pixels (a pixel is every channel at one location). The start: k random pixels set
to random corners of the colour cube ({0, 1} per channel). Each iteration swaps m = max(floor(alpha_i k), 1) pixels of
the set for m pixels outside it (the removed ones go back to their clean values, the new ones get random corners),
and keeps the candidate when the margin loss z_y - max_{j != y} z_j falls (or the example is misclassified). alpha_i
is alpha_init / 2, 4, 5, 6, 8, 10, 12, 15, 20 after 0, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10,000 queries
(scaled to n_queries), as the authors' code. No gradient: it also serves the audit as a gradient-free check in l0.
"""

from __future__ import annotations

import torch

from robust_cli.attacks.base import Attack
from robust_cli.attacks.gradient import _positive_int
from robust_cli.core.errors import UserError

# (up to this iteration of 10,000, alpha_init divided by): the authors' l0 schedule
_SCHEDULE = ((50, 2), (200, 4), (500, 5), (1000, 6), (2000, 8), (4000, 10), (6000, 12), (8000, 15))


def alpha_at(iteration: int, n_queries: int, alpha_init: float) -> float:
    """The fraction of the k pixels swapped at this iteration (rescaled to n_queries)."""
    it = int(iteration / n_queries * 10000)
    if it == 0:
        return alpha_init
    return alpha_init / next((d for until, d in _SCHEDULE if it <= until), 20)


class SparseRS(Attack):
    """Sparse-RS, l0: at most eps pixels changed, no gradient; `n_queries` model calls per example at most."""

    norm = "l0"

    def __init__(self, n_queries: int = 10000, alpha_init: float = 0.8, restarts: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.n_queries = _positive_int("n_queries", n_queries)
        self.restarts = _positive_int("restarts", restarts)
        if not 0 < float(alpha_init) <= 1:
            raise UserError(f"sparse_rs alpha_init must be in (0, 1], got {alpha_init!r}")
        self.alpha_init = float(alpha_init)
        if self.bounds is None:
            raise UserError("sparse_rs sets pixels to the corners of the data box: it needs bounded inputs")

    @property
    def name(self) -> str:
        return "sparse_rs"

    def margin(self, logits, y, target):
        """< 0 exactly when the example is adversarial."""
        own = logits.gather(1, (y if target is None else target)[:, None]).squeeze(1)
        others = logits.scatter(1, (y if target is None else target)[:, None], float("-inf")).amax(dim=1)
        return own - others if target is None else others - own

    @staticmethod
    def _pixels(x):
        """x as (n, c, P): channels and pixel locations (non-image inputs: one channel)."""
        return x.reshape(len(x), x.shape[1], -1) if x.dim() == 4 else x.reshape(len(x), 1, -1)

    @torch.no_grad()
    def perturb(self, model, x, y, eps, target):
        if isinstance(eps, torch.Tensor) and eps.dim() > 0:
            raise UserError("sparse_rs takes one eps (a number of pixels) per run, not one per example (search=binary)")
        if float(eps) != int(eps):
            raise UserError(f"sparse_rs eps is a number of pixels: give integers, e.g. eps=[0,10,20]; got {eps}")
        flat = self._pixels(x)
        k = min(int(eps), flat.shape[2])
        best = x.clone()
        if k == 0:
            return best
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            todo = (~done).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            x_r, ok = self.single_run(model, x[todo], y[todo], k, None if target is None else target[todo])
            best[todo] = x_r
            done[todo[ok]] = True
        return best

    def single_run(self, model, x, y, k, target):
        n, shape = len(x), x.shape
        xf = self._pixels(x)
        c, p = xf.shape[1], xf.shape[2]
        low, high = self.bounds
        order = torch.rand(n, p, device=x.device).argsort(dim=1)
        inside, outside = order[:, :k].clone(), order[:, k:].clone()  # the set of changed pixels, the rest

        def corners(rows, m):
            return torch.where(torch.rand(rows, c, m, device=x.device) < 0.5, low, high).to(x.dtype)

        bestf = xf.clone()
        bestf.scatter_(2, inside[:, None, :].expand(n, c, k), corners(n, k))
        margin = self.margin(model(bestf.reshape(shape)), y, target)
        for it in range(1, self.n_queries):
            run = (margin >= 0).nonzero().squeeze(1)  # not yet adversarial
            if len(run) == 0 or p == k:
                break
            m = min(max(int(alpha_at(it, self.n_queries, self.alpha_init) * k), 1), k, p - k)
            pick_in = torch.randperm(k, device=x.device)[:m]  # the same positions in every example's lists, as the authors
            pick_out = torch.randperm(p - k, device=x.device)[:m]
            old, new = inside[run][:, pick_in], outside[run][:, pick_out]
            cand = bestf[run].clone()
            rows = len(run)
            cand.scatter_(2, old[:, None, :].expand(rows, c, m), xf[run].gather(2, old[:, None, :].expand(rows, c, m)))
            cand.scatter_(2, new[:, None, :].expand(rows, c, m), corners(rows, m))
            cand_margin = self.margin(model(cand.reshape(rows, *shape[1:])), y[run], None if target is None else target[run])
            better = (cand_margin < margin[run]) | (cand_margin < 0)
            if bool(better.any()):
                idx = run[better]
                bestf[idx], margin[idx] = cand[better], cand_margin[better]
                swap_in, swap_out = inside[idx], outside[idx]
                swap_in[:, pick_in], swap_out[:, pick_out] = new[better], old[better]
                inside[idx], outside[idx] = swap_in, swap_out
        return bestf.reshape(shape), margin < 0

    def _check_result(self, x, x_adv, eps):
        """Budget in pixels (every channel at a location counts once), box, shape."""
        if x_adv.shape != x.shape or not torch.isfinite(x_adv).all():
            raise RuntimeError(f"{self.name} returned a non-finite or mis-shaped batch")
        if x_adv.min() < self.bounds[0] or x_adv.max() > self.bounds[1]:
            raise RuntimeError(f"{self.name} left the box {self.bounds}")
        changed = (self._pixels(x_adv) != self._pixels(x)).any(dim=1).sum(dim=1)
        if (changed > int(eps)).any():
            raise RuntimeError(f"{self.name} changed {int(changed.max())} pixels, more than its budget {int(eps)}")
