"""Implicit MAP filter: K gradient steps with the matched step size equal the Kalman filter
(scalar and diagonal models, started at the steady-state covariance so every gain is equal),
pytree states, NaN handling and input checks."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax

import probssm as ps


def steady_state_pred_var(a, q, h, r):
    """Fixed point of the scalar Riccati recursion for the predicted variance."""
    P = q
    for _ in range(2000):
        Pf = P * r / (h * h * P + r)
        P = a * a * Pf + q
    return P


@pytest.fixture(scope="module")
def diag_case():
    a, q = np.array([0.9, 0.5, -0.7]), np.array([0.3, 1.0, 0.2])
    h, r = np.array([1.5, -0.8, 2.0]), np.array([0.5, 0.2, 1.0])
    P = np.array([steady_state_pred_var(*v) for v in zip(a, q, h, r)])
    lin = ps.models.LinearGaussianSSM(np.zeros(3), np.diag(P), np.diag(a), np.diag(q), np.diag(h), np.diag(r))
    _, y = ps.sample(jax.random.key(0), lin, 40)
    return (a, q, h, r, P), lin, y


@pytest.mark.parametrize("K", [1, 4])
def test_matched_gd_equals_kalman_diagonal(diag_case, K):
    (a, q, h, r, P), lin, y = diag_case
    ref = ps.kalman.filter(lin, y)
    eta = ps.imap.matched_step_size(h, r, P, K)
    aj, hj, rj = map(jnp.asarray, (a, h, r))
    out = ps.imap.filter(lambda x, t: aj * x, lambda x, yt, t: 0.5 * jnp.sum((yt - hj * x) ** 2 / rj),
                         jnp.zeros(3), y, optimizer=optax.scale(-eta), num_steps=K)
    np.testing.assert_allclose(out.filtered_states, ref.filtered_means, rtol=0, atol=1e-10)


def test_matched_gd_equals_kalman_scalar(diag_case):
    (a, q, h, r, P), _, _ = diag_case
    a, q, h, r, P = a[0], q[0], h[0], r[0], P[0]
    lin = ps.models.LinearGaussianSSM(np.zeros(1), [[P]], [[a]], [[q]], [[h]], [[r]])
    _, y = ps.sample(jax.random.key(1), lin, 40)
    y = y.at[7].set(jnp.nan)
    ref = ps.kalman.filter(lin, y)
    K = 3
    eta = float(ps.imap.matched_step_size(h, r, P, K))
    nl = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1) * P, lambda z, t, u: a * z, jnp.eye(1) * q,
                                        lambda z, t, u: h * z, jnp.eye(1) * r)
    out = ps.imap.filter_ssm(nl, y, optimizer=optax.sgd(eta), num_steps=K, learning_rate=eta)
    # step 7 is missing: Kalman's gain changes after it, so compare before it exactly
    np.testing.assert_allclose(out.filtered_states[:7], ref.filtered_means[:7], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.filtered_states[7], a * out.filtered_states[6], atol=1e-12)
    # a mismatched step size gives a different answer (the test can fail)
    off = ps.imap.filter_ssm(nl, y, optimizer=optax.sgd(0.5 * eta), num_steps=K)
    assert float(jnp.max(jnp.abs(off.filtered_states[:7] - ref.filtered_means[:7]))) > 1e-3


def test_pytree_state_and_adam():
    # state = {"w": (5,), "b": ()} regression weights tracked by Adam; loss is a least-squares fit
    key = jax.random.key(2)
    X = jax.random.normal(key, (30, 8, 5))
    w_true = jnp.arange(5.0) / 5
    y = X @ w_true + 0.3
    obs = {"X": X, "y": y}
    loss = lambda s, o, t: 0.5 * jnp.mean((o["y"] - o["X"] @ s["w"] - s["b"]) ** 2)
    out = ps.imap.filter(lambda s, t: s, loss, {"w": jnp.zeros(5), "b": jnp.zeros(())}, obs,
                         optimizer=optax.adam(0.05), num_steps=20)
    assert out.filtered_states["w"].shape == (30, 5) and out.filtered_states["b"].shape == (30,)
    assert float(out.final_losses[-1]) < 1e-2 * float(loss({"w": jnp.zeros(5), "b": 0.0},
                                                           {"X": X[-1], "y": y[-1]}, 0))


def test_bad_input():
    f, l = (lambda x, t: x), (lambda x, y, t: jnp.sum((x - y) ** 2))
    y = jnp.zeros((5, 2))
    with pytest.raises(ValueError, match="num_steps"):
        ps.imap.filter(f, l, jnp.zeros(2), y, optimizer=optax.sgd(0.1), num_steps=0)
    with pytest.raises(ValueError, match="learning_rate"):
        ps.imap.filter(f, l, jnp.zeros(2), y, optimizer=optax.sgd(-0.1), num_steps=2, learning_rate=-0.1)
    with pytest.raises(ValueError, match="optimizer"):
        ps.imap.filter(f, l, jnp.zeros(2), y, optimizer="adam", num_steps=2)
    nl = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), lambda z, t, u: z, jnp.eye(1),
                                        lambda z, t, u: z, jnp.eye(1))
    with pytest.raises(ValueError, match="emissions"):
        ps.imap.filter_ssm(nl, jnp.zeros((5, 2)), optimizer=optax.sgd(0.1), num_steps=1)


def test_float32_long_sequence(diag_case):
    (a, q, h, r, P), lin, _ = diag_case
    _, y = ps.sample(jax.random.key(5), lin, 1000)
    ref = ps.kalman.filter(lin, y)
    eta = ps.imap.matched_step_size(h, r, P, 2).astype(jnp.float32)
    aj, hj, rj = (jnp.asarray(v, jnp.float32) for v in (a, h, r))
    out = ps.imap.filter(lambda x, t: aj * x, lambda x, yt, t: 0.5 * jnp.sum((yt - hj * x) ** 2 / rj),
                         jnp.zeros(3, jnp.float32), y.astype(jnp.float32), optimizer=optax.scale(-eta), num_steps=2)
    assert out.filtered_states.dtype == jnp.float32
    # measured: ~4e-7 over T = 1000
    np.testing.assert_allclose(out.filtered_states, ref.filtered_means, rtol=0, atol=1e-5)


def _max_intermediate_size(jaxpr):
    """Largest array produced anywhere in a jaxpr, sub-jaxprs (scan, jit, cond) included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _max_intermediate_size(inner))
    return biggest


def test_never_forms_a_covariance():
    d, T = 2000, 3
    a, h, r = 0.9, 1.5, 0.5
    f = lambda x, t: a * x
    loss = lambda x, y, t: 0.5 * jnp.sum((y - h * x) ** 2) / r
    run = lambda y: ps.imap.filter(f, loss, jnp.zeros(d), y, optimizer="adam", learning_rate=0.1,
                                   num_steps=3).filtered_states
    jaxpr = jax.make_jaxpr(run)(jnp.zeros((T, d))).jaxpr
    biggest = _max_intermediate_size(jaxpr)
    assert biggest <= T * d < d * d  # nothing quadratic in the state dimension
    # the helper does see quadratic intermediates when there are some
    assert _max_intermediate_size(jax.make_jaxpr(lambda x: jnp.outer(x, x).sum())(jnp.zeros(d)).jaxpr) == d * d


def test_named_optimizer_equals_transformation(diag_case):
    (a, q, h, r, P), lin, y = diag_case
    aj, hj, rj = map(jnp.asarray, (a, h, r))
    f, l = (lambda x, t: aj * x), (lambda x, yt, t: 0.5 * jnp.sum((yt - hj * x) ** 2 / rj))
    by_name = ps.imap.filter(f, l, jnp.zeros(3), y, optimizer="adam", learning_rate=0.05, num_steps=4)
    by_obj = ps.imap.filter(f, l, jnp.zeros(3), y, optimizer=optax.adam(0.05), num_steps=4)
    np.testing.assert_allclose(by_name.filtered_states, by_obj.filtered_states, atol=1e-12)


def test_named_optimizer_bad_input():
    f, l = (lambda x, t: x), (lambda x, y, t: jnp.sum((x - y) ** 2))
    y = jnp.zeros((5, 2))
    for lr in (0.0, -1.0, float("nan"), None):
        with pytest.raises(ValueError, match="learning_rate"):
            ps.imap.filter(f, l, jnp.zeros(2), y, optimizer="sgd", learning_rate=lr, num_steps=2)
    with pytest.raises(ValueError, match="optimizer"):
        ps.imap.filter(f, l, jnp.zeros(2), y, optimizer="newton", learning_rate=0.1, num_steps=2)
    for K in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            ps.imap.filter(f, l, jnp.zeros(2), y, optimizer="sgd", learning_rate=0.1, num_steps=K)
    with pytest.raises(ValueError, match="observations"):
        ps.imap.filter(f, l, jnp.zeros(2), {"a": jnp.zeros((5, 2)), "b": jnp.zeros((4, 2))},
                       optimizer="sgd", learning_rate=0.1, num_steps=1)
    with pytest.raises(ValueError, match="model"):
        ps.imap.filter_ssm("model", y, optimizer="sgd", learning_rate=0.1, num_steps=1)


def test_compiles_once_per_configuration():
    traces = []

    def loss(x, y, t):
        traces.append(1)  # runs only while tracing
        return 0.5 * jnp.sum((y - x) ** 2)

    f = lambda x, t: 0.5 * x
    y = jnp.ones((6, 2))
    run = lambda y, lr: ps.imap.filter(f, loss, jnp.zeros(2), y, optimizer="sgd", learning_rate=lr, num_steps=2)
    run(y, 0.1)
    n = len(traces)
    assert n > 0
    run(2 * y, 0.1)  # new data, same shapes and settings: no re-trace
    assert len(traces) == n
    run(y, 0.2)  # a different named optimiser is a different program
    assert len(traces) > n


def test_each_update_equals_kalman_update_off_steady_state(diag_case):
    # start far from the steady state so every step has its own predicted covariance; one IMAP
    # update from the Kalman predicted mean with that step's matched step size is the Kalman update
    (a, q, h, r, _), _, y = diag_case
    lin = ps.models.LinearGaussianSSM(np.ones(3), np.diag([5.0, 0.1, 2.0]), np.diag(a), np.diag(q), np.diag(h),
                                      np.diag(r))
    ref = ps.kalman.filter(lin, y)
    aj, hj, rj = map(jnp.asarray, (a, h, r))
    m_pred = jnp.concatenate([jnp.ones((1, 3)), aj * ref.filtered_means[:-1]])
    P_pred = jnp.concatenate([jnp.array([[5.0, 0.1, 2.0]]),
                              aj ** 2 * jnp.diagonal(ref.filtered_covs[:-1], axis1=1, axis2=2) + jnp.asarray(q)])
    K = 3
    loss = lambda x, yt, t: 0.5 * jnp.sum((yt - hj * x) ** 2 / rj)

    def one(m, P, yt):
        eta = ps.imap.matched_step_size(hj, rj, P, K)
        return ps.imap.filter(lambda x, t: x, loss, m, yt[None], optimizer=optax.scale(-eta),
                              num_steps=K).filtered_states[0]

    out = jax.vmap(one)(m_pred, P_pred, y)
    np.testing.assert_allclose(out, ref.filtered_means, rtol=0, atol=1e-10)
    assert float(jnp.ptp(P_pred[:, 0])) > 0.5  # the gains really vary over time


# ---------------------------------------------------------------------------------------------
# filter_ssm reads only the declared additive-Gaussian structure (issue 14)
# ---------------------------------------------------------------------------------------------
import equinox as eqx  # noqa: E402


class DiagLinear(ps.core.AbstractAdditiveGaussianSSM):
    """A user-written additive-Gaussian model: z_t = a z_{t-1} + c u_t + noise, y_t = g(z_t) + noise."""

    a: jax.Array
    q: jax.Array
    h: jax.Array
    r: jax.Array
    m0: jax.Array
    p0: jax.Array
    c: jax.Array = eqx.field(default=None)
    nonlinear: bool = eqx.field(static=True, default=False)

    def initial_moments(self, inputs=None):
        return self.m0, jnp.diag(self.p0)

    def transition_mean(self, z_prev, t, inputs=None):
        return self.a * z_prev + (0.0 if inputs is None else self.c * inputs[0])

    def transition_noise_cov(self, t, inputs=None):
        return jnp.diag(self.q)

    def emission_mean(self, z, t, inputs=None):
        return self.h * (jnp.sin(z) + 0.5 * z if self.nonlinear else z)

    def emission_noise_cov(self, t, inputs=None):
        return jnp.diag(self.r)

    @property
    def state_dim(self):
        return self.a.shape[0]

    @property
    def emission_dim(self):
        return self.h.shape[0]


def test_user_subclass_with_matched_gd_equals_kalman(diag_case):
    # regression: filter_ssm refused every model but the concrete NonlinearGaussianSSM
    (a, q, h, r, P), lin, y = diag_case
    model = DiagLinear(*map(jnp.asarray, (a, q, h, r, np.zeros(3), P)))
    K = 3
    eta = ps.imap.matched_step_size(h, r, P, K)
    y = y.at[11].set(jnp.nan)
    out = ps.imap.filter_ssm(model, y, optimizer=optax.scale(-eta), num_iters=K)
    ref = ps.kalman.filter(lin, y)
    np.testing.assert_allclose(out.filtered_means[:11], ref.filtered_means[:11], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.filtered_means[11], a * out.filtered_means[10], atol=1e-12)
    assert out.filtered_states is out.filtered_means  # old field name still reads


def test_user_subclass_with_inputs_equals_general_filter(diag_case):
    (a, q, h, r, P), _, y = diag_case
    T = y.shape[0]
    u = jnp.sin(jnp.arange(T, dtype=y.dtype))[:, None]
    model = DiagLinear(*map(jnp.asarray, (a, q, h, r, np.ones(3), P)), c=jnp.asarray([0.5, -1.0, 2.0]),
                       nonlinear=True)
    opt = optax.adam(0.05)
    out = ps.imap.filter_ssm(model, y, u, optimizer=opt, num_iters=4)
    rj = jnp.asarray(r)
    ref = ps.imap.filter(lambda x, t: model.transition_mean(x, t, u[t]),
                         lambda x, yt, t: 0.5 * jnp.sum((yt - model.emission_mean(x, t)) ** 2 / rj),
                         jnp.ones(3), y, optimizer=opt, num_iters=4)
    np.testing.assert_allclose(out.filtered_means, ref.filtered_means, rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.final_losses, ref.final_losses, rtol=1e-10, atol=1e-12)
    # a batch with shared inputs and ragged lengths: each row is the single-sequence run
    ys = jnp.stack([y, y[::-1]])
    both = ps.imap.filter_ssm(model, ys, u, optimizer=opt, num_iters=4, lengths=jnp.array([T, 20]))
    np.testing.assert_allclose(both.filtered_means[0], out.filtered_means, atol=1e-12)
    short = ps.imap.filter_ssm(model, y[::-1][:20], u[:20], optimizer=opt, num_iters=4)
    np.testing.assert_allclose(both.filtered_means[1, :20], short.filtered_means, atol=1e-12)


def test_linear_gaussian_ssm_matched_gd_equals_kalman(diag_case):
    # the LGSSM declares the additive-Gaussian structure too: IMAP with the matched step size
    # started at the steady-state covariance reproduces the Kalman filter's means
    (a, q, h, r, P), lin, y = diag_case
    K = 2
    eta = ps.imap.matched_step_size(h, r, P, K)
    out = ps.imap.filter_ssm(lin, y, optimizer=optax.scale(-eta), num_iters=K)
    np.testing.assert_allclose(out.filtered_means, ps.kalman.filter(lin, y).filtered_means, rtol=0, atol=1e-10)


def test_checks_run_on_tree_at_models():
    nl = ps.models.NonlinearGaussianSSM(jnp.zeros(1), jnp.eye(1), lambda z, t, u: z, jnp.eye(1),
                                        lambda z, t, u: z, jnp.eye(1))
    y = jnp.zeros((5, 1))
    bad = eqx.tree_at(lambda m: m.emission_cov, nl, -jnp.eye(1))
    with pytest.raises(ValueError, match="emission_cov"):
        ps.imap.filter_ssm(bad, y, optimizer="sgd", learning_rate=0.1, num_iters=1)
    user = DiagLinear(*(jnp.ones(1),) * 6)
    with pytest.raises(ValueError, match="emission_cov"):
        ps.imap.filter_ssm(eqx.tree_at(lambda m: m.r, user, -jnp.ones(1)), y, optimizer="sgd", learning_rate=0.1,
                           num_iters=1)
    with pytest.raises(ValueError, match="initial_mean"):
        ps.imap.filter_ssm(eqx.tree_at(lambda m: m.m0, user, jnp.full(1, jnp.nan)), y, optimizer="sgd",
                           learning_rate=0.1, num_iters=1)
    with pytest.raises(ValueError, match="emissions"):
        ps.imap.filter_ssm(user, jnp.zeros((5, 2)), optimizer="sgd", learning_rate=0.1, num_iters=1)
    # old keyword names keep working
    old = ps.imap.filter(lambda x, t: x, lambda x, yt, t: jnp.sum((x - yt) ** 2), jnp.zeros(1),
                         observations=y, optimizer="sgd", learning_rate=0.1, num_steps=1)
    new = ps.imap.filter(lambda x, t: x, lambda x, yt, t: jnp.sum((x - yt) ** 2), jnp.zeros(1),
                         emissions=y, optimizer="sgd", learning_rate=0.1, num_iters=1)
    np.testing.assert_array_equal(old.filtered_means, new.filtered_means)
