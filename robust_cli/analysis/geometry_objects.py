"""Classifiers whose decision boundary is known exactly (Bell Part III, section 30): test objects for `boundary`.

All of them take `(input_shape, num_classes, **params)` like the model zoo, flatten the input to R^n
(n = prod(input_shape)) and return logits whose top-2 margin is simple:

- `ThetaWedge` (Definition 30.8) and its special case `Orthant` (Definition 30.7, all angles 0):
  class 1 inside the convex cone, class 0 outside; logits (-s/2, s/2) with s the signed Euclidean distance to
  the boundary, so the margin is exactly the distance. `project(x)` is the exact Euclidean projection onto the
  closed cone and `project_to_boundary(x)` the exact nearest point on its boundary.
- `Voronoi` (section 30.1): a 1-nearest-neighbour classifier; class score -||x - site||^2 / 2 of the class's
  nearest site, so between two sites a and b the margin x.(a - b) + (|b|^2 - |a|^2)/2 is linear and the
  boundary is their bisecting hyperplane, normal a - b.

Extra classes (num_classes > 2 for the cones) get a logit strictly below both real ones, so argmax and the
top-2 margin only ever see classes 0 and 1; this lets `model=orthant` run with any dataset's class count.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from robust_cli.core.errors import UserError


def _n_inputs(input_shape) -> int:
    return int(math.prod(input_shape))


class ThetaWedge(nn.Module):
    """Bell's k-Theta wedge: {x : x_1 > 0 and x_i > x_1 tan(theta_{i-1}) for 1 < i <= k}, theta in degrees
    (a list of k - 1 angles, or one number used for every face).

    With all thetas 0 it is the k-orthant; larger thetas tip the faces towards e_1 and make the cone more acute.
    The seed leaves the range open: we take 0 <= theta < 90 degrees (the cone stays convex with a nonempty
    interior, and its projection has the closed form below).
    """

    def __init__(self, input_shape, num_classes=2, k=1, thetas=None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.n = _n_inputs(self.input_shape)
        self.k = int(k)
        if not 1 <= self.k <= self.n:
            raise UserError(f"model.k must be between 1 and the input dimension {self.n}, got {k}")
        if int(num_classes) < 2:
            raise UserError(f"a wedge/orthant classifier needs at least 2 classes, got num_classes={num_classes}")
        self.num_classes = int(num_classes)
        if thetas is None or isinstance(thetas, (int, float)):  # one angle for every tipped face
            thetas = [float(thetas or 0.0)] * (self.k - 1)
        thetas = [float(t) for t in thetas]
        if len(thetas) != self.k - 1:
            raise UserError(f"model.thetas needs k - 1 = {self.k - 1} angles (degrees), got {len(thetas)}")
        if any(not 0.0 <= t < 90.0 for t in thetas):
            raise UserError(f"model.thetas must lie in [0, 90) degrees, got {thetas}")
        self.thetas = thetas
        # slopes a_i = tan(theta_{i-1}) of the constraints x_i >= a_i x_1, i = 2..k
        self.register_buffer("slopes", torch.tan(torch.deg2rad(torch.tensor(thetas, dtype=torch.float64))))

    # --- geometry -------------------------------------------------------------------------------------
    def face_normals(self, dtype=torch.float64) -> torch.Tensor:
        """(k, n) unit inward normals N_j of the faces: e_1 and (e_i - a_i e_1) / sqrt(1 + a_i^2)."""
        normals = torch.zeros(self.k, self.n, dtype=dtype, device=self.slopes.device)
        normals[0, 0] = 1.0
        a = self.slopes.to(dtype)
        idx = torch.arange(1, self.k, device=a.device)
        normals[idx, idx] = 1.0 / torch.sqrt(1 + a * a)
        normals[idx, 0] = -a / torch.sqrt(1 + a * a)
        return normals

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection onto the closed wedge, batched.

        With y_1 = t >= 0 fixed, the best y_i is max(x_i, a_i t); what remains is the convex 1-D problem
        min_t (t - x_1)^2 + sum_i max(0, a_i t - x_i)^2, whose derivative is piecewise linear and nondecreasing
        with breakpoints b_i = x_i / a_i. The root lies on the segment after the J breakpoints where the
        derivative is still negative, where it is linear: t = (x_1 + sum_J a_i x_i) / (1 + sum_J a_i^2).
        """
        flat = x.reshape(len(x), self.n)
        x1, xs = flat[:, 0], flat[:, 1 : self.k]
        a = self.slopes.to(flat.dtype)
        if self.k > 1:
            positive = a > 0
            breaks = torch.where(positive, xs / torch.where(positive, a, 1), torch.full_like(xs, math.inf))
            breaks, order = breaks.sort(dim=1)
            a_sorted, x_sorted = a[order], xs.gather(1, order)
            zero = flat.new_zeros(len(flat), 1)
            # cumulative sums over the first j sorted constraints, j = 0..k-1
            sum_aa = torch.cat([zero, (a_sorted * a_sorted).cumsum(1)], 1)
            sum_ax = torch.cat([zero, (a_sorted * x_sorted).cumsum(1)], 1)
            # derivative/2 at breakpoint j (active: the j before it): negative on a prefix because it is monotone
            slope_at_break = breaks * (1 + sum_aa[:, :-1]) - x1[:, None] - sum_ax[:, :-1]
            n_active = (slope_at_break < 0).sum(1, keepdim=True)
            t = (x1 + sum_ax.gather(1, n_active)[:, 0]) / (1 + sum_aa.gather(1, n_active)[:, 0])
        else:
            t = x1
        t = t.clamp(min=0)
        out = flat.clone()
        out[:, 0] = t
        if self.k > 1:
            out[:, 1 : self.k] = torch.maximum(xs, a * t[:, None])
        return out.reshape(x.shape)

    def project_to_boundary(self, x: torch.Tensor) -> torch.Tensor:
        """Exact nearest point on the boundary: the projection for points outside; for points inside, the foot on
        the nearest face plane (the distance from inside a polyhedron to its boundary is the least face distance)."""
        flat = x.reshape(len(x), self.n)
        heights = flat @ self.face_normals(flat.dtype).T  # (B, k) distances to the face planes
        inside = (heights > 0).all(1)
        nearest = heights.argmin(1)
        foot = flat - heights.gather(1, nearest[:, None]) * self.face_normals(flat.dtype)[nearest]
        return torch.where(inside[:, None], foot, self.project(flat).reshape(flat.shape)).reshape(x.shape)

    def signed_distance(self, x: torch.Tensor) -> torch.Tensor:
        """Distance to the boundary, positive inside, negative outside (1-Lipschitz, continuous)."""
        flat = x.reshape(len(x), self.n)
        heights = flat @ self.face_normals(flat.dtype).T
        inside = (heights > 0).all(1)
        outside_distance = (flat - self.project(flat)).norm(dim=1)
        return torch.where(inside, heights.min(1).values, -outside_distance)

    def forward(self, x):
        s = self.signed_distance(x)
        logits = torch.stack([-s / 2, s / 2], dim=1)
        if self.num_classes > 2:  # unused classes: always strictly below both cone classes
            logits = torch.cat([logits, (-s.abs() / 2 - 1)[:, None].expand(-1, self.num_classes - 2)], 1)
        return logits

    # --- crossing paths (Definition 30.9) -----------------------------------------------------------
    def centerline(self, t: torch.Tensor) -> torch.Tensor:
        """Points x_1 = t, x_i = t tan(45 deg + theta_{i-1}/2) (1 < i <= k), x_i = 0 (i > k).

        The seed prints tan(theta/2), which for the orthant (theta = 0) would run along the faces; we read theta/2
        as half the face angle measured from the diagonal, i.e. the bisector of each 2-D section of the wedge
        (x_i = t on the orthant: the diagonal). The line enters the cone at the apex (t = 0).
        """
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        out = torch.zeros(len(t), self.n, dtype=torch.float64)
        out[:, 0] = t
        if self.k > 1:
            out[:, 1 : self.k] = t[:, None] * torch.tan(math.pi / 4 + torch.atan(self.slopes.cpu()) / 2)
        return out.reshape(len(t), *self.input_shape)

    def parallel(self, t: torch.Tensor, epsilon: float) -> torch.Tensor:
        """The x-epsilon-parallel crossing: x_1 = t, x_i = epsilon for every i > 1 (crosses the face x_1 = 0 at
        distance ~epsilon from the apex)."""
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        out = torch.full((len(t), self.n), float(epsilon), dtype=torch.float64)
        out[:, 0] = t
        return out.reshape(len(t), *self.input_shape)


class Orthant(ThetaWedge):
    """Bell's k-orthant (Definition 30.7): {x : x_i > 0 for i <= k}; the wedge with every angle 0. Its boundary
    near the apex is k mutually orthogonal faces, so projected samples lose spread in exactly k directions."""

    def __init__(self, input_shape, num_classes=2, k=1):
        super().__init__(input_shape, num_classes, k=k, thetas=None)


class Voronoi(nn.Module):
    """1-nearest-neighbour classifier (Bell section 30.1): the class of the nearest site.

    `sites` (m, n) and `labels` (m,) may be given; otherwise `n_sites` sites are drawn uniformly in [0, 1]^n from
    `seed` with labels cycling through the classes (so every class has a site).
    """

    def __init__(self, input_shape, num_classes, n_sites=20, seed=0, sites=None, labels=None):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        n = _n_inputs(self.input_shape)
        if sites is None:
            if int(n_sites) < int(num_classes):
                raise UserError(f"model.n_sites must be at least num_classes={num_classes}, got {n_sites}")
            gen = torch.Generator().manual_seed(int(seed))
            sites = torch.rand(int(n_sites), n, generator=gen, dtype=torch.float64)
            labels = torch.arange(int(n_sites)) % int(num_classes)
        sites = torch.as_tensor(sites, dtype=torch.float64).reshape(-1, n)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(labels) != len(sites) or labels.min() < 0 or labels.max() >= int(num_classes):
            raise UserError("model.labels must give one class in [0, num_classes) per site")
        if len(torch.unique(labels)) != int(num_classes):
            raise UserError("every class needs at least one Voronoi site (give more sites or fewer classes)")
        self.num_classes = int(num_classes)
        self.register_buffer("sites", sites)
        self.register_buffer("labels", labels)

    def forward(self, x):
        flat = x.reshape(len(x), -1).to(self.sites.dtype)
        half_sq = (flat[:, None, :] - self.sites[None]).pow(2).sum(-1) / 2  # (B, m); exact squares keep the margin linear
        own = self.labels[None, :] == torch.arange(self.num_classes, device=flat.device)[:, None]  # (C, m)
        scores = (-half_sq[:, None, :]).masked_fill(~own[None], -math.inf).amax(-1)  # nearest site of each class
        return scores.to(x.dtype)
