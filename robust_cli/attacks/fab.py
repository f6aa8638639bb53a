"""FAB (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary attack"):
untargeted (FAB, the paper's Algorithm) and targeted over the top classes as in AutoAttack (FAB-T), linf, l2 and l1.

At the iterate x_i the decision boundary between the label y and the target t is linearised,
    pi = {z : g(x_i) + grad g(x_i) . (z - x_i) = 0},  g = Z_t - Z_y,
where untargeted FAB takes, at every iterate, the class whose linearised boundary is closest,
    t = argmin_{l != y} |Z_l - Z_y| / ||grad (Z_l - Z_y)||_q   (q the dual norm: 1 for linf, 2 for l2, inf for l1),
and both the iterate and the original point are projected onto pi within the box (minimal norm, exactly):
    d_i = proj(x_i) - x_i,  d_0 = proj(x_0) - x_0,  a = min(|d_i| / (|d_i| + |d_0|), alpha_max)
    x_{i+1} = clip((1 - a)(x_i + eta d_i) + a (x_0 + eta d_0))
biasing the step towards the original point keeps the result close to it. When x_{i+1} is adversarial it is
recorded if closer than the best so far and pulled back: x_{i+1} = (1 - beta) x_0 + beta x_{i+1}.
The result is the closest adversarial point found (minimal mode) or, for a budget eps, that point when it lies
within eps and the unchanged input otherwise.
"""

from __future__ import annotations

import math

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.base import Attack
from robust_cli.attacks.gradient import _positive_int
from robust_cli.core.errors import UserError

NEWTON_STEPS = 30  # rows not settled by then (none seen on MNIST or random boxes: 1-3 steps) take the sorting solver


def project_halfspace(w, c, lower, upper, norm, newton_steps=NEWTON_STEPS):
    """Per example (l1: see project_halfspace_l1): the smallest d (in linf or l2) with w . d >= c and lower <= d <= upper (lower <= 0 <= upper).

    Both norms share one family, d(s) = sign(w) min(s v, room), with v = 1 (linf) or |w| (l2) and room = how far
    each coordinate can move along sign(w); the answer is the smallest s with F(s) = w . d(s) >= c. F is concave,
    increasing and piecewise linear, so Newton's method from s = 0 stays below the answer and lands on it once it
    reaches the last piece (1-3 steps in practice): no sort of the breakpoints, which costs several times more.
    Elementwise work in the inputs' dtype, sums and s in float64 (every term is >= 0, so a sum's relative error is
    the dtype's rounding); arithmetic only, as boolean selects (where, masked_fill) cost ten times an add on the CPU.
    Where even the box corner cannot reach c, the corner (the best the box allows) is returned; c <= 0 gives 0.
    """
    if norm == "l1":
        return project_halfspace_l1(w, c, lower, upper)
    c = c.double()
    sign = w.sign()
    u = w.abs()
    room = torch.maximum(upper * sign, lower * sign)  # upper where w > 0, -lower where w < 0, 0 where w = 0
    v = u if norm == "l2" else sign.abs()
    uv, ur = u * v, u * room
    reach = ur.sum(dim=1, dtype=torch.float64)  # F at the corner
    tolerance = 1e-12 if w.dtype == torch.float64 else 1e-6
    settled = (c <= 0) | (c >= reach)  # 0 and the corner need no search
    s = torch.zeros_like(c)
    for _ in range(newton_steps):
        moving = (s.to(w.dtype)[:, None] * v < room).to(w.dtype)  # coordinates not yet at their box face
        slope = (uv * moving).sum(dim=1, dtype=torch.float64)
        value = reach - (ur * moving).sum(dim=1, dtype=torch.float64) + s * slope
        settled = settled | (value >= c - tolerance * c.abs())
        if bool(settled.all()):
            break
        s = s + (~settled).double() * ((c - value) / slope.clamp_min(1e-300)).clamp_min(0)
    d = sign * torch.minimum(s.to(w.dtype)[:, None] * v, room)
    corner = (c >= reach).nonzero().squeeze(1)
    if len(corner):
        d[corner] = sign[corner] * room[corner]
    stuck = (~settled).nonzero().squeeze(1)
    if len(stuck):
        d[stuck] = project_halfspace_sorted(w[stuck], c[stuck], lower[stuck], upper[stuck], norm).to(d.dtype)
    return d


def project_halfspace_l1(w, c, lower, upper):
    """The smallest d in l1 with w . d >= c and lower <= d <= upper: a fractional knapsack. A unit of l1 spent on
    coordinate i buys |w_i| of w . d, so coordinates are filled to their box face (along sign(w_i)) in decreasing
    order of |w_i|, the last one only as far as c needs; ties in |w| give the same l1 norm whichever is filled.
    Where even the box corner cannot reach c, the corner is returned; c <= 0 gives 0."""
    sign = w.sign()
    u = w.abs()
    room = torch.maximum(upper * sign, lower * sign)
    order = u.argsort(dim=1, descending=True)
    u_s, room_s = u.gather(1, order).double(), room.gather(1, order).double()
    # w . d once the first j+1 coordinates are at their face (a coordinate w does not see adds nothing, even unboxed)
    gain = torch.where(u_s > 0, u_s * room_s, torch.zeros_like(u_s)).cumsum(dim=1)
    need = c.double()[:, None]
    before = torch.cat([torch.zeros_like(gain[:, :1]), gain[:, :-1]], dim=1)  # gain of the coordinates before j
    # coordinate j moves by all of its room where the ones before fall short of c even with it, by the rest
    # of c where it completes c, and not at all once the ones before reach c
    amount = torch.where(gain <= need, room_s, ((need - before) / u_s.clamp_min(1e-300)).clamp(min=0).minimum(room_s))
    amount = torch.where(before >= need, torch.zeros_like(amount), amount)
    d = torch.zeros_like(w).scatter_(1, order, amount.to(w.dtype))
    return sign * d


def project_halfspace_sorted(w, c, lower, upper, norm):
    """project_halfspace by sorting the breakpoints (exact, any number of pieces; the Newton solver's fallback)."""
    w = w.double()
    c = c.double()
    lower, upper = lower.double(), upper.double()
    room = torch.where(w > 0, upper, -lower).clamp_min(0)  # how far each coordinate can move along sign(w)
    aw = w.abs()
    if norm == "l2":
        bp = torch.where(aw > 0, room / aw.clamp_min(1e-300), torch.full_like(w, math.inf))  # lam at which i saturates
        sat_value = aw * room  # w_i d_i once saturated
        weight = w * w
    else:
        bp = torch.where(aw > 0, room, torch.full_like(w, math.inf))  # t at which i saturates
        sat_value = aw * room
        weight = aw
    order = bp.argsort(dim=1)
    bp_s = bp.gather(1, order)
    sat_cum = sat_value.gather(1, order).cumsum(dim=1)
    wt_cum = weight.gather(1, order).cumsum(dim=1)
    total = weight.sum(dim=1, keepdim=True)
    finite = torch.isfinite(bp_s)
    # value of w . d at each breakpoint (the first j+1 coordinates saturated)
    g = torch.where(finite, sat_cum + bp_s * (total - wt_cum), torch.full_like(bp_s, math.inf))
    m = (g < c[:, None]).sum(dim=1)  # breakpoints passed before reaching c
    n = w.shape[1]
    idx = (m - 1).clamp_min(0)[:, None]
    sat_before = torch.where(m[:, None] > 0, sat_cum.gather(1, idx), torch.zeros_like(idx, dtype=w.dtype)).squeeze(1)
    wt_before = torch.where(m[:, None] > 0, wt_cum.gather(1, idx), torch.zeros_like(idx, dtype=w.dtype)).squeeze(1)
    free = total.squeeze(1) - wt_before
    param = (c - sat_before) / free.clamp_min(1e-300)
    infeasible = (m >= n) | (free <= 0)
    param = torch.where(infeasible, torch.full_like(param, math.inf), param)
    param = torch.where(c <= 0, torch.zeros_like(param), param)
    if norm == "l2":
        d = (param[:, None] * w).clamp(lower, upper)
        d = torch.where(torch.isfinite(param)[:, None], d, torch.where(w > 0, upper, torch.where(w < 0, lower, torch.zeros_like(w))))
    else:
        d = w.sign() * torch.minimum(param[:, None].expand_as(room), room)
    return d


class FABT(Attack):
    """Targeted FAB over the `n_target_classes` classes ranked highest after the top one (untargeted success)."""

    iterative = True

    def __init__(
        self,
        norm: str = "linf",
        n_iter: int = 100,
        n_target_classes: int = 9,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        minimal: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.norm = norms.check_norm(norm, norms.L1_NORMS)
        self.n_iter = _positive_int("n_iter", n_iter)
        self.n_target_classes = _positive_int("n_target_classes", n_target_classes)
        self.restarts = _positive_int("restarts", restarts)
        if not 0 <= float(alpha_max) < 1 or not float(eta) >= 1 or not 0 < float(beta) <= 1:
            raise UserError(f"fab needs 0 <= alpha_max < 1, eta >= 1, 0 < beta <= 1; got {alpha_max}, {eta}, {beta}")
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.kind = "minimal" if minimal else "budgeted"

    @property
    def name(self) -> str:
        return "fab_t"

    def _boundary(self, model, x, y, t):
        """g = Z_t - Z_y and its input gradient at x, and whether x is misclassified."""
        x = x.detach().requires_grad_(True)
        logits = model(x)
        g = logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
        (grad,) = torch.autograd.grad(g.sum(), x)
        return g.detach(), grad.detach(), logits.argmax(dim=1).detach() != y

    def _projections(self, x_i, x, g, grad):
        """Minimal steps from x_i and from x onto the boundary linearised at x_i (within the box), one batched solve."""
        n, w = len(x), grad.flatten(1)
        points = torch.cat([x_i.flatten(1), x.flatten(1)])
        c = -torch.cat([g, g + (w * (points[n:] - points[:n])).sum(dim=1)])  # need w . d >= c
        lo, hi = self.bounds if self.bounds is not None else (-math.inf, math.inf)
        d = project_halfspace(w.repeat(2, 1), c, (lo - points).clamp(max=0), (hi - points).clamp(min=0), self.norm)
        return d[:n].reshape(x.shape), d[n:].reshape(x.shape)

    def single_run(self, model, x, y, t, start, best_norm, best_adv):
        x_i = start.clone()
        lo, hi = self.bounds if self.bounds is not None else (-math.inf, math.inf)
        for _ in range(self.n_iter):
            g, grad, fooled = self._boundary(model, x_i, y, t)
            with torch.no_grad():
                size = norms.lp_norm(x_i - x, self.norm)
                closer = fooled & (size < best_norm)
                best_norm[closer], best_adv[closer] = size[closer], x_i[closer]
                d_i, d_0 = self._projections(x_i, x, g, grad)
                n_i, n_0 = norms.lp_norm(d_i, self.norm), norms.lp_norm(d_0, self.norm)
                a = torch.clamp(n_i / (n_i + n_0).clamp_min(1e-12), max=self.alpha_max).reshape(-1, *([1] * (x.dim() - 1)))
                x_new = ((1 - a) * (x_i + self.eta * d_i) + a * (x + self.eta * d_0)).clamp(lo, hi)
            logits = model(x_new).detach()
            with torch.no_grad():
                fooled_new = logits.argmax(dim=1) != y
                size = norms.lp_norm(x_new - x, self.norm)
                closer = fooled_new & (size < best_norm)
                best_norm[closer], best_adv[closer] = size[closer], x_new[closer]
                back = fooled_new.reshape(-1, *([1] * (x.dim() - 1)))
                x_i = torch.where(back, (1 - self.beta) * x + self.beta * x_new, x_new)
        return best_norm, best_adv

    def perturb(self, model, x, y, eps, target):
        with torch.no_grad():
            logits = model(x)
        fooled = logits.argmax(dim=1) != y
        best_norm = torch.where(fooled, torch.zeros(len(x), device=x.device, dtype=x.dtype), torch.full((len(x),), math.inf, device=x.device, dtype=x.dtype))
        best_adv = x.clone()
        targets = self._targets(logits)
        # minimal mode ignores a budget (the CLI passes eps = inf to minimal attacks): every example runs to the boundary
        eps_vec = (
            None
            if eps is None or self.kind == "minimal"
            else (eps.to(x.dtype) if isinstance(eps, torch.Tensor) else torch.full((len(x),), float(eps), device=x.device, dtype=x.dtype))
        )
        for tgt in targets:
            for r in range(self.restarts):
                # a budgeted run only needs examples not yet broken within eps
                todo = ~fooled if eps_vec is None else (best_norm > eps_vec)
                todo = (todo & ~fooled).nonzero().squeeze(1)
                if len(todo) == 0:
                    break
                xs = x[todo]
                start = xs if r == 0 else self._random_start(xs, best_norm[todo], eps_vec[todo] if eps_vec is not None else None)
                bn, ba = self.single_run(model, xs, y[todo], tgt[todo], start, best_norm[todo].clone(), best_adv[todo].clone())
                best_norm[todo], best_adv[todo] = bn, ba
        if eps_vec is None:
            return best_adv
        within = (best_norm <= eps_vec).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.where(within, best_adv, x)

    def _targets(self, logits):
        """One pass per target: the classes ranked 2nd, 3rd, ... by the clean logits."""
        order = logits.argsort(dim=1, descending=True)
        if self.n_target_classes > logits.shape[1] - 1:
            self.note(f"fab_t: {logits.shape[1]} classes give {logits.shape[1] - 1} target class(es), not {self.n_target_classes}")
        return [order[:, j] for j in range(1, 1 + min(self.n_target_classes, logits.shape[1] - 1))]

    def _random_start(self, x, best_norm, eps):
        """A restart from a random point at half the smaller of eps and the best distance found (as in the paper)."""
        radius = best_norm.clone()
        if eps is not None:
            radius = torch.minimum(radius, eps)
        radius = torch.where(torch.isfinite(radius), radius, torch.full_like(radius, {"linf": 0.1, "l2": 1.0, "l1": 5.0}[self.norm])) / 2
        return norms.random_start(x, radius, self.norm, self.bounds)


class FAB(FABT):
    """Untargeted FAB: every iterate steps to the closest linearised boundary of any other class (one gradient per
    class and iterate, so K times FAB-T's cost per pass, in one pass instead of n_target_classes)."""

    def __init__(
        self,
        norm: str = "linf",
        n_iter: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        minimal: bool = False,
        **kwargs,
    ):
        super().__init__(norm=norm, n_iter=n_iter, n_target_classes=1, restarts=restarts, alpha_max=alpha_max, eta=eta, beta=beta, minimal=minimal, **kwargs)

    @property
    def name(self) -> str:
        return "fab"

    def _targets(self, logits):
        return [logits.argmax(dim=1)]  # a placeholder: _boundary picks the class at each iterate

    def _boundary(self, model, x, y, t):
        x = x.detach().requires_grad_(True)
        logits = model(x)
        diff = logits - logits.gather(1, y[:, None])  # Z_l - Z_y for every class l
        grads = torch.stack(
            [torch.autograd.grad(diff[:, k].sum(), x, retain_graph=k < diff.shape[1] - 1)[0] for k in range(diff.shape[1])], dim=1
        )  # (B, K, ...)
        flat = grads.flatten(2)
        dual = {"linf": lambda: flat.abs().sum(dim=2), "l2": lambda: flat.norm(dim=2), "l1": lambda: flat.abs().amax(dim=2)}[self.norm]()
        distance = diff.detach().abs() / dual.clamp_min(1e-12)
        distance.scatter_(1, y[:, None], math.inf)  # not the label's own "boundary"
        s = distance.argmin(dim=1)
        rows = torch.arange(len(x), device=x.device)
        return diff.detach()[rows, s], grads[rows, s].detach(), logits.argmax(dim=1).detach() != y
