"""Discrete path kernel (Bell, Part II: Definition 14.3, Theorem 14.5, Remarks 0-3, appendix 17.2 and 17.4).

A network trained by forward Euler moves its weights along straight segments
    w_s(t) = w_s + t (w_{s+1} - w_s),  t in [0, 1],   w_{s+1} - w_s = -eps grad_w L(w_s) = sum_i J_s(x_i)^T a_{i,s},
with J_w(x) = d yhat_w(x) / dw (K x d) and a_{i,s} = -eps dL/dyhat_i (a K-vector per training point; when L is a mean
over the batch, the 1/M is inside a). The fundamental theorem of calculus along each segment gives, for every x,
    yhat_N(x) = b + sum_s sum_i K_s(x, x_i) a_{i,s},   K_s(x, x_i) = int_0^1 J_{w_s(t)}(x) J_{w_s}(x_i)^T dt   (K x K),
exact when yhat_{w_0} == b is constant (zero last layer, Remark 2). The K x K block couples the classes: this is
appendix 17.4 case 1 (scalar loss of a vector output); the per-class diagonal of 17.5 drops the cross terms and is
not exact for softmax cross-entropy.

The t-integral is Gauss-Legendre quadrature. Query side variants (Remark 1):
  * "dpk"        Definition 14.3 as written: the query side is integrated over t unless the query is itself a
                 training point (then it sits at w_s). A symmetric PSD kernel (Lemma 14.4); exact off the training set.
  * "continuous" k' of eq. 16: the query side is always integrated. Exact everywhere, not symmetric.
  * "tangent"    both sides at w_s: the eps -> 0 limit of Remark 3 (a per-step tangent kernel); error O(eps).

Nothing d x M is ever built for a prediction: sum_i J_s(x_i)^T a_{i,s} is one vector-Jacobian product over the
training set (v_s), and each quadrature node costs one Jacobian-vector product of the query batch along v_s.
Per-training-point values use per-query Jacobians (Q x K x d) pushed through the training set by batched JVPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import jacrev, jvp, vmap

from robust_cli.analysis.training_path import TrainingPath, gauss_legendre
from robust_cli.core.errors import UserError

VARIANTS = ("dpk", "continuous", "tangent")


@dataclass
class KernelValues:
    """Per-training-point kernel of queries x_q, summed over steps, for query-side output rows r:
    values[q, i, r, c] = sum_s K_s(x_q, x_i)[rows[q, r], c]; contributions[q, i, r] = sum_s sum_c K_s[rows[q, r], c]
    a_{i,s,c}, which sums over i to yhat_k(x_q) - b_k for k = rows[q, r]. rows is every class (R = K) by default."""

    values: torch.Tensor  # (Q, M, R, K)
    contributions: torch.Tensor  # (Q, M, R)
    rows: torch.Tensor  # (Q, R) long: the query-side class of each row

    @property
    def diagonal(self) -> torch.Tensor:
        """K(x_q, x_i)[k, k] for each computed row k: (Q, M, R), the same output on both sides."""
        index = self.rows[:, None, :, None].expand(-1, self.values.shape[1], -1, 1)
        return self.values.gather(3, index).squeeze(3)

    @property
    def trace(self) -> torch.Tensor:
        """Scalar kernel sum_k K[k, k] = sum_s <J(x_q), J(x_i)>_F (a sum of kernels, so a kernel): (Q, M).
        Needs every row (values() without `classes`)."""
        if self.values.shape[2] != self.values.shape[3]:
            raise ValueError("trace needs every class row: call values() without classes")
        return self.diagonal.sum(-1)


class DiscretePathKernel:
    """The kernel machine of a recorded TrainingPath.

    `quadrature_points` Gauss-Legendre nodes per step for the t-integral; `variant` one of VARIANTS (module doc);
    `chunk` bounds how many weight states / tangents are batched in one vmap (memory ~ chunk x batch activations).
    """

    def __init__(
        self, path: TrainingPath, quadrature_points: int = 16, variant: str = "dpk", tolerance: float | None = None, max_depth: int = 40, chunk: int = 32
    ):
        if variant not in VARIANTS:
            raise UserError(f"kernel variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if tolerance is not None and tolerance <= 0:
            raise UserError(f"kernel tolerance must be > 0 (or null for the fixed rule), got {tolerance}")
        self.path, self.variant, self.chunk = path, variant, int(chunk)
        self.tolerance, self.max_depth = tolerance, int(max_depth)
        self.f = path.flat
        self.nodes, self.node_weights = gauss_legendre(quadrature_points, path.weights.dtype, path.weights.device)
        self._directions = None
        self._train_norms = {}
        self._last = None

    # ---- pieces -------------------------------------------------------------------------------------------
    @property
    def directions(self) -> torch.Tensor:
        """v_s = sum_i J_{w_s}(x_i)^T a_{i,s} (N, d): one VJP per step over the training set. Equals w_{s+1} - w_s
        up to rounding exactly when the path was trained by the theorem's steps. (A loop: vmap over weight states
        is ~10x slower than looping on CPU, unlike vmap over inputs or tangents.)"""
        if self._directions is None:
            p = self.path
            rows = []
            with torch.enable_grad():
                for w, a in zip(p.weights[:-1], p.coefficients):
                    w = w.detach().requires_grad_(True)
                    rows.append(torch.autograd.grad(self.f(w, p.train_x), w, a)[0])
            self._directions = torch.stack(rows)
        return self._directions

    def _at_left_endpoint(self, x: torch.Tensor) -> torch.Tensor:
        """Which queries take the query side at w_s instead of integrating over the segment: (Q,) bool."""
        if self.variant == "tangent":
            return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if self.variant == "continuous":
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        # dpk: w_s(t, x) = w_s for x in X_T (eq. 14); exact row match, computed without matmul rounding
        d = torch.cdist(x.flatten(1), self.path.train_x.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
        return (d == 0).any(1)

    def _states(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight states w_s(t_j) at the quadrature nodes of step s and their weights."""
        w0, w1 = self.path.weights[s], self.path.weights[s + 1]
        return w0 + self.nodes[:, None] * (w1 - w0), self.node_weights

    def _rows(self, w, x, selector):
        """Per-sample Jacobian rows selector[b] @ J_w(x_b): (B, R, d); selector (B, R, K) picks output rows."""
        one = lambda w_, xi, sel: sel @ self.f.single(w_, xi)
        in_w = 0 if w.dim() == 2 else None
        return vmap(jacrev(one), in_dims=(in_w, 0, 0))(w, x, selector)

    def _query_features(self, s: int, x: torch.Tensor, left: torch.Tensor, pieces, selector) -> torch.Tensor:
        """Phi_s(x) (Q, R, d): int_0^1 J_{w_s(t)}(x) dt by quadrature, or J_{w_s}(x) for `left` rows, for the output
        rows `selector` picks. `pieces` (from _refine, query indices into x[~left]) replace the fixed rule there."""
        phi = self._rows(self.path.weights[s], x, selector)
        if not bool(left.all()):
            inner = (~left).nonzero().squeeze(1)
            states, omega = self._states(s)
            phi[inner] = sum(o * self._rows(w, x[inner], selector[inner]) for w, o in zip(states, omega))
            if pieces is not None:
                here = pieces[0] == s
                queries, lo, hi = pieces[1][here], pieces[2][here], pieces[3][here]
                if queries.numel():
                    q = self.nodes.numel()
                    t, weight = self._nodes_of(lo, hi)
                    jac = self._over_states(
                        lambda w, _, xs, sel: self._rows(w, xs, sel),
                        torch.full_like(queries, s).repeat_interleave(q),
                        t,
                        x[inner[queries]].repeat_interleave(q, 0),
                        selector[inner[queries]].repeat_interleave(q, 0),
                        size=self.chunk,
                    )
                    rebuilt = torch.zeros_like(phi[inner])
                    rebuilt.index_add_(0, queries.repeat_interleave(q), weight[:, None, None] * jac)
                    refined = torch.unique(queries)
                    phi[inner[refined]] = rebuilt[refined]
        return phi

    # ---- the kernel machine -------------------------------------------------------------------------------
    def network_output(self, x: torch.Tensor) -> torch.Tensor:
        """yhat_{w_N}(x), the trained network itself: (Q, K)."""
        with torch.no_grad():
            return self.f(self.path.weights[-1], x.to(self.path.weights))

    def _push(self, w: torch.Tensor, direction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """J_w(x) direction for a batch x (one JVP)."""
        return jvp(lambda w_: self.f(w_, x), (w,), (direction,))[1]

    def _over_states(self, fn, steps, t, *items, size=None):
        """fn(states, steps, *items) over chunks of (step, t, item) rows, the weight states w_s + t (w_{s+1} - w_s)
        built one chunk at a time (a chunk holds ~2^22 parameter values, at least `chunk` states)."""
        w = self.path.weights
        size = size or max(self.chunk, 2**22 // self.f.size)
        out = []
        for idx in torch.arange(len(steps), device=steps.device).split(size):
            s = steps[idx]
            states = w[s] + t[idx, None] * (w[s + 1] - w[s])
            out.append(fn(states, s, *(item[idx] for item in items)))
        return torch.cat(out)

    def _nodes_of(self, lo, hi):
        """Gauss-Legendre nodes and weights of the pieces [lo, hi]: (P q,), (P q,)."""
        t = (lo[:, None] + (hi - lo)[:, None] * self.nodes).flatten()
        return t, ((hi - lo)[:, None] * self.node_weights).flatten()

    def _pieces(self, steps, queries, lo, hi, x):
        """Quadrature of int_lo^hi J_{w_s(t)}(x_q) v_s dt for a batch of (step, query, lo, hi) pieces: (P, K)."""
        q = self.nodes.numel()
        t, omega = self._nodes_of(lo, hi)
        push1 = vmap(lambda w, d, xi: self._push(w, d, xi.unsqueeze(0)).squeeze(0))
        g = self._over_states(lambda w, s, xs: push1(w, self.directions[s], xs), steps.repeat_interleave(q), t, x[queries.repeat_interleave(q)])
        return (omega[:, None] * g).view(-1, q, g.shape[-1]).sum(1)

    def _outputs_at(self, steps, queries, t, x):
        """yhat_{w_s(t)}(x_q) for a batch of (step, query, t): (P, K)."""
        return self._over_states(lambda w, s, xs: vmap(self.f.single)(w, xs), steps, t, x[queries])

    def _segment_integrals(self, x: torch.Tensor) -> torch.Tensor:
        """Fixed-rule quadrature of every step for every query: (N, Q, K), one JVP of the query batch per
        (step, node) weight state."""
        p = self.path
        out = torch.zeros(p.steps, x.shape[0], p.bias.numel(), dtype=x.dtype, device=x.device)
        for s in range(p.steps):
            states, omega = self._states(s)
            for w, o in zip(states, omega):
                out[s] += o * self._push(w, self.directions[s], x)
        return out

    def _refine(self, x: torch.Tensor, integrals: torch.Tensor):
        """Adaptive bisection where the fixed rule misses a kink (ReLU switching along the segment).

        The exact scalar integral of each piece is known: int_a^b J_{w_s(t)}(x) dw_s dt = yhat_{w_s(b)}(x) -
        yhat_{w_s(a)}(x), and v_s = dw_s up to rounding. A step whose rule misses it by more than tolerance / N
        is halved, and each half again while it misses by more than tolerance / 2N (up to max_depth times). The
        budget is absolute, not proportional to (b - a): at a jump of the integrand the error only shrinks like
        (b - a), so only the piece holding the kink keeps splitting, and each kink costs ~log2(jump / budget)
        bisections. The kernel output stays a quadrature of the kernel integrand; only its nodes move. Returns corrected integrals and the accepted pieces of refined
        pairs as (steps, queries, lo, hi).
        """
        p = self.path
        n = p.steps
        with torch.no_grad():
            ends = torch.stack([self.f(w, x) for w in p.weights])  # (N+1, Q, K)
        allowance = self.tolerance / n
        bad = ((integrals - (ends[1:] - ends[:-1])).abs().amax(-1) > allowance).nonzero()
        steps, queries = bad[:, 0], bad[:, 1]
        lo, hi = torch.zeros_like(steps, dtype=x.dtype), torch.ones_like(steps, dtype=x.dtype)
        f_lo, f_hi = ends[steps, queries], ends[steps + 1, queries]
        integrals[steps, queries] = 0.0  # refined pairs are rebuilt from their accepted pieces
        accepted = []
        for depth in range(self.max_depth):
            if steps.numel() == 0:
                break
            mid = (lo + hi) / 2
            f_mid = self._outputs_at(steps, queries, mid, x)
            steps, queries = steps.repeat(2), queries.repeat(2)
            lo, hi = torch.cat([lo, mid]), torch.cat([mid, hi])
            f_lo, f_hi = torch.cat([f_lo, f_mid]), torch.cat([f_mid, f_hi])
            quad = self._pieces(steps, queries, lo, hi, x)
            ok = ((quad - (f_hi - f_lo)).abs().amax(-1) <= allowance / 2) | (depth == self.max_depth - 1)
            integrals.index_put_((steps[ok], queries[ok]), quad[ok], accumulate=True)
            accepted.append(torch.stack([steps[ok].to(x.dtype), queries[ok].to(x.dtype), lo[ok], hi[ok]], 1))
            steps, queries, lo, hi, f_lo, f_hi = (t[~ok] for t in (steps, queries, lo, hi, f_lo, f_hi))
        pieces = torch.cat(accepted) if accepted else x.new_zeros(0, 4)
        return integrals, (pieces[:, 0].long(), pieces[:, 1].long(), pieces[:, 2], pieces[:, 3])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel representation b + sum_s sum_i K_s(x, x_i) a_{i,s}: (Q, K), via JVPs along v_s."""
        return self._predict(x)[0].clone()

    def _predict(self, x: torch.Tensor):
        """(prediction, adaptive pieces); the last call is memoised, as values() and kernel_sums() need its pieces."""
        if self._last is not None and self._last[0].shape == x.shape and torch.equal(self._last[0], x.to(self._last[0])):
            return self._last[1], self._last[2]
        out, pieces = self._predict_uncached(x)
        self._last = (x.detach().to(self.path.weights).clone(), out, pieces)
        return out, pieces

    def _predict_uncached(self, x: torch.Tensor):
        p = self.path
        x = x.to(p.weights)
        left = self._at_left_endpoint(x)
        out = p.bias.expand(x.shape[0], -1).clone()
        pieces = None
        with torch.no_grad():
            if bool(left.any()):
                out[left] += sum(self._push(w, v, x[left]) for w, v in zip(p.weights[:-1], self.directions))
        if not bool(left.all()):
            inner = x[~left]
            with torch.no_grad():
                integrals = self._segment_integrals(inner)
            if self.tolerance is not None:
                integrals, pieces = self._refine(inner, integrals)
            out[~left] += integrals.sum(0)
        return out, pieces

    def kernel_sums(self, x: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """sum_i trace K(x, x_i) for every query (Q,): the kernel mass of x on the training set (Figure 21's sums);
        with `classes` (Q,), sum_i K(x, x_i)[k, k] for k = classes[q] instead (K times cheaper).

        The sum over i moves inside the inner product: sum_i <Phi_s(x)[k], J_s(x_i)[k]> = <Phi_s(x)[k], u_{s,k}>
        with u_{s,k} = grad_w sum_i yhat_k(x_i), so it costs K backward passes per step and one JVP of the query
        batch per class and quadrature node, for any number of queries. With a tolerance, steps where the
        prediction was refined (a ReLU switches) are integrated over the same pieces, as in values()."""
        p = self.path
        x = x.to(p.weights)
        n_q, k = x.shape[0], p.coefficients.shape[2]
        rows = torch.arange(k, device=x.device).expand(n_q, k) if classes is None else torch.as_tensor(classes, device=x.device).long().view(n_q, 1)
        left = self._at_left_endpoint(x)
        inner = (~left).nonzero().squeeze(1)
        pieces = self._predict(x)[1] if self.tolerance is not None and inner.numel() else None
        sums = torch.zeros(n_q, dtype=x.dtype, device=x.device)
        summed = jacrev(lambda w: self.f(w, p.train_x).sum(0))
        eye = torch.eye(k, dtype=x.dtype, device=x.device)

        def diagonal(w, u, idx):  # sum over the rows of each query idx of (J_w(x) u_c)[c]: (len(idx),)
            out = torch.zeros(len(idx), dtype=x.dtype, device=x.device)
            r = rows[idx]
            for c in r.unique().tolist():
                has = (r == c).any(1)
                out[has] += self._push(w, u[c], x[idx[has]])[:, c]
            return out

        # one flat vmap over (piece node, row) pairs, each with its own weight state
        one = vmap(lambda w, u_c, xi, e: (self._push(w, u_c, xi.unsqueeze(0)).squeeze(0) * e).sum())
        with torch.no_grad():
            for s in range(p.steps):
                u = summed(p.weights[s])  # (K, d)
                if bool(left.any()):
                    idx = left.nonzero().squeeze(1)
                    sums[idx] += diagonal(p.weights[s], u, idx)
                if not inner.numel():
                    continue
                states, omega = self._states(s)
                step = sum(o * diagonal(w, u, inner) for w, o in zip(states, omega))
                here = pieces[0] == s if pieces is not None else None
                if here is not None and bool(here.any()):
                    queries, lo, hi = pieces[1][here], pieces[2][here], pieces[3][here]
                    q, r = self.nodes.numel(), rows.shape[1]
                    t, weight = self._nodes_of(lo, hi)
                    node_rows = rows[inner[queries]].repeat_interleave(q, 0).flatten()  # (P q r,)
                    vals = self._over_states(
                        lambda w, _, uc, xi, e: one(w, uc, xi, e),
                        torch.full((node_rows.numel(),), s, device=x.device),
                        t.repeat_interleave(r),
                        u[node_rows],
                        x[inner[queries]].repeat_interleave(q * r, 0),
                        eye[node_rows],
                    )
                    vals = vals.view(-1, r).sum(1)
                    rebuilt = torch.zeros_like(step).index_add_(0, queries.repeat_interleave(q), weight * vals)
                    refined = torch.unique(queries)
                    step[refined] = rebuilt[refined]
                sums[inner] += step
        return sums

    def values(self, x: torch.Tensor, classes: torch.Tensor | None = None, progress=None) -> KernelValues:
        """Kernel value of each query to every training point, summed over steps, and each point's contribution.

        `classes` (Q,) computes only the query-side row of that class per query (K times cheaper), e.g. the
        predicted class: its kernel values K[k, c] and the contributions to yhat_k. With a tolerance, the query-side
        integral uses the pieces the adaptive prediction chose, so the contributions sum to predict(x).
        Per step: Phi_s(x_q) (Q, R, d) per-sample Jacobians, contracted with the training set (_against_training).
        Memory O(Q R d + Q M R K). `progress`: advance() per step.
        """
        p = self.path
        x = x.to(p.weights)
        left = self._at_left_endpoint(x)
        pieces = self._predict(x)[1] if self.tolerance is not None else None
        n_q, m, k = x.shape[0], p.train_x.shape[0], p.coefficients.shape[2]
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        rows = torch.arange(k, device=x.device).expand(n_q, k) if classes is None else torch.as_tensor(classes, device=x.device).long().view(n_q, 1)
        selector = eye[rows]  # (Q, R, K)
        values = torch.zeros(n_q, m, rows.shape[1], k, dtype=x.dtype, device=x.device)
        contributions = torch.zeros(n_q, m, rows.shape[1], dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for s in range(p.steps):
                ks = self._against_training(p.weights[s], self._query_features(s, x, left, pieces, selector))
                values += ks
                contributions += torch.einsum("qirc,ic->qir", ks, p.coefficients[s])
                if progress is not None:
                    progress()
        return KernelValues(values=values, contributions=contributions, rows=rows)

    def _against_training(self, w: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """<Phi(x_q)[r], J_w(x_i)[c]> for every query, row, training point and class: (Q, M, R, K).

        Two contractions, the cheaper one chosen by flop count: per-sample training Jacobians (M, K, d) and an
        einsum, ~ M K d (3 + Q R) flops, or one JVP of the training batch per (q, r) tangent, ~ 3 Q R M d flops.
        With few classes (K <= 2) the Jacobians win; with many the JVPs never hold the M x K x d Jacobian."""
        n_q, r, d = phi.shape
        train_x, m = self.path.train_x, self.path.train_x.shape[0]
        k = self.path.coefficients.shape[2]
        if k * (3 + n_q * r) < 3 * n_q * r:
            per_sample = vmap(jacrev(self.f.single), in_dims=(None, 0))
            chunk = max(1, 2**22 // (k * d))  # ~32 MiB of Jacobian (float64) at a time
            return torch.cat([torch.einsum("qrd,icd->qirc", phi, per_sample(w, xs)) for xs in train_x.split(chunk)], 1)
        push = vmap(lambda t: jvp(lambda w_: self.f(w_, train_x), (w,), (t,))[1])
        ks = torch.cat([push(t) for t in phi.flatten(0, 1).split(self.chunk)])  # (Q R, M, K)
        return ks.view(n_q, r, m, k).permute(0, 2, 1, 3)

    def train_self_values(self, cls: int | None = None) -> torch.Tensor:
        """K(x_i, x_i) for every training point (M,), for kernel distances: sum_s ||J_{w_s}(x_i)||_F^2 (the trace),
        or sum_s ||grad_w yhat_cls(x_i)||^2 for one class (one per-sample gradient per point and step)."""
        if cls not in self._train_norms:
            p = self.path
            k = p.coefficients.shape[2]
            eye = torch.eye(k, dtype=p.weights.dtype, device=p.weights.device)
            selector = eye if cls is None else eye[cls : cls + 1]
            norms = torch.zeros(p.train_x.shape[0], dtype=p.weights.dtype, device=p.weights.device)
            chunk = max(1, 2**22 // (selector.shape[0] * self.f.size))
            with torch.no_grad():
                for s in range(p.steps):
                    for idx in torch.arange(p.train_x.shape[0], device=norms.device).split(chunk):
                        sel = selector.expand(len(idx), -1, -1)
                        norms[idx] += self._rows(p.weights[s], p.train_x[idx], sel).square().sum((1, 2))
            self._train_norms[cls] = norms
        return self._train_norms[cls]

    def matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel among the queries themselves, sum_s K_s(x_a, x_b): (Q, K, Q, K).

        dpk / tangent: sum_j omega_j Phi_{s,t_j}(x_a) Phi_{s,t_j}(x_b)^T with the DPK feature map of eq. 13-14,
        a positive-weight sum of Gram matrices, hence symmetric PSD (Lemma 14.4). continuous: int J_{w_s(t)}(x_a) dt
        J_{w_s}(x_b)^T, which is not symmetric (Remark 1).
        """
        p = self.path
        x = x.to(p.weights)
        left = self._at_left_endpoint(x)
        per_sample = vmap(jacrev(self.f.single), in_dims=(None, 0))
        gram = torch.zeros(x.shape[0], p.coefficients.shape[2], x.shape[0], p.coefficients.shape[2], dtype=x.dtype, device=x.device)
        with torch.no_grad():
            for s in range(p.steps):
                at_ws = per_sample(p.weights[s], x)
                if self.variant == "continuous":
                    full = torch.eye(gram.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)
                    gram += torch.einsum("akd,bcd->akbc", self._query_features(s, x, left, None, full), at_ws)
                    continue
                states, omega = self._states(s)
                for w, o in zip(states, omega):
                    phi = at_ws.clone()
                    if not bool(left.all()):
                        phi[~left] = per_sample(w, x[~left])
                    gram += o * torch.einsum("akd,bcd->akbc", phi, phi)
        return gram


def reference_predict(path: TrainingPath, x: torch.Tensor, quadrature_points: int = 16) -> torch.Tensor:
    """The literal per-sample loop of section 15.2 (continuous variant), for tests and the benchmark only.

    For every step it loads the weights, takes each training point's Jacobian by one autograd call per class,
    then each query's Jacobian at every quadrature node the same way, and contracts the explicit kernel values
    K_s(x_q, x_i)[k, c] with a_{i,s,c}. Slow on purpose: it is the second implementation predict() is checked against.
    """
    model, flat = path.flat.model, path.flat
    x = x.to(path.weights)
    nodes, node_weights = gauss_legendre(quadrature_points, path.weights.dtype, path.weights.device)
    params = list(model.parameters())

    def jacobian(sample):
        out = model(sample.unsqueeze(0)).squeeze(0)
        if flat.output == "probabilities":  # the function the path represents, as FlatModel computes it
            out = out.softmax(-1)
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[k], params, retain_graph=True)]) for k in range(out.shape[0])]
        return torch.stack(rows)  # (K, d)

    saved, was_training = flat.flatten(), model.training
    model.eval()
    out = path.bias.expand(x.shape[0], -1).clone()
    for s in range(path.steps):
        flat.load(path.weights[s])
        train_jac = torch.stack([jacobian(xi) for xi in path.train_x])  # (M, K, d)
        for t, omega in zip(nodes, node_weights):
            flat.load(path.weights[s] + t * (path.weights[s + 1] - path.weights[s]))
            query_jac = torch.stack([jacobian(xq) for xq in x])  # (Q, K, d)
            kernel = torch.einsum("qkd,icd->qikc", query_jac, train_jac)  # explicit K_s(x_q, x_i)
            out += omega * torch.einsum("qikc,ic->qk", kernel, path.coefficients[s])
    flat.load(saved)
    model.train(was_training)
    return out.detach()
