"""GP kernels in state-space form (probssm.models.kernels) against numpy/scipy oracles.

Every kernel is checked against a model written here independently from the literature formulas
(F, Pinf, H, L Qc L^T and the covariance function): the transition against scipy's expm and the
Pinf identity, Pinf against scipy's Lyapunov solver, the state-space covariance against the
kernel function, the modified Bessel weights of the periodic kernel against scipy.special.ive,
gradients against central finite differences.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import scipy.special

from probssm.models import kernels as K

DTS = np.array([0.0, 1e-3, 0.37, 2.5, 11.0])

# The kernel is an argument (a pytree): kernels of the same structure share one compilation.
transitions = jax.jit(lambda k, dts: jax.vmap(k.transition)(dts))
ssm_pairs = jax.jit(lambda k, t1, t2: jax.vmap(k.ssm_covariance)(t1, t2))
model_parts = jax.jit(lambda k: (k.feedback_matrix(), k.stationary_cov(), k.diffusion_matrix(), k.measurement_vector()))
# initial_cov at t0 = -1.2 in place of Pinf, for the non-stationary kernels too
model_parts0 = jax.jit(lambda k: (k.feedback_matrix(), k.initial_cov(-1.2), k.diffusion_matrix(), k.measurement_vector()))


# ---------------------------------------------------------------------------------------------
# numpy oracles: (F, Pinf, H, diffusion, k(tau) or k(t1, t2))


def _corner(d, q):
    S = np.zeros((d, d))
    S[-1, -1] = q
    return S


def _lyap(F, S):
    return scipy.linalg.solve_continuous_lyapunov(F, -S)


def matern12_oracle(l, s2):
    lam = 1.0 / l
    F, S = np.array([[-lam]]), _corner(1, 2.0 * s2 * lam)
    return dict(F=F, S=S, P=_lyap(F, S), H=np.array([1.0]), k=lambda t1, t2: s2 * np.exp(-lam * np.abs(t1 - t2)))


def matern32_oracle(l, s2):
    lam = math.sqrt(3.0) / l
    F, S = np.array([[0.0, 1.0], [-lam**2, -2 * lam]]), _corner(2, 4.0 * s2 * lam**3)

    def k(t1, t2):
        r = lam * np.abs(t1 - t2)
        return s2 * (1 + r) * np.exp(-r)
    return dict(F=F, S=S, P=_lyap(F, S), H=np.array([1.0, 0.0]), k=k)


def matern52_oracle(l, s2):
    lam = math.sqrt(5.0) / l
    F = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-lam**3, -3 * lam**2, -3 * lam]])
    S = _corner(3, 16.0 / 3.0 * s2 * lam**5)

    def k(t1, t2):
        r = lam * np.abs(t1 - t2)
        return s2 * (1 + r + r**2 / 3) * np.exp(-r)
    return dict(F=F, S=S, P=_lyap(F, S), H=np.array([1.0, 0.0, 0.0]), k=k)


def _rot_generator(w):
    return np.array([[0.0, -w], [w, 0.0]])


def cosine_oracle(s2, p):
    w = 2 * np.pi / p
    return dict(F=_rot_generator(w), S=np.zeros((2, 2)), P=s2 * np.eye(2), H=np.array([1.0, 0.0]),
                k=lambda t1, t2: s2 * np.cos(w * (t1 - t2)))


def constant_oracle(s2):
    return dict(F=np.zeros((1, 1)), S=np.zeros((1, 1)), P=np.array([[s2]]), H=np.array([1.0]),
                k=lambda t1, t2: s2 + 0.0 * (t1 - t2))


def periodic_weights(l, J):
    x = l**-2.0
    return np.array([(1.0 if j == 0 else 2.0) * scipy.special.ive(j, x) for j in range(J + 1)])


def periodic_tail(l, J):
    x = l**-2.0
    return 2.0 * sum(scipy.special.ive(j, x) for j in range(J + 1, J + 600))


def periodic_oracle(l, s2, p, J):
    w0 = 2 * np.pi / p
    q = s2 * periodic_weights(l, J)
    d = 2 * (J + 1)

    def series(t1, t2):
        tau = np.asarray(t1 - t2)[..., None]
        return np.sum(q * np.cos(np.arange(J + 1) * w0 * tau), -1)
    return dict(F=scipy.linalg.block_diag(*[_rot_generator(j * w0) for j in range(J + 1)]), S=np.zeros((d, d)),
                P=np.diag(np.repeat(q, 2)), H=np.tile([1.0, 0.0], J + 1), k=series,
                exact=lambda t1, t2: s2 * np.exp(-2 * np.sin(np.pi * (t1 - t2) / p) ** 2 / l**2))


def linear_oracle(s2, c, b2=1.0):
    def P0(t0):
        u = t0 - c
        return s2 * np.array([[u * u, u], [u, 1.0]]) + np.diag([b2, 0.0])
    return dict(F=np.array([[0.0, 1.0], [0.0, 0.0]]), S=np.zeros((2, 2)), P=None, P0=P0, H=np.array([1.0, 0.0]),
                k=lambda t1, t2: b2 + s2 * (t1 - c) * (t2 - c), Q=lambda dt: np.zeros((2, 2)))


def sum_oracle(*parts):
    def P0(t0):
        return scipy.linalg.block_diag(*[o["P0"](t0) if o["P"] is None else o["P"] for o in parts])
    stationary = all(o["P"] is not None for o in parts)
    return dict(F=scipy.linalg.block_diag(*[o["F"] for o in parts]), S=scipy.linalg.block_diag(*[o["S"] for o in parts]),
                P=scipy.linalg.block_diag(*[o["P"] for o in parts]) if stationary else None, P0=P0,
                H=np.concatenate([o["H"] for o in parts]), k=lambda t1, t2: sum(o["k"](t1, t2) for o in parts),
                Q=lambda dt: scipy.linalg.block_diag(*[_oracle_Q(o, dt) for o in parts]))


def _oracle_Q(o, dt):
    """The exact process noise over dt: Pinf - A Pinf A^T, or the oracle's own (non-stationary parts)."""
    if "Q" in o:
        return o["Q"](dt)
    A = scipy.linalg.expm(o["F"] * dt)
    return o["P"] - A @ o["P"] @ A.T


def product_oracle(a, b):
    Ia, Ib = np.eye(a["F"].shape[0]), np.eye(b["F"].shape[0])
    return dict(F=np.kron(a["F"], Ib) + np.kron(Ia, b["F"]), S=np.kron(a["S"], b["P"]) + np.kron(a["P"], b["S"]),
                P=np.kron(a["P"], b["P"]), H=np.kron(a["H"], b["H"]), k=lambda t1, t2: a["k"](t1, t2) * b["k"](t1, t2))


@dataclasses.dataclass
class Case:
    name: str
    make: Callable          # theta (1-D array, possibly traced) -> kernel
    theta: tuple            # hyperparameters
    oracle: Callable        # numpy theta -> oracle dict
    exact: bool = True      # ssm_covariance reproduces the exact kernel


CASES = [
    Case("matern12", lambda t: K.Matern12(t[0], t[1]), (0.7, 1.3), lambda t: matern12_oracle(*t)),
    Case("matern32", lambda t: K.Matern32(t[0], t[1]), (0.7, 1.3), lambda t: matern32_oracle(*t)),
    Case("matern52", lambda t: K.Matern52(t[0], t[1]), (0.7, 1.3), lambda t: matern52_oracle(*t)),
    Case("cosine", lambda t: K.Cosine(t[0], t[1]), (1.3, 2.3), lambda t: cosine_oracle(*t)),
    Case("constant", lambda t: K.Constant(t[0]), (1.7,), lambda t: constant_oracle(*t)),
    Case("linear", lambda t: K.Linear(t[0], t[1], t[2]), (0.8, 0.4, 0.6), lambda t: linear_oracle(*t)),
    Case("periodic", lambda t: K.Periodic(t[0], t[1], t[2], num_harmonics=5), (0.9, 1.3, 2.3),
         lambda t: periodic_oracle(*t, 5)),
    Case("periodic_short_l", lambda t: K.Periodic(t[0], t[1], t[2], num_harmonics=40), (0.08, 0.6, 1.1),
         lambda t: periodic_oracle(*t, 40)),
    Case("sum_matern_cosine", lambda t: K.Sum(K.Matern32(t[0], t[1]), K.Cosine(t[2], t[3])), (0.7, 1.3, 0.5, 2.3),
         lambda t: sum_oracle(matern32_oracle(t[0], t[1]), cosine_oracle(t[2], t[3]))),
    Case("sum_with_linear", lambda t: K.Matern52(t[0], t[1]) + K.Linear(t[2], t[3], t[5]) + K.Constant(t[4]),
         (0.7, 1.3, 0.3, -0.6, 0.4, 0.8),
         lambda t: sum_oracle(matern52_oracle(t[0], t[1]), linear_oracle(t[2], t[3], t[5]), constant_oracle(t[4]))),
    Case("product_matern", lambda t: K.Product(K.Matern12(t[0], t[1]), K.Matern32(t[2], t[3])), (0.7, 1.3, 1.9, 0.6),
         lambda t: product_oracle(matern12_oracle(t[0], t[1]), matern32_oracle(t[2], t[3]))),
    Case("quasi_periodic", lambda t: K.Periodic(t[0], t[1], t[2], num_harmonics=4) * K.Matern32(t[3], t[4]),
         (0.9, 1.3, 2.3, 3.1, 0.8),
         lambda t: product_oracle(periodic_oracle(t[0], t[1], t[2], 4), matern32_oracle(t[3], t[4]))),
    Case("product_of_sum", lambda t: K.Product(K.Cosine(t[0], t[1]), K.Matern12(t[2], t[5]) + K.Constant(t[3]),
                                               K.Matern32(t[4], t[5])),
         (1.3, 2.3, 0.5, 0.4, 1.7, 0.8),
         lambda t: product_oracle(product_oracle(cosine_oracle(t[0], t[1]),
                                                 sum_oracle(matern12_oracle(t[2], t[5]), constant_oracle(t[3]))),
                                  matern32_oracle(t[4], t[5]))),
]
CASE_IDS = [c.name for c in CASES]


def _kernel(case, dtype=np.float64):
    return case.make(jnp.asarray(case.theta, dtype))


def _oracle(case):
    return case.oracle(tuple(np.asarray(case.theta, np.float64)))


def _close(actual, expected, rtol=1e-10, what=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def _initial(o, t0):
    return o["P0"](t0) if o["P"] is None else o["P"]


# ---------------------------------------------------------------------------------------------
# (structure) F, Pinf, H, diffusion, state_dim, stationary against the oracle


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matrices_match_oracle(case):
    k, o = _kernel(case), _oracle(case)
    d = o["F"].shape[0]
    assert k.state_dim == d
    assert k.stationary == (o["P"] is not None)
    F, P0, S, H = model_parts0(k)
    _close(F, o["F"], what="F")
    _close(H, o["H"], what="H")
    _close(S, o["S"], what="diffusion")
    _close(P0, _initial(o, -1.2), what="initial_cov")
    if o["P"] is not None:
        _close(model_parts(k)[1], o["P"], what="Pinf")
    else:
        with pytest.raises(ValueError, match="stationary"):
            k.stationary_cov()
        _close(k.initial_cov(-1.2), o["P0"](-1.2), what="initial_cov")


# (c) Pinf solves the Lyapunov equation F P + P F^T + L Qc L^T = 0


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in ("linear", "sum_with_linear")],
                         ids=[c.name for c in CASES if c.name not in ("linear", "sum_with_linear")])
def test_stationary_cov_solves_lyapunov(case):
    k = _kernel(case)
    F, P, S, H = (np.asarray(m) for m in model_parts(k))
    assert np.linalg.eigvalsh(S).min() > -1e-10 * max(1.0, np.abs(S).max()), "diffusion not PSD"
    scale = max(1.0, np.abs(F @ P).max())
    np.testing.assert_allclose(F @ P + P @ F.T + S, 0.0, atol=1e-11 * scale)
    if np.abs(S).max() > 0 and np.linalg.eigvals(F).real.max() < -1e-9:
        # scipy's solver: the unique solution, for the asymptotically stable F only
        _close(P, _lyap(F, S), rtol=1e-9, what="Lyapunov")
    # the variance the state represents at lag 0
    assert H @ P @ H > 0


# (b) transition: A = expm(F dt), Q = Pinf - A Pinf A^T, closed form


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_transition_matches_expm(case):
    k, o = _kernel(case), _oracle(case)
    A, Q = transitions(k, jnp.asarray(DTS))
    for i, dt in enumerate(DTS):
        A_ref = scipy.linalg.expm(o["F"] * dt)
        _close(A[i], A_ref, what=f"A({dt})")
        _close(Q[i], _oracle_Q(o, dt), what=f"Q({dt})")
        if not np.any(o["S"]):  # no diffusion: Q is exactly 0, not merely Pinf - A Pinf A^T ~ 0
            np.testing.assert_array_equal(np.asarray(Q[i]), 0.0)
    # closed form: no matrix exponential in the traced computation
    assert "name=expm" not in str(jax.make_jaxpr(k.transition)(0.3))


def test_zero_diffusion_kernels_have_exactly_zero_Q():
    for k in (K.Periodic(0.5, 2.0, 1.5, 3), K.Cosine(2.0, 0.7), K.Constant(3.0), K.Linear(2.0, 1.0)):
        A, Q = k.transition(0.77)
        np.testing.assert_array_equal(np.asarray(Q), 0.0)


# (a) ssm_covariance reproduces the kernel


PAIRS = np.array([(0.0, 0.0), (0.3, 0.3), (0.1, 0.45), (0.45, 0.1), (-1.3, 2.2), (2.2, -1.3), (0.9, 5.4), (-3.0, 7.5)])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ssm_covariance_matches_kernel(case):
    k, o = _kernel(case), _oracle(case)
    t1, t2 = jnp.asarray(PAIRS[:, 0]), jnp.asarray(PAIRS[:, 1])
    ssm = np.asarray(ssm_pairs(k, t1, t2))
    # the state-space form against the oracle's kernel (the truncated series for periodic parts)
    _close(ssm, o["k"](PAIRS[:, 0], PAIRS[:, 1]), what="ssm_covariance")
    # the oracle's direct construction H A(hi - lo) P(lo) H^T, which also covers Linear's initial_cov
    for (a, b), v in zip(PAIRS, ssm):
        lo, hi = min(a, b), max(a, b)
        ref = o["H"] @ scipy.linalg.expm(o["F"] * (hi - lo)) @ _initial(o, lo) @ o["H"]
        _close(v, ref, what="H A P H")
    # the kernel function itself against the oracle's exact kernel
    exact = o.get("exact", o["k"])
    if "periodic" not in case.name:
        _close(k(t1, t2), exact(PAIRS[:, 0], PAIRS[:, 1]), what="__call__")


def test_kernel_call_broadcasts():
    k = K.Matern32(0.7, 1.3) + K.Linear(0.5, 0.2) + K.Constant(0.3)
    t = jnp.linspace(0.0, 2.0, 5)
    G = k(t[:, None], t[None, :])
    assert G.shape == (5, 5)
    ref = matern32_oracle(0.7, 1.3)["k"](np.asarray(t)[:, None], np.asarray(t)[None, :]) + \
        1.0 + 0.5 * (np.asarray(t)[:, None] - 0.2) * (np.asarray(t)[None, :] - 0.2) + 0.3  # bias 1 by default
    _close(G, ref)
    assert K.Constant(2.0)(t, 0.0).shape == (5,)


def test_gram_matrix_psd_and_ssm_gram_equal():
    # the Gram matrix built from the state-space covariance equals the kernel's (quasi-periodic plus
    # a linear trend) and is PSD: the whole joint law matches, not only pairs
    k = K.Periodic(1.2, 1.0, 1.3, num_harmonics=12) * K.Matern32(2.0, 0.7) + K.Linear(0.2, 1.0)
    t = np.sort(np.random.default_rng(0).uniform(-2, 4, 12))
    ti, tj = np.meshgrid(t, t, indexing="ij")
    G_ssm = np.asarray(ssm_pairs(k, jnp.asarray(ti.ravel()), jnp.asarray(tj.ravel()))).reshape(12, 12)
    G = np.asarray(k(ti, tj))
    # 12 harmonics at l = 1.2: truncation ~1e-13
    _close(G_ssm, G, rtol=1e-12)
    assert np.linalg.eigvalsh(G).min() > -1e-10


# ---------------------------------------------------------------------------------------------
# Squared exponential


@pytest.mark.parametrize("order", range(1, K.SE_MAX_ORDER + 1))
def test_se_model(order):
    l, s2 = 0.7, 1.3
    k = K.SquaredExponential(l, s2, order)
    F, P_k, S, H = (np.asarray(m) for m in model_parts(k))
    assert np.linalg.eigvals(F).real.max() < 0
    # 1 / S(w) of the order-N Taylor approximation: sum_k (w^2 l^2 / 2)^k / k!, which the spectral
    # factor reproduces as |G(iw)|^2 l^{2N} / (2^N N!) with G the characteristic polynomial of F
    w = np.linspace(0.0, 6.0 / l, 25)
    taylor = sum((w**2 * l**2 / 2) ** j / math.factorial(j) for j in range(order + 1))
    G = np.polyval(np.poly(F), 1j * w)
    np.testing.assert_allclose(np.abs(G) ** 2 * l ** (2 * order) / (2**order * math.factorial(order)), taylor,
                               rtol=1e-9)
    # Pinf: scipy's Lyapunov solution for this F, normalised to the variance. Solved in scaled time
    # t / l, where the state (f, l f', l^2 f'', ...) has O(1) entries: on the unscaled F scipy
    # loses up to all digits at order 10 and l = 0.2 (entries spanning l^-2N)
    D = l ** -np.arange(order, dtype=float)
    F_s = l * F * D[None, :] / D[:, None]
    P_s = _lyap(F_s, _corner(order, 1.0))
    P = s2 * P_s / P_s[0, 0] * np.outer(D, D)
    dn = np.sqrt(np.diag(P))
    # (the Lyapunov problem's conditioning grows with the order: ~1e-15 at order 2, ~2e-9 at 12)
    tol = 1e-14 * 10 ** (order / 2)
    np.testing.assert_allclose(P_k / np.outer(dn, dn), P / np.outer(dn, dn), rtol=0, atol=tol)
    np.testing.assert_array_equal(H, np.eye(order)[0])
    assert H @ P_k @ H == pytest.approx(s2, rel=1e-13)
    # the diffusion: consistent with Pinf (residual relative to the scaled F's entries), and against
    # the spectral density's own qc = s^2 sqrt(2 pi) 2^N N! l^{1-2N} scaled by the variance
    # normalisation, i.e. by s^2 / (the variance the un-normalised Taylor density carries, by quadrature)
    P = P_k
    R = (F @ P + P @ F.T + S) / np.outer(dn, dn)
    assert np.abs(R).max() < 1e-9 * np.abs(F * dn[None, :] / dn[:, None]).max()
    qc_spectral = s2 * math.sqrt(2 * math.pi) * 2**order * math.factorial(order) * l ** (1 - 2 * order)
    var_taylor = scipy.integrate.quad(
        lambda u: s2 * math.sqrt(2 * math.pi) * l / sum((u * u * l * l / 2) ** j / math.factorial(j)
                                                         for j in range(order + 1)) / math.pi, 0, np.inf)[0]
    assert S[-1, -1] == pytest.approx(qc_spectral * s2 / var_taylor, rel=1e-7)
    # the approximation error over tau in [0, 5 l] on a 2001-point grid: H A(dx)^k Pinf H^T with
    # A(dx) = expm(F dx) of the kernel's F (the kernel's own transition is checked against expm in
    # test_se_transition; compiling it for all 12 orders would take most of this file's time)
    dx = 5.0 * l / 2000
    A_dx = scipy.linalg.expm(F * dx)
    row, ssm = H.copy(), []
    for _ in range(2001):
        ssm.append(row @ P @ H)
        row = row @ A_dx
    tau = np.arange(2001) * dx
    err = np.abs(np.array(ssm) - s2 * np.exp(-0.5 * (tau / l) ** 2)).max() / s2
    # within the documented bound, and the bound is tight (measured, rounded up to 2 digits)
    bound = K.SE_ERROR_BOUND[order]
    assert bound * 0.95 < err <= bound, (order, err, bound)
    if order == 6:
        assert bound < 1e-2


@pytest.mark.parametrize("order", [1, 6, 12])
def test_se_transition(order):
    l, s2 = 0.41, 1.7
    k = K.SquaredExponential(l, s2, order)
    F, P, _, H = (np.asarray(m) for m in model_parts(k))
    dn = np.sqrt(np.diag(P))
    A, Q = (np.asarray(m) for m in transitions(k, jnp.asarray(DTS)))
    tol = 1e-14 * 10 ** (order / 2)
    for i, dt in enumerate(DTS):
        A_ref = scipy.linalg.expm(F * dt)
        # entries relative to the state's scales (derivatives up to l^-(N-1))
        np.testing.assert_allclose(A[i] * dn[None, :] / dn[:, None], A_ref * dn[None, :] / dn[:, None],
                                   rtol=0, atol=max(tol, 1e-12))
        Q_ref = P - A_ref @ P @ A_ref.T
        np.testing.assert_allclose(Q[i] / np.outer(dn, dn), Q_ref / np.outer(dn, dn), rtol=0, atol=max(tol, 1e-12))
        assert np.linalg.eigvalsh(Q[i] / np.outer(dn, dn)).min() > -tol
    if order != 6:  # (one compile of the public method is enough)
        return
    # and the state-space covariance it implies, through the public method
    tau = jnp.asarray([0.0, 0.3 * l, 1.7 * l])
    ssm = np.asarray(ssm_pairs(k, jnp.full(3, 2.0), 2.0 + tau))
    np.testing.assert_allclose(ssm, [H @ scipy.linalg.expm(F * t) @ P @ H for t in np.asarray(tau)], rtol=1e-10)
    assert np.abs(ssm - np.asarray(k(0.0, tau))).max() <= K.SE_ERROR_BOUND[order] * s2


def test_se_exact_call_and_order_validation():
    k = K.SquaredExponential(0.5, 2.0)
    assert k.order == 6 and k.state_dim == 6
    t = np.array([0.0, 0.3, 1.1])
    _close(k(t, 0.2), 2.0 * np.exp(-0.5 * ((t - 0.2) / 0.5) ** 2))
    for bad in (0, 13, 2.0, True):
        with pytest.raises(ValueError, match="order"):
            K.SquaredExponential(order=bad)
    # the order is static: a jit over the kernel sees it as structure, not data
    assert jax.tree_util.tree_leaves(k) == [k.lengthscale, k.variance]


# ---------------------------------------------------------------------------------------------
# Periodic


@pytest.mark.parametrize("l", [0.01, 0.05, 0.3, 1.0, 4.0, 50.0])
def test_periodic_bessel_weights_match_scipy(l):
    J = 30
    k = K.Periodic(l, 1.7, 2.0, num_harmonics=J)
    q = np.asarray(k.harmonic_variances())
    ref = 1.7 * periodic_weights(l, J)
    # absolute accuracy to rounding; relative wherever the weight is not negligible
    np.testing.assert_allclose(q, ref, rtol=0, atol=1e-15)
    big = ref > 1e-6
    np.testing.assert_allclose(q[big], ref[big], rtol=1e-10)
    assert float(k.truncation_error()) == pytest.approx(1.7 * periodic_tail(l, J), rel=1e-8, abs=1e-15)


# Rows of the Periodic docstring's table (J, l, max error / s^2), the values above 1e-15
PERIODIC_TABLE = [
    (2, 0.25, 5.3e-1), (2, 0.5, 2.0e-1), (2, 1.0, 1.9e-2), (2, 2.0, 5.3e-4),
    (4, 0.25, 2.6e-1), (4, 0.5, 2.6e-2), (4, 1.0, 2.2e-4), (4, 2.0, 4.1e-7),
    (6, 0.25, 1.0e-1), (6, 0.5, 2.0e-3), (6, 1.0, 1.3e-6), (6, 2.0, 1.5e-10),
    (8, 0.25, 3.4e-2), (8, 0.5, 9.4e-5), (8, 1.0, 4.3e-9), (8, 2.0, 3.2e-14),
    (10, 0.25, 9.2e-3), (10, 0.5, 3.1e-6), (10, 1.0, 9.6e-12),
    (15, 0.25, 1.6e-4), (15, 0.5, 1.6e-10), (20, 0.25, 9.4e-7), (20, 0.5, 2.0e-15),
]


@pytest.mark.parametrize("l", [0.25, 0.5, 1.0, 2.0])
def test_periodic_truncation_error_table(l):
    # The weights q_j do not depend on J (J only truncates): the J-harmonic state-space covariance is
    # sum_{j<=J} s^2 q_j^2 cos(j w0 tau), checked against ssm_covariance for J = 5 and 40 in
    # test_ssm_covariance_matches_kernel and here directly for J = 6.
    tau = np.linspace(0.0, 1.0, 401)  # one period; includes tau = 0, where the error peaks
    s2, p = 1.9, 1.0
    exact = s2 * np.exp(-2 * np.sin(np.pi * tau) ** 2 / l**2)
    k20 = K.Periodic(l, s2, p, num_harmonics=20)
    _, P20, _, H20 = (np.asarray(m) for m in model_parts(k20))
    q = np.diag(P20)[::2]
    assert H20 @ P20 @ H20 == pytest.approx(s2 * (1 - periodic_tail(l, 20)), rel=1e-13)
    for J in (2, 4, 6, 8, 10, 15, 20):
        series = np.cos(np.outer(tau, 2 * np.pi / p * np.arange(J + 1))) @ q[:J + 1]
        err = np.abs(series - exact).max() / s2
        tail = periodic_tail(l, J)
        # the max error is the Bessel tail, attained at tau = 0 (up to rounding); NOT renormalised
        assert err == pytest.approx(tail, rel=1e-6, abs=3e-15)
        assert abs(series[0] - exact[0]) / s2 == pytest.approx(tail, rel=1e-6, abs=3e-15)
        for J_doc, l_doc, stated in PERIODIC_TABLE:
            if (J_doc, l_doc) == (J, l):
                assert err == pytest.approx(stated, rel=0.05)
        # the leading-term asymptote stated in the docstring for J + 1 >> x^2 / 4 (x = l^-2)
        x = l**-2
        if J + 2 >= 8 * x**2:
            assert tail == pytest.approx(2 * math.exp(-x) * (x / 2) ** (J + 1) / math.factorial(J + 1), rel=0.15)
    # one J through the public method, against the exact kernel
    k6 = K.Periodic(l, s2, p, num_harmonics=6)
    ssm = np.asarray(ssm_pairs(k6, jnp.full(5, 0.3), jnp.asarray(0.3 + tau[::100])))
    assert np.abs(ssm - exact[::100]).max() / s2 <= periodic_tail(l, 6) * (1 + 1e-6) + 3e-15
    assert abs(ssm[0] - exact[0]) / s2 == pytest.approx(periodic_tail(l, 6), rel=1e-6, abs=3e-15)


def test_periodic_validation():
    with pytest.raises(ValueError, match="num_harmonics"):
        K.Periodic(num_harmonics=-1)
    k0 = K.Periodic(0.5, 2.0, 1.0, num_harmonics=0)
    assert k0.state_dim == 2
    # sin^2(pi / 4) = 1/2
    assert float(k0(0.0, 0.25)) == pytest.approx(2.0 * math.exp(-2 * 0.5 / 0.25), rel=1e-14)


# ---------------------------------------------------------------------------------------------
# (d) jit / vmap / grad of transition and initial_cov against central finite differences


GRAD_CASES = CASES + [
    Case("se6", lambda t: K.SquaredExponential(t[0], t[1], 6), (0.6, 1.4), None),
]
# One case per code path (every kernel class, Sum with a non-stationary part, Product with a
# periodic factor) as the blocks of one Sum, its hyperparameters one vector: one compilation for
# the gradient and one for the finite differences (compiling them per case would take most of this
# file's time), and the Sum's block structure is exercised on the way.
DIFF_CASES = [c for c in GRAD_CASES if c.name in ("matern12", "matern52", "cosine", "constant", "linear",
                                                  "sum_with_linear", "quasi_periodic", "se6")] + [
    # a short lengthscale (x = l^-2 = 156: the Bessel weights' hard regime), fewer harmonics
    Case("periodic_short_l_j8", lambda t: K.Periodic(t[0], t[1], t[2], num_harmonics=8), (0.08, 0.6, 1.1), None),
]
_OFFSETS = np.cumsum([0] + [len(c.theta) for c in DIFF_CASES])
ALL_THETA = np.concatenate([np.asarray(c.theta, np.float64) for c in DIFF_CASES])


def make_all(theta):
    return K.Sum(*[c.make(theta[_OFFSETS[i]:_OFFSETS[i + 1]]) for i, c in enumerate(DIFF_CASES)])


def _blocks():
    dims = [c.make(np.asarray(c.theta)).state_dim for c in DIFF_CASES]
    ends = np.cumsum(dims)
    return [slice(e - d, e) for d, e in zip(dims, ends)]


def test_grad_matches_finite_differences():
    blocks = _blocks()
    d = blocks[-1].stop
    W = np.random.default_rng(0).normal(size=(3, d, d))

    def f(theta, dt):
        # one objective per block, so each finite difference is taken at its own block's scale
        k = make_all(theta)
        A, Q = k.transition(dt)
        P0 = k.initial_cov(0.3)
        return jnp.stack([jnp.sum(W[0][b, b] * A[b, b]) + jnp.sum(W[1][b, b] * Q[b, b])
                          + jnp.sum(W[2][b, b] * P0[b, b]) for b in blocks])

    dts = jnp.asarray([0.0, 0.13, 1.7])
    theta = ALL_THETA
    # each parameter enters one block only: the gradient of the total is the block's derivative
    grad = np.asarray(jax.jit(jax.vmap(jax.grad(lambda th, dt: jnp.sum(f(th, dt))), in_axes=(None, 0)))(
        jnp.asarray(theta), dts))
    fv = jax.jit(jax.vmap(f, in_axes=(None, 0)))
    for j in range(theta.size):
        # small h: the high harmonics (j w0 dt ~ 100 rad) make the third derivative large
        h = 1e-6 * max(abs(theta[j]), 0.1)
        e = np.zeros(theta.size)
        e[j] = h
        fd = (np.asarray(fv(jnp.asarray(theta + e), dts)) - np.asarray(fv(jnp.asarray(theta - e), dts))) / (2 * h)
        i = int(np.searchsorted(_OFFSETS, j, side="right")) - 1
        others = np.delete(fd, i, axis=1)
        np.testing.assert_array_equal(others, 0.0)  # the blocks are independent
        np.testing.assert_allclose(grad[:, j], fd[:, i], rtol=1e-6, atol=1e-7 * max(1.0, np.abs(fd).max()),
                                   err_msg=f"{DIFF_CASES[i].name}: parameter {j - _OFFSETS[i]}")
    # every parameter moves something (a derivative that is identically 0 would test nothing)
    assert np.all(np.abs(grad).max(axis=0) > 1e-3)


def test_transition_vmaps_over_many_steps():
    dts = jnp.asarray(np.random.default_rng(2).exponential(0.1, 100_000))
    k = K.Matern52(0.5, 1.0) + K.Cosine(1.0, 2.0)
    A, Q = jax.jit(jax.vmap(k.transition))(dts)
    assert A.shape == Q.shape == (100_000, 5, 5)
    A_ref = scipy.linalg.expm(np.asarray(k.feedback_matrix()) * float(dts[-1]))
    _close(A[-1], A_ref)


# ---------------------------------------------------------------------------------------------
# (e) check(): ValueError naming the field; silent under tracing


CHECK_CASES = [
    (lambda v: K.Matern12(lengthscale=v), 0.0, "kernel.lengthscale"),
    (lambda v: K.Matern32(variance=v), -1.0, "kernel.variance"),
    (lambda v: K.Matern52(lengthscale=v), np.nan, "kernel.lengthscale"),
    (lambda v: K.SquaredExponential(lengthscale=v), 0.0, "kernel.lengthscale"),
    (lambda v: K.SquaredExponential(variance=v), -1.0, "kernel.variance"),
    (lambda v: K.Periodic(lengthscale=v), 0.0, "kernel.lengthscale"),
    (lambda v: K.Periodic(variance=v), -1.0, "kernel.variance"),
    (lambda v: K.Periodic(period=v), 0.0, "kernel.period"),
    (lambda v: K.Cosine(period=v), 0.0, "kernel.period"),
    (lambda v: K.Cosine(variance=v), -1.0, "kernel.variance"),
    (lambda v: K.Constant(variance=v), -1.0, "kernel.variance"),
    (lambda v: K.Linear(variance=v), -1.0, "kernel.variance"),
    (lambda v: K.Linear(offset=v), np.inf, "kernel.offset"),
    (lambda v: K.Matern32() + K.Periodic(lengthscale=v), 0.0, r"kernel\.kernels\.1\.lengthscale"),
    (lambda v: K.Sum(K.Linear(variance=v), K.Constant()), -1.0, r"kernel\.kernels\.0\.variance"),
    (lambda v: K.Periodic(period=v) * K.Matern32(), 0.0, r"kernel\.kernels\.0\.period"),
    (lambda v: K.Product(K.Cosine(), K.Matern32() + K.SquaredExponential(lengthscale=v)), 0.0,
     r"kernel\.kernels\.1\.kernels\.1\.lengthscale"),
]


@pytest.mark.parametrize("make,bad,match", CHECK_CASES)
def test_check_names_the_field(make, bad, match):
    make(1.0).check()  # a valid value passes
    with pytest.raises(ValueError, match=match):
        make(bad).check()
    # under tracing the values are unknown: check must not raise (nor break the trace)
    jax.jit(lambda v: make(v).check())(jnp.asarray(bad))


def test_check_custom_name_and_positive_values_pass():
    with pytest.raises(ValueError, match=r"gp\.prior\.kernels\.0\.lengthscale"):
        (K.Matern32(0.0) + K.Constant()).check("gp.prior")
    for k in (K.SquaredExponential(), K.Periodic(), K.Cosine(), K.Constant(), K.Linear(offset=-3.0),
              K.Periodic() * K.Matern32() + K.Linear()):
        k.check()


def test_product_rejects_nonstationary_factor():
    with pytest.raises(ValueError, match=r"kernels\[1\].*Linear.*not stationary"):
        K.Product(K.Matern32(), K.Linear())
    with pytest.raises(ValueError, match=r"kernels\[0\].*Sum"):
        (K.Linear() + K.Constant()) * K.Matern32()
    with pytest.raises(TypeError, match=r"kernels\[1\]"):
        K.Sum(K.Matern32(), 1.0)
    with pytest.raises(ValueError, match="at least one"):
        K.Sum()


def test_operator_sugar_flattens():
    a, b, c = K.Matern12(), K.Cosine(), K.Constant()
    s = a + b + c
    assert isinstance(s, K.Sum) and len(s.kernels) == 3 and s.stationary
    p = a * b * c
    assert isinstance(p, K.Product) and len(p.kernels) == 3 and p.state_dim == 2
    assert not (a + K.Linear()).stationary
    with pytest.raises(TypeError):
        a + 1.0


# ---------------------------------------------------------------------------------------------
# (f) dtype: a float32 kernel gives float32 matrices (under x64) that agree with float64


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.name for c in GRAD_CASES])
def test_float32_kernel(case):
    k32, k64 = _kernel(case, np.float32), _kernel(case, np.float64)
    # (the float64 call hits test_transition_matches_expm's compilation)
    A32, Q32 = transitions(k32, jnp.asarray(DTS, jnp.float32))
    A64, Q64 = transitions(k64, jnp.asarray(DTS))
    assert A32.dtype == Q32.dtype == jnp.float32, (A32.dtype, Q32.dtype)
    assert A64.dtype == Q64.dtype == jnp.float64
    # up to dt = 0.37: at dt = 2.5 the 40th harmonic's angle (~600 rad) alone carries 4e-5 of
    # float32 rounding
    _close(A32[:3], A64[:3], rtol=2e-5, what="A f32")
    _close(Q32[:3], Q64[:3], rtol=2e-5, what="Q f32")
    parts = model_parts0(k32)
    assert all(m.dtype == jnp.float32 for m in parts), [m.dtype for m in parts]


def test_python_numbers_take_the_default_float():
    assert K.Matern32(1, 2).transition(0.5)[0].dtype == jnp.float64
    assert K.Periodic(1, 2, 3).lengthscale.dtype == jnp.float64
