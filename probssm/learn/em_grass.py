"""Variational EM for graph-switching dynamical systems (`ps.models.GRASS`; registered with
`ps.learn.em`).

    fitted, elbos = ps.learn.em(grass, y, num_iters, edge_inputs=None, method="exact", fixed=())

E-step: ``num_vi_iters`` sweeps of `ps.switching.grass_structured_vi` (exact joint chain or the
factorised chains), warm-started from the previous iteration's mode (and edge) marginals.
M-step, maximising E_q[log p(y, x, z, e | theta)] with q fixed:

* closed form, pooled over objects and sequences: pi = mean q(z_0^n); p(e_0) = mean q(e_0^m);
  per mode k the weighted regression x_t^n ~ [A_k b_k][x_{t-1}^n; 1] (weights q(z_t^n = k)),
  Q_k the weighted expected residual covariance; initial moments from q(z_0^n = k); emissions
  the regression y_t^n ~ [C d][x_t^n; 1] (shared: weight one; per mode: weights q(z_t^n = k));
* by ``num_grad_steps`` Adam steps: the mode transition matrix P (through its log rows), the
  interaction weights W and the edge biases and weight, on the discrete part of the objective
  (`ps.switching.grass_transition_objective`; the factorised method's bound for
  ``method="factorised"``). The steps are kept only if they raise that objective, so the
  ELBO history never decreases (exact E-step; the factorised E-step is a coordinate ascent too).

The whole fit is one compiled `lax.scan`.
"""
from __future__ import annotations

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from probssm.core import checks
from probssm.core.linalg import psd_solve, symmetrize
from probssm.inference.switching.grass import MAX_JOINT_STATES, check_data, check_model, \
    grass_structured_vi_params, grass_transition_objective
from probssm.learn.em import register_em
from probssm.models.grass import GRASS

__all__ = ["grass_variational_em"]

_CLOSED = ("initial_probs", "initial_means", "initial_covs", "dynamics_matrices", "dynamics_offsets",
           "dynamics_covs", "emission_matrices", "emission_offsets", "emission_covs", "edge_initial_probs")
_GRADIENT = ("transition_matrix", "interaction_weights", "edge_biases", "edge_weight")
_FIELDS = _CLOSED + _GRADIENT


def _regression(w, Ex_in, Exx_in, Eyx, Eyy, Ey):
    """Weighted least squares target ~ [W c][x; 1] from per-sample expectations (leading axis n):
    E[x], E[x x^T], E[target x^T], E[target target^T], E[target]. Returns (W, c, cov, ok)."""
    n = jnp.sum(w)
    d = Ex_in.shape[-1]
    Sxx = jnp.einsum("n,nij->ij", w, Exx_in)
    Sx = jnp.einsum("n,ni->i", w, Ex_in)
    Xx = jnp.concatenate([jnp.concatenate([Sxx, Sx[:, None]], axis=1), jnp.concatenate([Sx, n[None]])[None]])
    Yx = jnp.concatenate([jnp.einsum("n,nij->ij", w, Eyx), jnp.einsum("n,ni->i", w, Ey)[:, None]], axis=1)
    Yy = jnp.einsum("n,nij->ij", w, Eyy)
    ok = n > 1e-8  # a mode q never visits keeps its parameters
    Wc = psd_solve(jnp.where(ok, Xx, jnp.eye(d + 1, dtype=Xx.dtype)), jnp.where(ok, Yx, 0.0).T).T
    cov = symmetrize((Yy - Wc @ Yx.T - Yx @ Wc.T + Wc @ Xx @ Wc.T) / jnp.where(ok, n, 1.0))
    return Wc[:, :d], Wc[:, d], cov, ok


def _closed_form(model, r, ys):
    """The closed-form updates (a dict by field) from batched results r (leading B) and ys (B, T, N, p)."""
    B, T, N, K = r.mode_probs.shape
    g = jnp.moveaxis(r.mode_probs, 2, 1).reshape(B * N, T, K)  # one row per (sequence, object)
    Ex = jnp.moveaxis(r.means, 2, 1).reshape(B * N, T, -1)
    P = jnp.moveaxis(r.covs, 2, 1).reshape(B * N, T, *r.covs.shape[-2:])
    Cx = jnp.moveaxis(r.cross_covs, 2, 1).reshape(B * N, T - 1, *r.covs.shape[-2:])
    y = jnp.moveaxis(ys, 2, 1).reshape(B * N, T, -1)
    Exx = P + jnp.einsum("bti,btj->btij", Ex, Ex)
    Exx1 = Cx + jnp.einsum("bti,btj->btij", Ex[:, 1:], Ex[:, :-1])
    new = {"initial_probs": jnp.mean(g[:, 0], axis=0)}
    E = r.edge_probs.shape[-1]
    if E:
        rho1 = jnp.mean(r.edge_probs[:, 0])
        new["edge_initial_probs"] = jnp.stack([1.0 - rho1, rho1])
    else:
        new["edge_initial_probs"] = model.edge_initial_probs
    w0 = g[:, 0]
    n0 = jnp.sum(w0, axis=0)
    ok0 = n0 > 1e-8
    m0 = jnp.einsum("bk,bi->ki", w0, Ex[:, 0]) / jnp.where(ok0, n0, 1.0)[:, None]
    S0 = jnp.einsum("bk,bij->kij", w0, Exx[:, 0]) / jnp.where(ok0, n0, 1.0)[:, None, None]
    new["initial_means"] = jnp.where(ok0[:, None], m0, model.initial_means)
    new["initial_covs"] = jnp.where(ok0[:, None, None], symmetrize(S0 - jnp.einsum("ki,kj->kij", m0, m0)),
                                    model.initial_covs)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    args = (flat(Ex[:, :-1]), flat(Exx[:, :-1]), flat(Exx1), flat(Exx[:, 1:]), flat(Ex[:, 1:]))
    A, b, Q, ok = jax.vmap(lambda w: _regression(w, *args), in_axes=1)(flat(g[:, 1:]))
    new["dynamics_matrices"] = jnp.where(ok[:, None, None], A, model.dynamics_matrices)
    new["dynamics_offsets"] = jnp.where(ok[:, None], b, model.dynamics_offsets)
    new["dynamics_covs"] = jnp.where(ok[:, None, None], Q, model.dynamics_covs)
    eargs = (flat(Ex), flat(Exx), flat(jnp.einsum("bti,btj->btij", y, Ex)), flat(jnp.einsum("bti,btj->btij", y, y)),
             flat(y))
    if model.shared_emissions:
        H, d, R, oke = _regression(jnp.ones(B * N * T, ys.dtype), *eargs)
    else:
        H, d, R, oke = jax.vmap(lambda w: _regression(w, *eargs), in_axes=1)(flat(g))
    # a shared field keeps its shape, a per-mode one gets the shared fit broadcast over modes
    fit = lambda a, f, base: jnp.where(oke.reshape(oke.shape + (1,) * base), a, getattr(model, f))
    new["emission_matrices"] = fit(H, "emission_matrices", 2)
    new["emission_offsets"] = fit(d, "emission_offsets", 1)
    new["emission_covs"] = fit(R, "emission_covs", 2)
    return new


def _replace(model, new, fields):
    return eqx.tree_at(lambda m: tuple(getattr(m, f) for f in fields), model,
                       tuple(jnp.broadcast_to(new[f], getattr(model, f).shape).astype(getattr(model, f).dtype)
                             for f in fields))


def _gradient_step(model, r, u, method, fixed, num_steps, learning_rate):
    """Adam steps on the discrete objective over (log P, W, edge biases, edge weight); kept only if
    the objective rose. Returns the new values of the gradient fields (a dict)."""
    free = tuple(f for f in _GRADIENT if f not in fixed)
    theta0 = {"transition_matrix": jnp.log(model.transition_matrix), "interaction_weights": model.interaction_weights,
              "edge_biases": model.edge_biases, "edge_weight": model.edge_weight}

    def build(theta):
        vals = dict(theta)
        vals["transition_matrix"] = jax.nn.softmax(theta["transition_matrix"], axis=-1)
        return _replace(model, vals, free)

    def objective(theta):
        m = build(theta)
        one = lambda rb, ub: grass_transition_objective(m, rb, edge_inputs=ub, method=method)
        return jnp.sum(jax.vmap(one, in_axes=(0, None if u is None or u.ndim == 2 else 0))(r, u))

    mask = {k: k in free for k in theta0}
    opt = optax.masked(optax.adam(learning_rate), mask)
    neg = lambda th: -objective(th)

    def step(carry, _):
        theta, state = carry
        g = jax.grad(neg)(theta)
        upd, state = opt.update(g, state, theta)
        return (optax.apply_updates(theta, upd), state), None

    (theta, _), _ = lax.scan(step, (theta0, opt.init(theta0)), None, length=num_steps)
    better = objective(theta) > objective(theta0)
    chosen = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), theta, theta0)
    return {"transition_matrix": jax.nn.softmax(chosen["transition_matrix"], axis=-1),
            "interaction_weights": chosen["interaction_weights"], "edge_biases": chosen["edge_biases"],
            "edge_weight": chosen["edge_weight"]}


@partial(jax.jit, static_argnames=("num_iters", "num_vi_iters", "method", "fixed", "num_grad_steps"))
def _fit(model, ys, u, learning_rate, *, num_iters, num_vi_iters, method, fixed, num_grad_steps):
    B, T, N, _ = ys.shape
    K, E = model.num_modes, model.num_edges
    u_axis = None if u is None or u.ndim == 2 else 0

    def e_step(m, q):
        g0, e0 = q
        one = lambda y, ub, g, e: grass_structured_vi_params(m, y, num_vi_iters, edge_inputs=ub, method=method,
                                                             initial_mode_probs=g, initial_edge_probs=e)
        r = jax.vmap(one, in_axes=(0, u_axis, 0, 0))(ys, u, g0, e0)
        return jnp.sum(r.elbo[:, -1]), r

    def step(carry, _):
        m, q = carry
        elbo, r = e_step(m, q)
        new = _closed_form(m, r, ys)
        if any(f not in fixed for f in _GRADIENT):
            new.update(_gradient_step(m, r, u, method, fixed, num_grad_steps, learning_rate))
        m_new = _replace(m, new, tuple(f for f in _FIELDS if f not in fixed))
        return (m_new, (r.mode_probs, r.edge_probs)), elbo

    q0 = (jnp.full((B, T, N, K), 1.0 / K, ys.dtype), jnp.full((B, T, E), 0.5, ys.dtype))
    (fitted, _), history = lax.scan(step, (model, q0), None, length=num_iters)
    return fitted, history


@register_em(GRASS)
def grass_variational_em(model, emissions, num_iters: int = 50, *, edge_inputs=None, method: str = "exact",
                         num_vi_iters: int = 2, num_grad_steps: int = 10, learning_rate: float = 0.05, fixed=(),
                         max_joint_states: int = MAX_JOINT_STATES):
    """Variational EM for a `ps.models.GRASS` (see the module doc).

    Args:
        model: the starting `GRASS` (not modified).
        emissions: (T, N, p) or a batch (B, T, N, p); fully observed.
        num_iters: EM iterations.
        edge_inputs: None, (T, E) shared by the batch, or (B, T, E).
        method: the E-step's ``"exact"`` or ``"factorised"`` q(z, e).
        num_vi_iters: structured-VI sweeps per E-step (warm-started).
        num_grad_steps: Adam steps on P, W and the edge law per M-step.
        learning_rate: of those steps.
        fixed: field names held at their current values, e.g. ``("interaction_weights",)``.
        max_joint_states: as `ps.switching.grass_structured_vi`.

    Returns:
        ``(fitted_model, elbos)``: ``elbos[i]`` (num_iters,) is the ELBO (summed over the batch) of
        the parameters entering iteration i after its E-step; it never decreases.

    Raises:
        ValueError: naming the argument: unknown ``fixed`` names, missing values, and the checks of
            `ps.switching.grass_structured_vi`.
    """
    num_iters = checks.positive_int(num_iters, "num_iters")
    num_vi_iters = checks.positive_int(num_vi_iters, "num_vi_iters")
    num_grad_steps = checks.positive_int(num_grad_steps, "num_grad_steps")
    max_joint_states = checks.positive_int(max_joint_states, "max_joint_states")
    fixed = (fixed,) if isinstance(fixed, str) else tuple(fixed)
    for f in fixed:
        if f not in _FIELDS:
            raise ValueError(f"fixed: {f!r} is not a learnable field of GRASS; expected some of {list(_FIELDS)}")
    check_model(model, method, max_joint_states)
    ys, u, batched = check_data(model, emissions, edge_inputs)
    if checks.is_concrete(ys) and bool(np.isnan(np.asarray(ys)).any()):
        raise ValueError("emissions: GRASS variational EM needs fully observed sequences (no NaN)")
    ys = ys if batched else ys[None]
    model = checks.unify_dtypes(model, ys)
    ys = ys.astype(model.dynamics_matrices.dtype)
    lr = jnp.asarray(learning_rate, ys.dtype)
    return _fit(model, ys, u, lr, num_iters=num_iters, num_vi_iters=num_vi_iters, method=method, fixed=fixed,
                num_grad_steps=num_grad_steps)
