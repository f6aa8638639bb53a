"""Square Attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial attack via
random search"), linf and l2: score-based random search that uses no gradient, so gradient masking cannot stop it.

Each iteration changes one random square window of side s = round(sqrt(p * h * w)) (p follows the paper's halving
schedule, rescaled to `n_queries`) and keeps the change only where it lowers the margin loss
Z_y - max_{i != y} Z_i (targeted: max_{i != t} Z_i - Z_t). An example stops as soon as it is misclassified.
  linf (Algorithm 2): start from vertical stripes of +-eps; the window gets one random +-eps per channel.
  l2   (Algorithm 3): start from a grid of "meta pseudo-Gaussian" squares of total norm eps; the window gets a new
                      pattern, a second window gives its share of the budget, the whole stays on the eps-sphere.
  l1   (Croce & Hein's l1 version in AutoAttack): as l2 with the sharper l1 pattern, the start and every candidate
                      projected exactly onto the l1-ball and the box instead of rescaled.
Inputs that are not images (C, H, W) are treated as one channel of height 1.
"""

from __future__ import annotations

import math

import torch

from robust_cli.attacks import norms
from robust_cli.attacks.base import Attack
from robust_cli.attacks.gradient import _positive_int
from robust_cli.core.errors import UserError

# the paper's schedule for 10,000 queries: p is halved after these iterations
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_at(iteration: int, n_queries: int, p_init: float, rescale: bool = True) -> float:
    """p_init halved once for each of the paper's checkpoints passed (rescaled from 10,000 queries, or not:
    AutoAttack keeps the checkpoints at the same iterations whatever the budget)."""
    i = int(iteration / n_queries * 10000) if rescale else iteration
    return p_init / 2 ** sum(i > h for h in _HALVINGS)


def _window_side(p: float, h: int, w: int) -> tuple[int, int, int]:
    """(side s, rows, columns) of the l2 / l1 windows covering the fraction p of the image: odd, at least 3 when the
    image allows it, cut to the image."""
    s = max(int(round(math.sqrt(p * h * w))), 3 if min(h, w) >= 3 else 1)
    if s % 2 == 0:
        s += 1
    return s, min(s, h), min(s, w)


def _window(n, h, w, sh, sw, device, mask=True, last=True):
    """A random sh x sw window per example: its rows (n, sh), columns (n, sw) and, unless mask=False, its mask
    (n, 1, h, w). The corner is drawn from 0..h - sh (the paper); last=False leaves the last position out (the
    authors' l1 code: the image's last row and column are never in a window)."""
    vh = torch.randint(0, max(h - sh + int(last), 1), (n,), device=device)
    vw = torch.randint(0, max(w - sw + int(last), 1), (n,), device=device)
    rows = vh[:, None] + torch.arange(sh, device=device)
    cols = vw[:, None] + torch.arange(sw, device=device)
    if not mask:
        return rows, cols, None
    inside = torch.zeros(n, 1, h, w, dtype=torch.bool, device=device)
    inside[torch.arange(n, device=device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]] = True
    return rows, cols, inside


def _rectangles(rows: int, cols: int, device, power: int = 2) -> torch.Tensor:
    """Concentric rectangles of weight 1/(r+1)^power around the centre (rows // 2, cols // 2), out to the window's
    edges: the paper's pseudo-Gaussian (power 2, unit l2 norm); the l1 version is sharper (power 4, unit l1 norm)."""
    delta = torch.zeros(rows, cols, device=device)
    cx, cy = rows // 2, cols // 2
    for r in range(max(cx, cy) + 1):
        delta[max(cx - r, 0) : min(cx + r + 1, rows), max(0, cy - r) : min(cy + r + 1, cols)] += 1.0 / (r + 1) ** power
    return _unit(delta, power)


def _unit(delta: torch.Tensor, power: int) -> torch.Tensor:
    size = delta.abs().sum() if power == 4 else delta.square().sum().sqrt()
    return delta / size.clamp_min(1e-12)


def meta_pattern(s: int, device, generator=None, norm: str = "l2") -> torch.Tensor:
    """An s x s window: + pseudo-Gaussian on one half, - on the other, unit norm (l2, or l1 with the sharper
    rings), transposed half the time."""
    power = 4 if norm == "l1" else 2
    delta = torch.zeros(s, s, device=device)
    delta[: s // 2] = _rectangles(s // 2, s, device, power)
    delta[s // 2 :] = -_rectangles(s - s // 2, s, device, power)
    delta = _unit(delta, power)
    if torch.rand(1, generator=generator).item() > 0.5:
        delta = delta.t()
    return delta


class Square(Attack):
    """Budgeted score-based attack; `n_queries` model evaluations at most per example (5000, the paper's value)."""

    def __init__(self, norm: str = "linf", n_queries: int = 5000, p_init: float | None = None, restarts: int = 1, rescale_schedule: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.norm = norms.check_norm(norm, norms.L1_NORMS)
        self.n_queries = _positive_int("n_queries", n_queries)
        # the paper's ImageNet values; l1 has no paper value: AutoAttack's 0.8
        p_init = {"linf": 0.05, "l2": 0.1, "l1": 0.8}[self.norm] if p_init is None else float(p_init)
        if not 0 < p_init <= 1:
            raise UserError(f"square p_init must be in (0, 1], got {p_init!r}")
        self.p_init = p_init
        self.rescale_schedule = bool(rescale_schedule)
        self.restarts = _positive_int("restarts", restarts)
        self.loss = "margin"  # the base class's logit margin, ascended there, lowered here

    def margin(self, logits, y, target):
        """Loss to lower; < 0 exactly when the example is adversarial."""
        return -self.attack_loss(logits, y, target)

    @torch.no_grad()
    def perturb(self, model, x, y, eps, target):
        shape = x.shape
        img = x.reshape(len(x), 1, 1, -1) if x.dim() != 4 else x
        best = img.clone()
        done = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.restarts):
            todo = (~done).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            t = None if target is None else target[todo]
            fwd = (lambda z: model(z.reshape(-1, *shape[1:]))) if x.dim() != 4 else model
            x_r, ok = self.single_run(fwd, img[todo], y[todo], norms.per_example_slice(eps, todo), t)
            best[todo] = x_r
            done[todo[ok]] = True
        return best.reshape(shape)

    def single_run(self, model, x, y, eps, target):
        n, c, h, w = x.shape
        eps_b = torch.ones(n, 1, 1, 1, device=x.device, dtype=x.dtype) * norms.per_example(eps, x)  # (n, 1, 1, 1)
        if self.norm == "linf":
            stripes = torch.randint(0, 2, (n, c, 1, w), device=x.device).to(x.dtype) * 2 - 1
            x_best = norms.clip_box(x + eps_b * stripes, self.bounds)
        elif self.norm == "l2":
            x_best = norms.clip_box(x + self._l2_init(x) * eps_b, self.bounds)
        else:
            x_best = norms.project_l1_box(x, x + self._l1_init(x), eps_b.reshape(n) * (1 - 1e-6), self.bounds)
        margin = self.margin(model(x_best), y, target)
        # the examples still running, gathered once and again only when some finish (not every iteration)
        active = (margin > 0).nonzero().squeeze(1)
        xa, xb, ya, ea_b, ma = x[active], x_best[active], y[active], eps_b[active], margin[active]
        ta = None if target is None else target[active]
        for i in range(self.n_queries - 1):
            if len(active) == 0:
                break
            p = p_at(i, self.n_queries, self.p_init, self.rescale_schedule)
            step = {"linf": self._linf_step, "l2": self._l2_step, "l1": self._l1_step}[self.norm]
            candidate = step(xa, xb, ea_b, p)
            m_new = self.margin(model(candidate), ya, ta)
            better = (m_new < ma).nonzero().squeeze(1)
            if len(better) == 0:
                continue
            xb[better], ma[better] = candidate[better], m_new[better]
            if bool((ma[better] <= 0).any()):  # some are adversarial now: they stop
                x_best[active], margin[active] = xb, ma
                keep = (ma > 0).nonzero().squeeze(1)
                active, xa, xb, ya, ea_b, ma = active[keep], xa[keep], xb[keep], ya[keep], ea_b[keep], ma[keep]
                ta = None if ta is None else ta[keep]
        x_best[active], margin[active] = xb, ma
        return x_best, margin <= 0

    # ----------------------------------------------------------------------------------- linf (Algorithm 2)
    def _linf_step(self, x, x_best, eps_b, p):
        """eps_b: (n, 1, 1, 1). The window gets one random +-eps per channel; a draw that would leave the window as
        it is (a wasted query) is drawn again, as the authors' code does. Only the window's pixels are computed."""
        n, c, h, w = x.shape
        s = min(max(int(round(math.sqrt(p * h * w))), 1), max(h, w))
        sh, sw = min(s, h), min(s, w)
        rows, cols, _ = _window(n, h, w, sh, sw, x.device, mask=False)
        pixels = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, sh * sw).expand(n, c, sh * sw)
        x_win = x.reshape(n, c, h * w).gather(2, pixels)
        current = x_best.reshape(n, c, h * w).gather(2, pixels)
        sign = torch.randint(0, 2, (n, c, 1), device=x.device).to(x.dtype) * 2 - 1
        value = norms.clip_box(x_win + sign * eps_b.reshape(n, 1, 1), self.bounds)
        for _ in range(10):  # with one channel the redraw is the other sign; bounded so a stuck window cannot hang
            same = ((value - current).abs() < 1e-7).flatten(1).all(dim=1).nonzero().squeeze(1)
            if len(same) == 0:
                break
            sign[same] = torch.randint(0, 2, (len(same), c, 1), device=x.device).to(x.dtype) * 2 - 1 if c > 1 else -sign[same]
            value[same] = norms.clip_box(x_win[same] + sign[same] * eps_b[same].reshape(-1, 1, 1), self.bounds)
        candidate = x_best.clone()
        candidate.reshape(n, c, h * w).scatter_(2, pixels, value)
        return candidate

    # ----------------------------------------------------------------------------------- l2 (Algorithm 3)
    def _l2_init(self, x):
        """Unit-L2 initial perturbation: a grid of meta patterns of side h // 5 with random signs per channel."""
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        for i in range(0, h - s + 1, s):
            for j in range(0, w - s + 1, s):
                sign = torch.randint(0, 2, (n, c, 1, 1), device=x.device).to(x.dtype) * 2 - 1
                delta[:, :, i : i + s, j : j + s] = meta_pattern(s, x.device).to(x.dtype) * sign
        if not delta.abs().sum():
            delta = torch.randn_like(x)
        return delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)

    def _l2_step(self, x, x_best, eps_b, p):
        n, c, h, w = x.shape
        s, sh, sw = _window_side(p, h, w)
        delta = x_best - x
        ar = torch.arange(n, device=x.device)[:, None, None]
        r1, c1, mask1 = _window(n, h, w, sh, sw, x.device)
        _, _, mask2 = _window(n, h, w, sh, sw, x.device)
        mask1, mask2 = mask1.to(x.dtype), mask2.to(x.dtype)
        both = torch.maximum(mask1, mask2)
        norm_total = delta.flatten(1).norm(dim=1).reshape(n, 1, 1, 1)
        norm_windows = (delta * both).square().sum(dim=(2, 3), keepdim=True).sqrt()  # per channel
        # the new window: a fresh meta pattern with random sign per channel plus the old window's direction
        in_window1 = (
            ar[:, :, :, None].expand(n, c, 1, 1),
            torch.arange(c, device=x.device)[None, :, None, None],
            r1[:, None, :, None],
            c1[:, None, None, :],
        )  # indexes delta's (n, c, sh, sw) window 1
        old = delta[in_window1]
        old_norm = old.square().sum(dim=(2, 3), keepdim=True).sqrt()
        pattern = meta_pattern(s, x.device).to(x.dtype)[:sh, :sw]
        sign = torch.randint(0, 2, (n, c, 1, 1), device=x.device).to(x.dtype) * 2 - 1
        new = pattern * sign + old / (old_norm + 1e-12)
        budget = ((eps_b**2 - norm_total**2).clamp_min(0) / c + norm_windows**2).sqrt()
        new = new / new.square().sum(dim=(2, 3), keepdim=True).sqrt().clamp_min(1e-12) * budget
        delta = delta * (1 - mask2)  # window 2 gives its budget to window 1
        delta[in_window1] = new
        delta = delta / delta.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(n, 1, 1, 1) * eps_b
        candidate = norms.clip_box(x + delta, self.bounds)
        # rounding may push the norm a hair over eps: project back
        return norms.projector(x, eps_b.reshape(n), "l2", self.bounds)(candidate)

    # ----------------------------------------------------------------------------------- l1
    def _l1_init(self, x):
        """A grid of l1 meta patterns of side h // 5, centred, random sign per channel (each of unit l1 norm: the
        projection onto the ball then spends eps on the largest entries)."""
        n, c, h, w = x.shape
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        top, left = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
        for i in range(top, h - s + 1, s):
            for j in range(left, w - s + 1, s):
                sign = torch.randint(0, 2, (n, c, 1, 1), device=x.device).to(x.dtype) * 2 - 1
                delta[:, :, i : i + s, j : j + s] = meta_pattern(s, x.device, norm="l1").to(x.dtype) * sign
        if not delta.abs().sum():
            delta = torch.randn_like(x)
        return delta

    def _l1_step(self, x, x_best, eps_b, p):
        """Window 1 gets a fresh l1 pattern plus its old direction, with the l1 mass of both windows and the budget
        still unspent; window 2 is cleared; the candidate is projected onto the ball and the box."""
        n, c, h, w = x.shape
        s, sh, sw = _window_side(p, h, w)
        delta = x_best - x
        ar = torch.arange(n, device=x.device)[:, None, None]
        # the authors' corners (0..h - s - 1): on MNIST the border pixels only waste l1 budget (l1 eps 10, 1000
        # queries, fc200: robust accuracy 0.68-0.69 as theirs, 0.71 with the paper's 0..h - s)
        r1, c1, mask1 = _window(n, h, w, sh, sw, x.device, last=False)
        _, _, mask2 = _window(n, h, w, sh, sw, x.device, last=False)
        both = torch.maximum(mask1, mask2).to(x.dtype)
        norm_total = delta.flatten(1).abs().sum(dim=1).reshape(n, 1, 1, 1)
        norm_windows = (delta * both).abs().sum(dim=(2, 3), keepdim=True)  # per channel
        in_window1 = (ar[:, :, :, None].expand(n, c, 1, 1), torch.arange(c, device=x.device)[None, :, None, None], r1[:, None, :, None], c1[:, None, None, :])
        old = delta[in_window1]
        old_norm = old.abs().sum(dim=(2, 3), keepdim=True)
        pattern = meta_pattern(s, x.device, norm="l1").to(x.dtype)[:sh, :sw]
        sign = torch.randint(0, 2, (n, c, 1, 1), device=x.device).to(x.dtype) * 2 - 1
        new = pattern * sign + old / (old_norm + 1e-12)
        # the authors' budget: the unspent eps shared over the channels plus the windows' mass, times the channels
        budget = ((eps_b - norm_total).clamp_min(0) / c + norm_windows) * c
        new = new / new.abs().sum(dim=(2, 3), keepdim=True).clamp_min(1e-12) * budget
        delta = delta * (1 - mask2.to(x.dtype))
        delta[in_window1] = new
        return norms.project_l1_box(x, x + delta, eps_b.reshape(n) * (1 - 1e-6), self.bounds)
